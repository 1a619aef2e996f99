from collections import Counter

from loramux.config import SchedulerConfig
from loramux.engine.block_manager import BlockManager
from loramux.engine.scheduler import Scheduler
from tests.fakes import fake_seq


class FakeResidency:
    """Adapters in `paging` cannot be made resident yet; pins are counted."""

    def __init__(self):
        self.paging: set[str] = set()
        self.pins: Counter[str] = Counter()

    def ensure_resident(self, names):
        return not names & self.paging

    def pin(self, names):
        self.pins.update(names)

    def unpin(self, names):
        self.pins.subtract(names)


def make(num_blocks=64, budget=32, max_seqs=8, max_loras=4, residency=None):
    bm = BlockManager(num_blocks, block_size=4, enable_prefix_caching=False)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_loras_per_batch=max_loras)
    return Scheduler(cfg, bm, residency), bm


def run_step(sched, plan, new_token=7):
    """What the engine does after a forward pass, minus the model."""
    for item in plan.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        if item.samples:
            item.seq.output_ids.append(new_token)


def test_token_budget_and_chunked_prefill():
    sched, _ = make(budget=32)
    long = fake_seq(70)
    sched.add(long)
    chunks = []
    while long.num_computed_tokens < 70:
        plan = sched.schedule()
        assert plan.num_tokens <= 32
        chunks.append(plan.prefill[0].num_new_tokens)
        run_step(sched, plan)
    assert chunks == [32, 32, 6]
    assert long.output_ids == [7]  # sampled only when the prompt was complete


def test_decode_is_not_starved_by_a_long_prompt():
    sched, _ = make(budget=16)
    short = fake_seq(4)
    sched.add(short)
    run_step(sched, sched.schedule())
    sched.add(fake_seq(200))
    for _ in range(5):
        plan = sched.schedule()
        assert [s.seq for s in plan.decode] == [short]
        assert plan.prefill and plan.num_tokens == 16  # the rest of the budget prefills the long prompt
        run_step(sched, plan)


def test_newest_running_sequence_is_preempted_and_recomputed():
    sched, bm = make(num_blocks=4, budget=64)
    old, new = fake_seq(8), fake_seq(8)
    sched.add(old)
    sched.add(new)
    run_step(sched, sched.schedule())  # both prefilled: 2 blocks each, cache full
    assert bm.num_free == 0
    plan = sched.schedule()  # old needs a third block for token 9: new is evicted
    assert plan.preempted == [new]
    assert [s.seq for s in plan.decode] == [old]
    assert new.num_computed_tokens == 0 and new.block_table == [] and sched.waiting[0] is new
    run_step(sched, plan)
    assert sched.num_preemptions == 1


def test_adapter_cap_per_step_and_fifo_admission():
    sched, _ = make(max_loras=2, budget=64)
    seqs = [fake_seq(4, adapter=a) for a in ("x", "y", "z", "x")]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    admitted = [s.seq for s in plan.prefill]
    assert admitted == seqs[:2]  # z would be a third adapter; the later x must not overtake z
    names = set().union(*(s.adapter_names for s in admitted))
    assert len(names) <= 2


def test_rare_adapter_is_not_starved_by_a_stream_of_popular_requests():
    sched, _ = make(max_loras=1, budget=64, max_seqs=8)
    sched.add(fake_seq(4, adapter="popular"))
    rare = fake_seq(4, adapter="rare")
    sched.add(rare)
    for step in range(40):
        sched.add(fake_seq(4, adapter="popular"))
        plan = sched.schedule()
        run_step(sched, plan)
        for item in plan.scheduled:
            if len(item.seq.output_ids) >= 3:
                sched.finish(item.seq, "length")
        if rare.num_computed_tokens:
            break
    assert rare.num_computed_tokens > 0, "the rare adapter's request never ran"


def test_a_sequence_waiting_for_a_slot_holds_back_later_adapter_requests_but_not_base_ones():
    residency = FakeResidency()
    residency.paging.add("cold")
    sched, _ = make(residency=residency)
    cold, warm, base = fake_seq(4, adapter="cold"), fake_seq(4, adapter="warm"), fake_seq(4)
    for seq in (cold, warm, base):
        sched.add(seq)
    plan = sched.schedule()
    # warm would pin a slot and so could keep cold waiting for ever: it waits behind cold; base pins nothing.
    assert [s.seq for s in plan.prefill] == [base]
    run_step(sched, plan)
    assert +residency.pins == Counter()
    residency.paging.clear()
    plan = sched.schedule()
    assert [s.seq for s in plan.prefill] == [cold, warm] and [s.seq for s in plan.decode] == [base]
    run_step(sched, plan)
    sched.finish(warm, "stop")
    assert +residency.pins == Counter({"cold": 1})


def test_max_num_seqs_and_abort_frees_blocks():
    sched, bm = make(max_seqs=2)
    seqs = [fake_seq(4) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    assert len(sched.schedule().prefill) == 2
    sched.finish(seqs[0], "abort")
    assert seqs[0].block_table == [] and bm.num_free == bm.num_blocks - 1
    assert [s.seq for s in sched.schedule().prefill] == seqs[1:]  # the freed place goes to the next waiting
