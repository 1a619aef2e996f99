"""Decode through static, padded buffers (the CUDA-graph path) gives the same tokens as the normal path,
and its padding is inert by construction.

On the CPU the static path runs eagerly with the paged reference attention
(it reads lengths from buffers, as the Triton kernels do); the `gpu` tests
capture real graphs at start-up and compare them with eager Triton and torch.
"""

from __future__ import annotations

import pytest
import torch

from loramux.composites.synthetic import write_random_mole, write_random_mor
from loramux.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine, SamplingParams
from loramux.engine.cuda_graphs import batch_sizes_up_to
from loramux.engine.step_inputs import prepare_step_inputs
from loramux.engine.warmup import scratch_step, warm_up
from tests.conftest import make_engine, make_peft_adapter


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("graph-adapters")
    return {f"g{i}": str(make_peft_adapter(tiny_llama_dir, root / f"g{i}", r, 2 * r, ["q_proj", "v_proj", "down_proj"],
                                           seed=10 + i)) for i, r in enumerate((4, 16, 8))}


PROMPTS = [f"request number {i} " * (i + 1) for i in range(5)]
MIXES = [["g0"], ["g1"], [], [("g0", 0.5), ("g2", 0.5)], ["g2"]]


def workload(engine: Engine):
    prompts = [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), MIXES)
    return [o[0].new_token_ids for o in outs]


def test_static_decode_path_matches_eager(tiny_llama_dir, adapters):
    eager = make_engine(tiny_llama_dir, adapters={n: p for n, p in adapters.items() if n != "g2"})
    static = make_engine(tiny_llama_dir, adapters={n: p for n, p in adapters.items() if n != "g2"},
                         attention_backend="torch")
    static.decode_graphs = static.make_decode_graphs(use_cuda_graphs=False)
    buffers = static.decode_graphs.input_ids
    # Warm the static buffers, then load an adapter into a slot: it must be used without re-allocation.
    static.generate(["warm up"], SamplingParams(max_tokens=3, temperature=0), [["g0"]])
    for engine in (eager, static):
        engine.add_adapter("g2", adapters["g2"])
    assert workload(static) == workload(eager)
    assert static.decode_graphs.input_ids is buffers
    assert static.blocks.num_free == static.num_blocks


@pytest.fixture
def mole_dir(tmp_path):
    return write_random_mole(tmp_path / "mole", ["g0", "g1", "g2"], 2, 64, seed=3, gate_std=1.0)


@pytest.fixture
def mor_dir(tmp_path):
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96)}
    return write_random_mor(tmp_path / "mor", shapes, 2, 64, num_experts=3, rank=8, seed=4, b_std=0.5,
                            targets=("q_proj", "k_proj", "v_proj", "down_proj"))


COMPOSITE_MIXES = [["mole"], ["g0"], [{"name": "mole", "top_k": 1}], [], [{"name": "mole", "mask": ["g1"]}]]
MOR_MIXES = [["mor"], ["g0"], [{"name": "mor", "top_k": 2}], [], ["mole"]]


@pytest.mark.parametrize("mixes", [COMPOSITE_MIXES, MOR_MIXES], ids=["mole", "mor"])
def test_gated_composite_steps_replay_the_static_path(tiny_llama_dir, adapters, mole_dir, mor_dir, mixes):
    """Decode steps with MoLE or MoR requests (mixed with plain and base-only ones) go through the static
    buffers, with the gates computed inside the forward pass (and MoR's scale rows in the static levels): same
    tokens and gate reports as the normal path."""
    engines = [make_engine(tiny_llama_dir, adapters=adapters, attention_backend="torch") for _ in range(2)]
    for engine in engines:
        engine.add_adapter("mole", str(mole_dir))
        engine.add_adapter("mor", str(mor_dir))
    static = engines[1]
    static.decode_graphs = static.make_decode_graphs(use_cuda_graphs=False)
    replays = []
    run = static.decode_graphs.run
    static.decode_graphs.run = lambda inputs: replays.append(inputs.ctx.composite) or run(inputs)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [engines[0].tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    expected, got = (e.generate(prompts, params, mixes) for e in engines)
    assert [o[0].new_token_ids for o in got] == [o[0].new_token_ids for o in expected]
    for mine, reference in zip(got, expected):
        if reference[0].composite is not None:
            assert mine[0].composite["gates"] == pytest.approx(reference[0].composite["gates"], abs=1e-5)
    assert len(replays) >= 6 and all(gates is not None for gates in replays)


def decode_inputs(engine, mixes):
    """The inputs of a decode step of one request per mix (their prompts prefilled first)."""
    prompts = [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:len(mixes)]]
    for i, (prompt, mix) in enumerate(zip(prompts, mixes)):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=4, temperature=0), mix)
    engine.step()
    plan = engine.scheduler.schedule()
    assert not plan.prefill
    return prepare_step_inputs(plan, engine.attention, engine.slots, engine.device, engine.composites)


