"""Multi-adapter batches give, for every request, the tokens PEFT gives for it alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loramux.engine import SamplingParams
from tests.conftest import hf_greedy, make_engine, make_peft_adapter

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# (rank, alpha, targets, rslora): ranks 4-64, different module sets and alphas.
ADAPTER_SPECS = {
    "a0": (4, 8, ATTN + MLP, False),
    "a1": (8, 16, ["q_proj", "v_proj"], False),
    "a2": (16, 8, MLP, False),
    "a3": (64, 32, ATTN + MLP, False),
    "a4": (8, 4, ["o_proj", "down_proj"], True),
    "a5": (32, 64, ["k_proj", "up_proj"], False),
    "a6": (4, 4, ["gate_proj"], False),
    "a7": (16, 32, ATTN, True),
}
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_peft_adapter(tiny_llama_dir, root / name, r, alpha, targets, seed=i, use_rslora=rs)
            for i, (name, (r, alpha, targets, rs)) in enumerate(ADAPTER_SPECS.items())}


@pytest.fixture(scope="module")
def peft_reference(tiny_llama_dir, adapters):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()

    def greedy(name: str | None, prompt_ids: list[int]) -> list[int]:
        if name is None:
            with model.disable_adapter():
                return hf_greedy(model, prompt_ids, NEW_TOKENS)
        model.set_adapter(name)
        return hf_greedy(model, prompt_ids, NEW_TOKENS)

    return greedy


def greedy_params() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def test_one_adapter_matches_peft(tiny_llama_dir, adapters, peft_reference):
    engine = make_engine(tiny_llama_dir, adapters={"a3": str(adapters["a3"])})
    ids = engine.tokenizer.encode("The quick brown fox jumps over", add_special_tokens=False)
    [[with_adapter]] = engine.generate([ids], greedy_params(), [["a3"]])
    [[base]] = engine.generate([ids], greedy_params())
    assert with_adapter.new_token_ids == peft_reference("a3", ids)
    assert with_adapter.new_token_ids != base.new_token_ids  # the adapter changes the output


def test_mixed_batch_with_staggered_arrivals_and_preemption(tiny_llama_dir, adapters, peft_reference):
    # 10 requests (8 adapters + 2 base), prompts of 3..70 tokens; 12 blocks of 16 tokens cannot hold
    # them all at once, so the scheduler must preempt and recompute.
    engine = make_engine(tiny_llama_dir, num_blocks=12, max_num_batched_tokens=48,
                         adapters={n: str(p) for n, p in adapters.items()})
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    requests = []
    for i, name in enumerate(list(adapters) + [None, None]):
        text = " ".join(words[(i + j) % len(words)] for j in range(3 + 7 * i))
        requests.append((f"r{i}", engine.tokenizer.encode(text, add_special_tokens=False), name))
    outputs: dict[str, list[int]] = {}
    pending = list(requests)
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:  # a new request joins every other step
            rid, ids, name = pending.pop(0)
            engine.add_request(rid, ids, greedy_params(), [name] if name else [])
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    assert engine.scheduler.num_preemptions > 0
    for rid, ids, name in requests:
        assert outputs[rid] == peft_reference(name, ids), (rid, name)
    assert engine.blocks.num_free == engine.num_blocks


def merged_reference(model_dir, parts):
    """HF model whose weights have each adapter's delta added: W += weight * scale * B[:, lo:hi] @ A[lo:hi]."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    for folder, weight, lo, hi in parts:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        r = cfg["r"]
        scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        tensors = load_file(folder / "adapter_model.safetensors")
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            hi_ = r if hi is None else hi
            with torch.no_grad():
                params[module + ".weight"] += weight * scale * b[:, lo:hi_] @ a[lo:hi_]
    return model


def test_weighted_mixture_equals_summed_deltas(tiny_llama_dir, adapters):
    engine = make_engine(tiny_llama_dir, adapters={"a0": str(adapters["a0"]), "a3": str(adapters["a3"])})
    ids = engine.tokenizer.encode("A mixture of experts says", add_special_tokens=False)
    [[mixed]] = engine.generate([ids], greedy_params(), [[("a0", 0.3), ("a3", 0.7)]])
    reference = merged_reference(tiny_llama_dir, [(adapters["a0"], 0.3, 0, None), (adapters["a3"], 0.7, 0, None)])
    assert mixed.new_token_ids == hf_greedy(reference, ids, NEW_TOKENS)
    [[only_a3]] = engine.generate([ids], greedy_params(), [["a3"]])
    assert mixed.new_token_ids != only_a3.new_token_ids


def test_rank_range_equals_truncated_adapter(tiny_llama_dir, adapters):
    engine = make_engine(tiny_llama_dir, adapters={"a3": str(adapters["a3"])})
    ids = engine.tokenizer.encode("Rank experts: only some of them", add_special_tokens=False)
    [[ranged]] = engine.generate([ids], greedy_params(), [[("a3", 1.0, 8, 40)]])
    reference = merged_reference(tiny_llama_dir, [(adapters["a3"], 1.0, 8, 40)])
    assert ranged.new_token_ids == hf_greedy(reference, ids, NEW_TOKENS)


def fused_reference(model_dir, parts):
    """HF model with W += (sum_i w_i s_i B_i) @ (sum_i w_i A_i), ranks zero-padded to the largest (LoraRetriever fusion)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    loaded = []
    for folder, weight in parts:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
        loaded.append((load_file(folder / "adapter_model.safetensors"), weight, scale))
    rank = max(t[k].shape[0] for t, _, _ in loaded for k in t if ".lora_A." in k)
    modules = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
               for t, _, _ in loaded for k in t if ".lora_A." in k}
    for module in modules:
        d_out, d_in = params[module + ".weight"].shape
        a_sum, b_sum = torch.zeros(rank, d_in), torch.zeros(d_out, rank)
        for tensors, weight, scale in loaded:
            key = "base_model.model." + module + ".lora_A.weight"
            if key in tensors:
                a, b = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
                a_sum[:a.shape[0]] += weight * a
                b_sum[:, :b.shape[1]] += weight * scale * b
        with torch.no_grad():
            params[module + ".weight"] += b_sum @ a_sum
    return model


def test_fusion_equals_averaged_matrices_and_differs_from_mixture(tiny_llama_dir, adapters):
    # Different ranks (4, 16), alphas, rsLoRA and module sets: padding and scales must be right.
    engine = make_engine(tiny_llama_dir, adapters={"a0": str(adapters["a0"]), "a7": str(adapters["a7"])})
    ids = engine.tokenizer.encode("Fused experts answer", add_special_tokens=False)
    fused_name = engine.store.fuse(["a0", "a7"], [0.4, 0.6])
    [[fused]] = engine.generate([ids], greedy_params(), [[fused_name]])
    assert fused.new_token_ids == hf_greedy(fused_reference(tiny_llama_dir, [(adapters["a0"], 0.4),
                                                                             (adapters["a7"], 0.6)]), ids, NEW_TOKENS)
    [[mixed]] = engine.generate([ids], greedy_params(), [[("a0", 0.4), ("a7", 0.6)]])
    assert mixed.new_token_ids != fused.new_token_ids
