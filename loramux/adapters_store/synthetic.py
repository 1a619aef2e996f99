"""Random PEFT adapters for benchmarks, load tests and tests (never for serving)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramux.config import LORA_TARGET_MODULES

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_random_adapter(folder: Path, target_shapes: dict[str, tuple[int, int]], num_layers: int, rank: int,
                         seed: int, targets=LORA_TARGET_MODULES, alpha: float | None = None,
                         b_std: float = 0.01) -> Path:
    """A PEFT LoRA folder with random A [r, d_in] and B [d_out, r] on `targets` of every layer."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for module in targets:
            d_out, d_in = target_shapes[module]
            part = "self_attn" if module in ATTENTION_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * b_std
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank, "target_modules": list(targets),
        "bias": "none", "task_type": "CAUSAL_LM", "lora_dropout": 0.0}))
    return folder