def test_gate_buffers_are_sized_by_the_graph_batch_and_padding_is_inert(tiny_llama_dir, adapters, mole_dir):
    """What a gated graph relies on: every gate tensor it reads or writes has the graph batch size whatever
    the step holds; rows without a composite (plain, base-only, padding) keep their built coefficients;
    composite rows get the same coefficients and logged gates as the step's own (eager) gates."""
    engine = make_engine(tiny_llama_dir, adapters=adapters, attention_backend="torch")
    engine.add_adapter("mole", str(mole_dir))
    runner = engine.make_decode_graphs(use_cuda_graphs=False)
    inputs = decode_inputs(engine, COMPOSITE_MIXES)
    eager = inputs.ctx.composite
    n, depth = inputs.ctx.attention.num_decode, len(inputs.ctx.lora_plan.levels)
    batch = runner.graph_batch(n)
    assert (n, depth, batch) == (5, 3, 8)
    runner.fill(inputs, batch, depth)
    runner.fill_gates(eager, batch)
    static = runner.static_inputs(batch, depth, gated=True)
    gates, members = static.ctx.composite, engine.composites.max_members
    shapes = [gates.tokens.shape, gates.gate_index.shape, gates.top_k.shape, gates.sampled.shape]
    assert shapes == [(batch,)] * 4 and gates.allowed.shape == (batch, members)
    assert gates.gate_log.shape[1:] == (batch, members)
    assert all(w.coeff.shape == w.base_coeff.shape == w.source.shape == (batch,) for w in gates.writes)
    composite_rows = eager.tokens.tolist()
    assert set(composite_rows) == {0, 2, 4}
    other = [r for r in range(batch) if r not in composite_rows]
    x = torch.randn(batch, 64)
    for layer in range(2):
        gates.apply(layer, x)
        eager.apply(layer, x[:n])
        assert torch.isfinite(gates.gate_log[layer]).all()
        for w, level in zip(gates.writes, inputs.ctx.lora_plan.levels):
            assert torch.equal(w.coeff[other], w.base_coeff[other])  # no gate on these rows
            rows = level.token_idx
            torch.testing.assert_close(w.coeff[rows], level.coeff, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gates.gate_log[layer, composite_rows], eager.gate_weights(layer, x[:n]))
    for level in static.ctx.lora_plan.levels:
        assert (level.slot_idx[n:] == -1).all() and (level.coeff[n:] == 0).all()
    eager.take_log(runner.gates.gate_log[:, :batch])
    torch.testing.assert_close(eager.gate_log, runner.gates.gate_log[:, composite_rows])


