"""bfloat16 on the CPU: our forward pass against transformers (and PEFT) run in bfloat16 too.

bfloat16 logits are rounded to 8 significant bits, and the tiny random
models' logits all lie near 0.6, where one bfloat16 step is 1/256: two tokens
often tie or sit one step apart, and which one wins then depends on GEMM
accumulation order (we decode one row from the KV cache; transformers
recomputes the whole prefix). So the check is teacher-forced: at every step
the token we pick scores within one bfloat16 step of transformers' best on the
same prefix. Where no two tokens are that close, this is equal greedy tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from loramux.engine import SamplingParams
from loramux.engine.cpu_features import cpu_flags, native_bf16_flag
from tests.conftest import bundled_reference_and_chat_prompts, make_engine, make_peft_adapter

PROMPTS = ["Hello there, how are you today?", "The capital of France is",
           "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25", "Once"]
NEW_TOKENS = 12
# Logprobs of SmolLM2's chosen tokens may differ from transformers' by this much: both run bfloat16 GEMMs
# (float32 accumulation, bfloat16 outputs) but ours reads the KV cache where transformers recomputes the prefix.
SMOLLM2_LOGPROB_TOLERANCE = 0.15

pytestmark = pytest.mark.skipif(native_bf16_flag(cpu_flags()) is None,
                                reason="bfloat16 without native CPU support is emulated and far too slow")


def assert_tokens_are_reference_argmaxes(reference, prompt_ids: list[int], tokens: list[int]) -> None:
    ids = list(prompt_ids)
    with torch.no_grad():
        for i, token in enumerate(tokens):
            logits = reference(torch.tensor([ids])).logits[0, -1]
            best = float(logits.max())
            one_step = 2.0 ** (math.floor(math.log2(abs(best))) - 7)  # bfloat16 keeps 8 significant bits
            assert best - float(logits[token]) <= one_step, \
                f"step {i}: we chose {token} ({float(logits[token])}), transformers' best is {best}"
            ids.append(token)


def greedy(engine, prompt_ids, adapters=None, logprobs=None):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=logprobs)
    return [outs[0] for outs in engine.generate(prompt_ids, params, adapters)]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_llama_tied_dir", "tiny_qwen2_dir"])
def test_tiny_models_match_transformers_in_bf16(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    engine = make_engine(model_dir, dtype="bfloat16")
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    prompt_ids = [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    assert engine.model.lm_head.dtype == engine.model.kv_caches[0][0].dtype == torch.bfloat16
    for ids, out in zip(prompt_ids, greedy(engine, prompt_ids)):
        assert_tokens_are_reference_argmaxes(reference, ids, out.new_token_ids)


def test_mixed_adapter_batch_matches_peft_in_bf16(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    specs = {"full": (16, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
             "attn": (8, 16, ["q_proj", "v_proj"])}
    paths = {n: make_peft_adapter(tiny_llama_dir, tmp_path / n, r, a, t, seed=i)
             for i, (n, (r, a, t)) in enumerate(specs.items())}
    engine = make_engine(tiny_llama_dir, dtype="bfloat16", adapters={n: str(p) for n, p in paths.items()})
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    reference = PeftModel.from_pretrained(base, paths["full"], adapter_name="full")
    reference.load_adapter(paths["attn"], adapter_name="attn")
    reference.eval()
    prompt_ids = [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:3]]
    names = ["full", "attn", None]
    outs = greedy(engine, prompt_ids, [[n] if n else [] for n in names])
    for name, ids, out in zip(names, prompt_ids, outs):
        if name is None:
            with reference.disable_adapter():
                assert_tokens_are_reference_argmaxes(reference, ids, out.new_token_ids)
        else:
            reference.set_adapter(name)
            assert_tokens_are_reference_argmaxes(reference, ids, out.new_token_ids)


@pytest.mark.slow  # transformers dequantises the GGUF on load: about a minute on 2 cores
def test_bundled_smollm2_logprobs_match_transformers_in_bf16():
    engine = make_engine(None, num_blocks=64, dtype="bfloat16")
    reference, prompt_ids = bundled_reference_and_chat_prompts(engine.tokenizer, torch.bfloat16)
    outs = greedy(engine, prompt_ids, logprobs=0)
    worst = 0.0
    for ids, out in zip(prompt_ids, outs):
        with torch.no_grad():
            logits = reference(torch.tensor([ids + out.new_token_ids])).logits[0, len(ids) - 1:-1].float()
        expected = logits.log_softmax(-1).gather(1, torch.tensor(out.new_token_ids)[:, None]).squeeze(1)
        got = torch.tensor([lp.logprob for lp in out.logprobs])
        worst = max(worst, float((got - expected).abs().max()))
    assert worst <= SMOLLM2_LOGPROB_TOLERANCE, worst
    assert "Paris" in outs[0].new_text
