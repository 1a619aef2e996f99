"""Shared fixtures: tiny random-init checkpoints, random PEFT adapters, engines."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from loramux.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine
from loramux.engine.loader import load_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Parametrise device-agnostic tests with these: the CPU in the default suite, CUDA under `-m gpu`.
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory) -> Path:
    """The bundled model's tokenizer files, for the tiny checkpoints built below.

    LORAMUX_TEST_TOKENIZER names a folder with them instead (the GPU machine
    has no room for the bundled GGUF; loadtest/run_gpu.sh carries the files).
    """
    if os.environ.get("LORAMUX_TEST_TOKENIZER"):
        return Path(os.environ["LORAMUX_TEST_TOKENIZER"])
    checkpoint = load_checkpoint(None)
    out = tmp_path_factory.mktemp("tokenizer")
    checkpoint.tokenizer.save_pretrained(out)
    return out


def build_tiny_checkpoint(out: Path, tokenizer_dir: Path, model_type: str, tie: bool, seed: int) -> Path:
    """A 2-layer random-init model with GQA and the SmolLM2 vocabulary, saved as an HF folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[model_type]
    config = config_cls(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_type == "qwen2":  # random biases, so that a bias bug cannot hide behind zeros
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), smollm_tokenizer_dir, "llama", False, 0)


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama-tied"), smollm_tokenizer_dir, "llama", True, 1)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), smollm_tokenizer_dir, "qwen2", False, 2)


def make_peft_adapter(model_dir: Path, out: Path, rank: int, alpha: float, targets: list[str], seed: int,
                      use_rslora: bool = False) -> Path:
    """A PEFT LoRA adapter with random A and B (PEFT's default B = 0 would test nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                 init_lora_weights=False, use_rslora=use_rslora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5 / rank ** 0.5)
    peft_model.save_pretrained(out)
    return out


def make_engine(model_dir: Path | None, num_blocks: int | None = 256, max_num_batched_tokens: int = 256,
                max_loras: int = 16, max_loras_per_batch: int = 16, prefix_caching: bool = True,
                adapters: dict[str, str] | None = None, max_num_seqs: int = 32,
                attention_backend: str = "auto", dtype: str = "float32", max_mor_experts: int | None = None,
                lora_backend: str = "auto") -> Engine:
    """An engine on the CPU; float32 unless asked, since the exactness tests compare with float32 references
    (`--dtype auto` would pick bfloat16 on a CPU with native bfloat16)."""
    return Engine(EngineConfig(
        model=ModelConfig(model=None if model_dir is None else str(model_dir), dtype=dtype,
                          attention_backend=attention_backend),
        cache=CacheConfig(num_blocks=num_blocks, block_size=16, enable_prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  max_loras_per_batch=max_loras_per_batch),
        store=StoreConfig(max_loras=max_loras, max_lora_rank=64, adapters=adapters or {},
                          max_mor_experts=max_mor_experts, lora_backend=lora_backend),
    ))


def bundled_reference_and_chat_prompts(tokenizer, dtype: torch.dtype) -> tuple[torch.nn.Module, list[list[int]]]:
    """The bundled SmolLM2 GGUF loaded by transformers itself (the reference), and two one-turn chat prompts as
    token ids rendered by `tokenizer`; the first asks for the capital of France."""
    from transformers import AutoModelForCausalLM

    from loramux.engine.loader import default_model_path

    path = default_model_path()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                             tokenize=False)
               for c in ("What is the capital of France?", "Write one sentence about the sea.")]
    return reference, [tokenizer.encode(p, add_special_tokens=False) for p in prompts]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation from a transformers (or PEFT) model: full forward, argmax, repeat (EOS ignored)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]



def metric_values(server) -> dict[tuple, float]:
    """A running server's /metrics as {(sample name, sorted labels): value}, parsed by prometheus_client."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