def test_padding_rows_are_inert(tiny_llama_dir, adapters):
    """The buffers a replay reads: one row per batch row in every plan level, padding writes only padding."""
    engine = make_engine(tiny_llama_dir, adapters=adapters, attention_backend="torch")
    runner = engine.make_decode_graphs(use_cuda_graphs=False)
    prompts = [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    for i, (prompt, mix) in enumerate(zip(prompts, MIXES)):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=4, temperature=0), mix)
    engine.step()  # prefills every prompt: the next step decodes all five
    plan = engine.scheduler.schedule()
    assert not plan.prefill
    inputs = prepare_step_inputs(plan, engine.attention, engine.slots, engine.device)
    n, depth = len(plan.decode), len(inputs.ctx.lora_plan.levels)
    assert n == 5 and depth == 2
    batch = runner.graph_batch(n)
    assert batch == 8
    runner.fill(inputs, batch, depth)
    static = runner.static_inputs(batch, depth)
    real_rows = set(range(n))
    for level, real in zip(static.ctx.lora_plan.levels, inputs.ctx.lora_plan.levels):
        tokens = level.token_idx.tolist()
        assert len(set(tokens)) == len(tokens) == batch  # no two rows write the same output row
        live = {t for t, slot in zip(tokens, level.slot_idx.tolist()) if slot >= 0}
        assert live == set(real.token_idx.tolist())  # exactly the real assignments are live...
        for row in real.token_idx.tolist():
            assert level.slot_idx[row] == real.slot_idx[real.token_idx.tolist().index(row)]
        for row, token in enumerate(tokens):
            if row >= n:  # ... and a padding row writes its own (padding) row, inert
                assert token not in real_rows and level.slot_idx[row] == -1 and level.coeff[row] == 0
    meta, scratch = static.ctx.attention, runner.scratch_slot
    assert scratch == engine.num_blocks * engine.config.cache.block_size
    assert (meta.slot_mapping[n:] == scratch).all() and (meta.slot_mapping[:n] != scratch).all()
    assert (meta.context_lens[n:] == 1).all() and (meta.block_tables[n:, 0] == engine.num_blocks).all()


def test_warm_up_touches_only_the_scratch_block(tiny_llama_dir, adapters):
    engine = make_engine(tiny_llama_dir, adapters=adapters, attention_backend="torch", max_num_seqs=3,
                         max_num_batched_tokens=64)
    runner = engine.make_decode_graphs(use_cuda_graphs=False)
    bs = engine.config.cache.block_size
    warm_up(engine.model, engine.attention, None, 3, 64, engine.max_model_len, engine.graph_lora_depth,
            engine.num_blocks, bs, engine.slots.scales, engine.slots.max_rank, engine.device)
    for batch in batch_sizes_up_to(3):
        runner.run(scratch_step([(bs, 1)] * batch, batch, 1, engine.num_blocks, bs, engine.attention,
                                engine.slots.scales, engine.slots.max_rank, engine.device))
    real = engine.num_blocks * bs
    for k_cache, v_cache in engine.model.kv_caches:
        assert not k_cache[:real].any() and not v_cache[:real].any()
        assert k_cache[real:].any()


def cuda_engine(model_dir, adapters, backend: str, eager: bool, attention: str = "auto") -> Engine:
    return Engine(EngineConfig(
        model=ModelConfig(model=str(model_dir), device="cuda", dtype="float32", enforce_eager=eager,
                          attention_backend=attention),
        cache=CacheConfig(num_blocks=256), scheduler=SchedulerConfig(max_num_seqs=16),
        store=StoreConfig(max_loras=8, lora_backend=backend, adapters=adapters)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager_and_triton_matches_torch(tiny_llama_dir, adapters):
    reference = workload(cuda_engine(tiny_llama_dir, adapters, "torch", eager=True, attention="torch"))
    assert workload(cuda_engine(tiny_llama_dir, adapters, "triton", eager=True)) == reference
    graphed = cuda_engine(tiny_llama_dir, adapters, "triton", eager=False)
    assert graphed.decode_graphs is not None
    depth = graphed.graph_lora_depth
    assert {(b, d, g) for b in graphed.decode_graphs.batch_sizes for g in (False, True)
            for d in range(int(g), depth + 1)} == set(graphed.decode_graphs.graphs)
    assert workload(graphed) == reference


def compiled_triton_variants() -> int:
    """How many kernel variants Triton has compiled so far, over the attention and LoRA modules."""
    import triton

    from loramux.kernels import triton_attention, triton_lora
    kernels = [obj for module in (triton_attention, triton_lora) for obj in vars(module).values()
               if isinstance(obj, triton.runtime.JITFunction)]
    return sum(len(cache[0]) for fn in kernels for cache in fn.device_caches.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eager", [False, True])
def test_nothing_compiles_while_serving(tiny_llama_dir, adapters, eager):
    engine = cuda_engine(tiny_llama_dir, adapters, "triton", eager=eager)
    compiled = compiled_triton_variants()
    assert compiled > 0
    workload(engine)
    engine.generate([[1] * 300, [2] * 40], SamplingParams(max_tokens=3, temperature=0), [["g1"], []])
    assert compiled_triton_variants() == compiled
