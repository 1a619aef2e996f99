"""Random-init Llama checkpoints for GPU benchmarks and tests (no checkpoint travels to the GPU machine).

    python loadtest/random_model.py --config 1b --tokenizer TOKENIZER_DIR --out DIR [--device cuda]

Shapes (bf16, fixed seed): `1b` Llama-3.2-1B-like (hidden 2048, 16 layers,
GQA 32/8, intermediate 8192); `7b` Llama-2-7B-like (hidden 4096, 32 layers,
32 heads, intermediate 11008); `250m` (hidden 1024, 16 layers) for the paging
benchmark, whose 1,000 rank-64 slots must all fit at once; `tiny` for CPU
smoke runs of the GPU harness.
The tokenizer is borrowed (random models emit random ids; ids past the
tokenizer's vocabulary decode to nothing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

RANDOM_CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=50000),
    "250m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}


def write_random_model(folder: Path, config_name: str, tokenizer_dir: Path, device: str, seed: int = 0) -> Path:
    """A random-init Llama checkpoint (bf16 safetensors, one file per layer) with a borrowed tokenizer.

    Tensors are drawn on `device` and written shard by shard, which is much
    faster than initialising a 7B model through transformers on the CPU.
    """
    from transformers import AutoTokenizer, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**RANDOM_CONFIGS[config_name], max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    g = torch.Generator(device=device).manual_seed(seed)
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    def ones():
        return torch.ones(h, dtype=torch.bfloat16)

    weight_map: dict[str, str] = {}

    def save_shard(tensors: dict[str, torch.Tensor], name: str) -> None:
        save_file(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))

    save_shard({"model.embed_tokens.weight": rand(config.vocab_size, h), "lm_head.weight": rand(config.vocab_size, h),
                "model.norm.weight": ones()}, "model-embed.safetensors")
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        save_shard({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                    p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                    p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                    p + "mlp.down_proj.weight": rand(h, i), p + "input_layernorm.weight": ones(),
                    p + "post_attention_layernorm.weight": ones()}, f"model-{layer:03d}.safetensors")
    # The index transformers needs to load a sharded checkpoint.
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(RANDOM_CONFIGS), required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    write_random_model(args.out, args.config, args.tokenizer, args.device)


if __name__ == "__main__":
    main()
