from loramux.engine.block_manager import BlockManager
from tests.fakes import fake_seq


def computed(bm: BlockManager, seq):
    """Give `seq` blocks for all its tokens, mark them computed and publish the full ones."""
    bm.grow(seq, len(seq))
    seq.num_computed_tokens = len(seq)
    bm.commit(seq)
    return seq


def test_grow_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a, b = fake_seq(10), fake_seq(5)
    bm.grow(a, 10)
    bm.grow(b, 5)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free == 3
    assert not bm.can_grow(a, 10 + 4 * 4)
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 8 and bm.ref_counts == [0] * 8


def test_prefix_blocks_are_shared_and_refcounted():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = computed(bm, fake_seq(10))
    second = fake_seq(11)  # same first 10 tokens, one more
    assert bm.match_prefix(second) == 8
    assert second.block_table == first.block_table[:2]
    assert [bm.ref_counts[b] for b in second.block_table] == [2, 2]
    bm.free(first)
    assert [bm.ref_counts[b] for b in second.block_table] == [1, 1]
    bm.grow(second, 11)
    assert second.block_table[2] not in first.block_table[:2]
    bm.free(second)
    assert bm.num_free == 8


def test_prefix_match_leaves_a_token_to_compute_and_never_shares_a_written_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = computed(bm, fake_seq(8))
    same = fake_seq(8)  # fully cached prompt: the last block must be recomputed, not shared
    assert bm.match_prefix(same) == 4
    bm.grow(same, 8)
    assert same.block_table[1] != first.block_table[1]


def test_different_adapter_or_tokens_do_not_share():
    bm = BlockManager(num_blocks=8, block_size=4)
    computed(bm, fake_seq(9))  # publishes the base-model blocks
    assert bm.match_prefix(fake_seq(9, adapter="x")) == 0  # K/V differ under an adapter
    assert bm.match_prefix(fake_seq(9, first_token=1)) == 0


def test_freed_cached_blocks_revive_until_reused():
    bm = BlockManager(num_blocks=3, block_size=4)
    first = computed(bm, fake_seq(9))
    bm.free(first)
    again = fake_seq(9)
    assert bm.match_prefix(again) == 8  # still cached while free
    bm.free(again)
    other = fake_seq(12, first_token=100)
    bm.grow(other, 12)  # takes every block, evicting the cached ones
    assert bm.match_prefix(fake_seq(9)) == 0
