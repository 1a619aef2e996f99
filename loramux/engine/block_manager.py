"""KV-cache blocks: a free list, reference counts and automatic prefix caching.

A full block is identified by its tokens, the identity of every block before
it, and the LoRA mix of the sequence by content (`Sequence.lora_identity`:
each adapter's checksum, weight and rank range, and a composite expert's gate
by checksum, mask, top-k and task). Adapters change K and V, so
the same tokens under another adapter — or under a replaced version of the
same name — are another block. Freed blocks keep that
identity until they are reused, so a later request with the same prefix can
revive them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from loramux.engine.sequence import Sequence

BlockKey = tuple[int, tuple[int, ...], Hashable]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Insertion order = least recently freed first, so cached blocks live longest.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_key: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        self.prefix_hit_tokens = 0  # tokens served from the prefix cache, for metrics

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _key(self, seq: Sequence, block_index: int, parent: BlockKey | None) -> BlockKey:
        start = block_index * self.block_size
        tokens = tuple(seq.token_ids[start:start + self.block_size])
        return (hash(parent), tokens, seq.lora_identity)

    def _take_free(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        key = self.block_key[block]
        if key is not None:
            del self.cached[key]
            self.block_key[block] = None
        self.ref_counts[block] = 1
        return block

    def _share(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks to a new sequence; returns how many tokens they hold.

        At least one token is always left to compute (its logits are needed),
        and a shared block is never written to.
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (len(seq) - 1) // self.block_size
        for i in range(max_blocks):
            key = self._key(seq, i, seq.block_keys[-1] if seq.block_keys else None)
            block = self.cached.get(key)
            if block is None:
                break
            self._share(block)
            seq.block_table.append(block)
            seq.block_keys.append(key)
        self.prefix_hit_tokens += len(seq.block_table) * self.block_size
        return len(seq.block_table) * self.block_size

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks to hold `num_tokens` tokens (checked with can_grow first)."""
        needed = self.blocks_needed(num_tokens) - len(seq.block_table)
        if needed > self.num_free:
            raise RuntimeError("out of KV blocks")
        for _ in range(needed):
            seq.block_table.append(self._take_free())

    def commit(self, seq: Sequence) -> None:
        """Publish the sequence's computed full blocks for prefix sharing."""
        if not self.enable_prefix_caching:
            return
        for i in range(len(seq.block_keys), seq.num_computed_tokens // self.block_size):
            key = self._key(seq, i, seq.block_keys[-1] if seq.block_keys else None)
            block = seq.block_table[i]
            if self.block_key[block] is None and key not in self.cached:
                self.block_key[block] = key
                self.cached[key] = block
            seq.block_keys.append(key)

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.block_keys = []
