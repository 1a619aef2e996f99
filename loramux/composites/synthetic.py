"""Random composite experts for tests and benchmarks (never for serving): gates, shared factors, selectors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramux.adapters_store.registry import COMPOSITE_CONFIG_FILE
from loramux.composites.format import COMPOSITE_WEIGHTS_FILE


def _write(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / COMPOSITE_WEIGHTS_FILE)
    (folder / COMPOSITE_CONFIG_FILE).write_text(json.dumps(config))
    return folder


def _gates(g: torch.Generator, num_layers: int, num_members: int, hidden: int, gate_std: float) -> dict:
    out = {}
    for layer in range(num_layers):
        out[f"layers.{layer}.gate.weight"] = torch.randn(num_members, hidden, generator=g) * gate_std
        out[f"layers.{layer}.gate.temperature"] = torch.rand((), generator=g) + 0.5
    return out


def _shared(g: torch.Generator, target_shapes: dict, num_layers: int, rank: int, targets, b_std: float) -> dict:
    out = {}
    for layer in range(num_layers):
        for module in targets:
            d_out, d_in = target_shapes[module]
            out[f"layers.{layer}.{module}.lora_A"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            out[f"layers.{layer}.{module}.lora_B"] = torch.randn(d_out, rank, generator=g) * b_std
    return out


def write_random_mole(folder: Path, members: list, num_layers: int, hidden: int, seed: int, top_k: int = 0,
                      gate_std: float = 0.3) -> Path:
    """members: adapter names or {"name", "path"} entries; a random gate per decoder layer."""
    g = torch.Generator().manual_seed(seed)
    return _write(folder, {"type": "mole", "members": members, "gate": {"granularity": "layer", "top_k": top_k},
                           "card": {"description": "random MoLE", "examples": ["hello"]}},
                  _gates(g, num_layers, len(members), hidden, gate_std))


def write_random_mor(folder: Path, target_shapes: dict, num_layers: int, hidden: int, num_experts: int, rank: int,
                     seed: int, targets=("q_proj", "v_proj", "down_proj"), b_std: float = 0.05) -> Path:
    """Shared A/B with random lambda_A [N, r], lambda_B [N, d_out] and a random router per layer."""
    g = torch.Generator().manual_seed(seed)
    tensors = _shared(g, target_shapes, num_layers, rank, targets, b_std) | _gates(g, num_layers, num_experts,
                                                                                  hidden, 0.3)
    for layer in range(num_layers):
        for module in targets:
            tensors[f"layers.{layer}.{module}.lambda_A"] = torch.rand(num_experts, rank, generator=g) * 2
            tensors[f"layers.{layer}.{module}.lambda_B"] = torch.rand(num_experts, target_shapes[module][0],
                                                                      generator=g) * 2
    return _write(folder, {"type": "mor", "num_experts": num_experts, "rank": rank, "lora_alpha": 2 * rank,
                           "target_modules": list(targets)}, tensors)


def write_random_more(folder: Path, target_shapes: dict, num_layers: int, rank: int, rank_choices: list[int],
                      tasks: list[str], seed: int, targets=("q_proj", "k_proj", "o_proj", "up_proj"),
                      embedding_dim: int = 8, b_std: float = 0.05) -> Path:
    """A shared rank-`rank` LoRA; random task embeddings and per-module selectors over `rank_choices`."""
    g = torch.Generator().manual_seed(seed)
    tensors = _shared(g, target_shapes, num_layers, rank, targets, b_std)
    tensors["task_embeddings"] = torch.randn(len(tasks), embedding_dim, generator=g)
    for layer in range(num_layers):
        for module in targets:
            tensors[f"layers.{layer}.{module}.selector"] = torch.randn(len(rank_choices), embedding_dim, generator=g)
    return _write(folder, {"type": "more", "rank": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
                           "rank_choices": rank_choices, "tasks": tasks, "default_task": tasks[0]}, tensors)
