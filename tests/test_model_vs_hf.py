"""Greedy tokens of our forward pass equal those of Hugging Face transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loramux.engine import SamplingParams
from tests.conftest import bundled_reference_and_chat_prompts, hf_greedy, make_engine

PROMPTS = [
    "Hello there, how are you today?",
    "The capital of France is",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25",
    "Once",
]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_llama_tied_dir", "tiny_qwen2_dir"])
def test_tiny_models_match_transformers(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    engine = make_engine(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt_ids = [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    outs = engine.generate(prompt_ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for ids, out in zip(prompt_ids, outs):
        assert out[0].new_token_ids == hf_greedy(reference, ids, 12)
    assert engine.blocks.num_free == engine.num_blocks  # every block back once all requests ended


def test_bundled_smollm2_matches_transformers_gguf_loading():
    engine = make_engine(None, num_blocks=64)
    reference, prompt_ids = bundled_reference_and_chat_prompts(engine.tokenizer, torch.float32)
    outs = engine.generate(prompt_ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for ids, out in zip(prompt_ids, outs):
        assert out[0].new_token_ids == hf_greedy(reference, ids, 16)
    assert "Paris" in outs[0][0].new_text
