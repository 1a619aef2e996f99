"""Per-layer gates of the composite requests in one step, written into the LoRA plan's coefficients.

A gated composite request (MoLE, MoR) runs with its N members as a plain
mix: its tokens have N plan assignments, member k in plan level k, each with
coefficient scale[slot]. Before decoder layer l runs, `CompositeGates.apply`
computes, on the device and only for the composite tokens,

    g = softmax over the allowed, top-k members of (W_g[l] · rmsnorm(x) / tau[l])    [Tc, M]

from the layer's input x, and writes coeff[row] = scale[slot] * g[token, k] into
plan level k (plain-adapter rows are multiplied by 1). Sizes depend only on the
step's rows, so nothing waits for the host; the kernels (torch and Triton)
read every row's `coeff` from the device tensor as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramux.composites.registry import CompositeRegistry, CompositeUse
from loramux.kernels import LoraPlan

RMS_EPS = 1e-6


@dataclass
class _CoefficientWrite:
    """Plan level k's coefficients as built (scale[slot]), and where each row's gate comes from."""

    coeff: torch.Tensor  # [N_k] the plan level's own tensor, overwritten per decoder layer
    base_coeff: torch.Tensor  # [N_k] as built
    source: torch.Tensor  # [N_k] row of g (Tc = "not a composite token": gate 1)


class CompositeGates:
    """The composite part of one step. Build with `build_composite_gates`."""

    def __init__(self, registry: CompositeRegistry, tokens: torch.Tensor, gate_index: torch.Tensor,
                 allowed: torch.Tensor, top_k: torch.Tensor, writes: list[_CoefficientWrite],
                 sampled: torch.Tensor, sampled_uses: list[CompositeUse]):
        self.registry = registry
        self.tokens = tokens  # [Tc] rows of x
        self.gate_index = gate_index  # [Tc] row of the registry's gate tensors
        self.allowed = allowed  # [Tc, M] member exists and is not masked
        self.top_k = top_k  # [Tc] members kept per token (M = all)
        self.writes = writes
        self.sampled = sampled  # [S] rows of g whose token is sampled this step
        self.sampled_uses = sampled_uses  # [S] their sequences' uses
        num_layers, max_members = registry.gate_inv_temperature.shape[1], registry.max_members
        self.sampled_gates = torch.zeros(num_layers, len(sampled_uses), max_members, device=tokens.device)
        self._gate_one = torch.ones(1, max_members, device=tokens.device)

    def gate_weights(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden], decoder layer `layer`'s input -> g: [Tc, M] float32 (rows sum to 1)."""
        r = self.registry
        xs = x.index_select(0, self.tokens).float()
        xs = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        weight = r.gate_weight[:, layer]  # [C, M, hidden]
        logits = (xs @ weight.reshape(-1, weight.shape[-1]).T).view(xs.shape[0], *weight.shape[:2])
        logits = logits[torch.arange(xs.shape[0], device=xs.device), self.gate_index]  # [Tc, M]
        logits = logits * r.gate_inv_temperature[self.gate_index, layer][:, None]
        logits = logits.masked_fill(~self.allowed, float("-inf"))
        kth = logits.sort(dim=1, descending=True).values.gather(1, self.top_k[:, None] - 1)
        return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=1)

    def apply(self, layer: int, x: torch.Tensor) -> None:
        """Fill every plan level's coefficients for decoder layer `layer` from its input x [T, hidden]."""
        g = self.gate_weights(layer, x)
        g_ext = torch.cat([g, self._gate_one])
        for k, w in enumerate(self.writes):
            column = g_ext[w.source, k]
            torch.mul(w.base_coeff, column, out=w.coeff)
        if self.sampled_uses:
            self.sampled_gates[layer] = g.index_select(0, self.sampled)

    def record_sampled(self) -> None:
        """After the step: add each sampled token's gates [L, N] to its sequence's statistics (one copy)."""
        if not self.sampled_uses:
            return
        gates = self.sampled_gates.cpu()
        for i, use in enumerate(self.sampled_uses):
            use.add_gates(gates[:, i, :len(use.members)])


def build_composite_gates(rows: list[tuple[int, int, CompositeUse, bool]], plan: LoraPlan, num_tokens: int,
                          registry: CompositeRegistry, device: torch.device) -> CompositeGates:
    """rows: (first row, number of rows, use, samples) of each gated composite sequence in the step.

    Returns the gates that rewrite the plan levels' `coeff` tensors in place.
    """
    max_members = registry.max_members
    tokens, index, allowed, top_k, sampled, sampled_uses = [], [], [], [], [], []
    for start, count, use, samples in rows:
        if samples:
            sampled.append(len(tokens) + count - 1)
            sampled_uses.append(use)
        tokens += range(start, start + count)
        index += [use.gate_index] * count
        mask = list(use.allowed) + [False] * (max_members - len(use.allowed))
        allowed += [mask] * count
        top_k += [min(use.top_k, len(use.members))] * count
    source = torch.full((num_tokens,), len(tokens), dtype=torch.int64)
    source[torch.tensor(tokens, dtype=torch.int64)] = torch.arange(len(tokens))
    source = source.to(device)
    depth = max(len(use.members) for _, _, use, _ in rows)
    writes = [_CoefficientWrite(level.coeff, level.coeff.clone(), source[level.token_idx])
              for level in plan.levels[:depth]]

    def on_device(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    return CompositeGates(registry, on_device(tokens, torch.int64), on_device(index, torch.int64),
                          on_device(allowed, torch.bool), on_device(top_k, torch.int64), writes,
                          on_device(sampled, torch.int64), sampled_uses)
