"""Decode through static, padded buffers (the CUDA-graph path) gives the same tokens as the normal path.

On the CPU the static path runs eagerly; the `gpu` tests capture real graphs
and also check the Triton backend against the torch backend.
"""

from __future__ import annotations

import pytest
import torch

from loramux.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine, SamplingParams
from loramux.engine.cuda_graphs import DecodeGraphRunner
from tests.conftest import make_engine, make_peft_adapter


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("graph-adapters")
    return {f"g{i}": str(make_peft_adapter(tiny_llama_dir, root / f"g{i}", r, 2 * r, ["q_proj", "v_proj", "down_proj"],
                                           seed=10 + i)) for i, r in enumerate((4, 16, 8))}


def workload(engine: Engine):
    prompts = [engine.tokenizer.encode(f"request number {i} " * (i + 1), add_special_tokens=False) for i in range(5)]
    mixes = [["g0"], ["g1"], [], [("g0", 0.5), ("g2", 0.5)], ["g2"]]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), mixes)
    return [o[0].new_token_ids for o in outs]


def static_runner(engine: Engine, use_cuda_graphs: bool) -> DecodeGraphRunner:
    return DecodeGraphRunner(engine.model, engine.config.scheduler.max_num_seqs, engine.max_model_len,
                             trash_slot=engine.num_blocks * engine.config.cache.block_size,
                             r_max=engine.slots.max_rank, device=engine.device, use_cuda_graphs=use_cuda_graphs)


def test_static_decode_path_matches_eager(tiny_llama_dir, adapters):
    eager = make_engine(tiny_llama_dir, adapters={n: p for n, p in adapters.items() if n != "g2"})
    static = make_engine(tiny_llama_dir, adapters={n: p for n, p in adapters.items() if n != "g2"})
    static.decode_graphs = static_runner(static, use_cuda_graphs=False)
    # Warm the static buffers, then load an adapter into a slot: it must be used without re-allocation.
    static.generate(["warm up"], SamplingParams(max_tokens=3, temperature=0), [["g0"]])
    captured = dict(static.decode_graphs.steps)
    assert captured
    for engine in (eager, static):
        engine.add_adapter("g2", adapters["g2"])
    assert workload(static) == workload(eager)
    assert all(static.decode_graphs.steps[k] is v for k, v in captured.items())
    assert {depth for _, _, depth in static.decode_graphs.steps} >= {1, 2}  # single adapters and the mixture
    assert static.blocks.num_free == static.num_blocks


def cuda_engine(model_dir, adapters, backend: str, eager: bool) -> Engine:
    return Engine(EngineConfig(
        model=ModelConfig(model=str(model_dir), device="cuda", dtype="float32", enforce_eager=eager),
        cache=CacheConfig(num_blocks=256), scheduler=SchedulerConfig(max_num_seqs=16),
        store=StoreConfig(max_loras=8, lora_backend=backend, adapters=adapters)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager_and_triton_matches_torch(tiny_llama_dir, adapters):
    reference = workload(cuda_engine(tiny_llama_dir, adapters, "torch", eager=True))
    assert workload(cuda_engine(tiny_llama_dir, adapters, "triton", eager=True)) == reference
    graphed = cuda_engine(tiny_llama_dir, adapters, "triton", eager=False)
    assert graphed.decode_graphs is not None
    assert workload(graphed) == reference
    assert any(step.graph is not None for step in graphed.decode_graphs.steps.values())
