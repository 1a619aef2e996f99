"""The whole engine on the device: every sampling mode (CPU here, CUDA under `-m gpu`), and a random-init
1B Llama with 32 adapters on CUDA against the torch LoRA backend run eagerly (`-m gpu` only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loadtest.random_model import write_random_model
from loramux.adapters_store.synthetic import write_random_adapter
from loramux.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine, SamplingParams
from loramux.engine.engine import RequestOutput
from tests.conftest import DEVICES


def device_engine(model_dir: Path, device: str, dtype: str = "auto", lora_backend: str = "auto",
                  enforce_eager: bool = False, max_loras: int = 8, kv_gib: float = 0.25) -> Engine:
    return Engine(EngineConfig(
        model=ModelConfig(model=str(model_dir), device=device, dtype=dtype, enforce_eager=enforce_eager),
        cache=CacheConfig(kv_cache_memory_gib=kv_gib, block_size=16),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=1024, max_loras_per_batch=max_loras),
        store=StoreConfig(max_loras=max_loras, max_lora_rank=16, lora_backend=lora_backend)))


@pytest.mark.parametrize("device", DEVICES)
def test_every_sampling_mode_through_the_engine(tiny_llama_dir, device):
    engine = device_engine(tiny_llama_dir, device)
    prompt = [5, 6, 7, 8, 9]
    modes = {
        "greedy": SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
        "topk1": SamplingParams(max_tokens=6, temperature=1.3, top_k=1, ignore_eos=True),
        "temperature": SamplingParams(max_tokens=6, temperature=0.7, seed=1, ignore_eos=True),
        "topk": SamplingParams(max_tokens=6, top_k=20, seed=2, ignore_eos=True),
        "topp": SamplingParams(max_tokens=6, top_p=0.8, seed=3, ignore_eos=True),
        "minp": SamplingParams(max_tokens=6, min_p=0.1, seed=4, ignore_eos=True),
        "allfilters": SamplingParams(max_tokens=6, temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, seed=5,
                                      ignore_eos=True),
        "n2logprobs": SamplingParams(max_tokens=6, n=2, seed=2**64 - 1, logprobs=3, ignore_eos=True),
        "unseeded": SamplingParams(max_tokens=6, ignore_eos=True),
    }
    names = list(modes)

    # All modes in one batch, then again in the reverse order: the seeded ones draw the same tokens.
    runs = []
    for order in (names, names[::-1]):
        for name in order:
            engine.add_request(f"{name}-{len(runs)}", prompt, modes[name])
        merged: dict[str, dict[int, RequestOutput]] = {name: {} for name in names}
        while engine.has_unfinished_requests():
            for out in engine.step():
                by_index = merged[out.request_id.split("-")[0]]
                by_index.setdefault(out.index, RequestOutput.accumulator(out)).merge(out)
        runs.append({name: [by_index[i] for i in sorted(by_index)] for name, by_index in merged.items()})
    outs, reverse = runs
    for name, completions in outs.items():
        assert len(completions) == len(reverse[name]) == modes[name].n
        for c, again in zip(completions, reverse[name]):
            assert c.num_output_tokens == 6 and c.finish_reason == "length"
            assert all(0 <= t < engine.shape.vocab_size for t in c.new_token_ids)
            if name != "unseeded":
                assert again.new_token_ids == c.new_token_ids, name
    assert outs["topk1"][0].new_token_ids == outs["greedy"][0].new_token_ids
    pair = outs["n2logprobs"]
    assert pair[0].new_token_ids != pair[1].new_token_ids
    assert all(len(c.logprobs) == 6 and all(len(lp.top) == 3 for lp in c.logprobs) for c in pair)
    assert all(lp.token_id == t for c in pair for lp, t in zip(c.logprobs, c.new_token_ids))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_1b_with_32_adapters_matches_the_torch_backend_run_eagerly(tmp_path, smollm_tokenizer_dir):
    """The served path (Triton kernels, CUDA graphs) against the torch LoRA backend without graphs, in float32
    so that greedy tokens are comparable; the adapters must change the output, or the test proves nothing."""
    model_dir = write_random_model(tmp_path / "model", "1b", smollm_tokenizer_dir, "cuda")
    served = device_engine(model_dir, "cuda", dtype="float32", max_loras=33, kv_gib=2.0)
    shapes, layers = served.shape.lora_target_shapes(), served.shape.num_layers
    adapters = {f"a{i}": str(write_random_adapter(tmp_path / f"a{i}", shapes, layers, 16, seed=i, b_std=0.02))
                for i in range(32)}
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (32, 24), generator=g).tolist()
    mixes = [[name] for name in adapters]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def tokens(engine: Engine, with_adapters: bool) -> list[list[int]]:
        outs = engine.generate(prompts, params, mixes if with_adapters else None)
        return [o[0].new_token_ids for o in outs]

    for name, path in adapters.items():
        served.add_adapter(name, path)
    served_mixed, served_base = tokens(served, True), tokens(served, False)
    assert served.decode_graphs is not None
    del served
    torch.cuda.empty_cache()
    reference = device_engine(model_dir, "cuda", dtype="float32", lora_backend="torch", enforce_eager=True,
                              max_loras=33, kv_gib=2.0)
    for name, path in adapters.items():
        reference.add_adapter(name, path)
    reference_mixed = tokens(reference, True)
    # float32 on both sides: a near-tie may flip one greedy token somewhere, a lost LoRA delta flips many.
    assert sum(a == b for a, b in zip(served_mixed, reference_mixed)) >= 31
    assert sum(a != b for a, b in zip(served_mixed, served_base)) >= 24
