"""Per-layer gates of the composite requests in one step, written into the LoRA plan's coefficients.

A gated composite request (MoLE, MoR) runs with its N members as a plain
mix: its tokens have N plan assignments, member k in plan level k (or, in a
flat plan, N rows of its one level, `mix_index` k), each with coefficient
scale[slot]. Before decoder layer l runs, `CompositeGates.apply` computes, on
the device, for the rows the gate runs for,

    g = softmax over the allowed, top-k members of (W_g[l] · rmsnorm(x) / tau[l])    [Tc, M]

from the layer's input x, and writes coeff[row] = scale[slot] * g[token, k] into
the plan (rows whose token has no gate are multiplied by 1). Every size is
fixed when the gates are built and nothing is read back to the host, so the
same code runs eagerly (Tc = the composite tokens) and inside a captured
decode graph (Tc = the graph's batch rows, see `loramux.engine.cuda_graphs`);
the kernels (torch and Triton) read every row's `coeff` from the device tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramux.composites.registry import CompositeRegistry, CompositeUse
from loramux.kernels import LoraPlan

RMS_EPS = 1e-6


@dataclass
class CoefficientWrite:
    """A plan level's coefficients as built (scale[slot]), and where each row's gate comes from."""

    coeff: torch.Tensor  # [N_k] the plan level's own tensor, overwritten per decoder layer
    base_coeff: torch.Tensor  # [N_k] as built
    source: torch.Tensor  # [N_k] row of g; Tc (one past the last) = "no gate": factor 1
    member: torch.Tensor | int  # [N_k] (or one for the whole level) column of g: the row's member


class CompositeGates:
    """The gates of one step (or of a captured decode graph).

    Tensors (Tc = rows the gate runs for, M = the member cap, L = decoder layers, S = kept rows):
      tokens:     [Tc] int64  rows of x
      gate_index: [Tc] int64  row of the registry's gate tensors
      allowed:    [Tc, M] bool  member exists and is not masked (a row needs one allowed member)
      top_k:      [Tc] int64  members kept per token (M = all)
      sampled:    [S] int64   rows of g whose gates `gate_log` keeps
      gate_log:   [L, S, M] float32, filled during the forward pass
    `sampled_uses`: (index into S, the sequence's use) for `record_sampled`.
    """

    def __init__(self, registry: CompositeRegistry, tokens: torch.Tensor, gate_index: torch.Tensor,
                 allowed: torch.Tensor, top_k: torch.Tensor, writes: list[CoefficientWrite], sampled: torch.Tensor,
                 gate_log: torch.Tensor, sampled_uses: list[tuple[int, CompositeUse]]):
        self.registry = registry
        self.tokens = tokens
        self.gate_index = gate_index
        self.allowed = allowed
        self.top_k = top_k
        self.writes = writes
        self.sampled = sampled
        self.gate_log = gate_log
        self.sampled_uses = sampled_uses
        self._gate_one = torch.ones(1, registry.max_members, device=tokens.device)

    def gate_weights(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden], decoder layer `layer`'s input -> g: [Tc, M] float32 (rows sum to 1)."""
        r = self.registry
        xs = x.index_select(0, self.tokens).float()
        xs = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        weight = r.gate_weight[:, layer]  # [C, M, hidden]
        logits = (xs @ weight.reshape(-1, weight.shape[-1]).T).view(xs.shape[0], *weight.shape[:2])
        logits = logits.gather(1, self.gate_index[:, None, None].expand(-1, 1, weight.shape[1])).squeeze(1)
        logits = logits * r.gate_inv_temperature[self.gate_index, layer][:, None]
        logits = logits.masked_fill(~self.allowed, float("-inf"))
        # Masked top-k over the fixed M: the k-th largest logit of each row, whatever its k.
        kth = logits.sort(dim=1, descending=True).values.gather(1, self.top_k[:, None] - 1)
        return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=1)

    def apply(self, layer: int, x: torch.Tensor) -> None:
        """Fill every plan level's coefficients for decoder layer `layer` from its input x [T, hidden]."""
        g = self.gate_weights(layer, x)
        g_ext = torch.cat([g, self._gate_one])
        for w in self.writes:
            torch.mul(w.base_coeff, g_ext[w.source, w.member], out=w.coeff)
        torch.index_select(g, 0, self.sampled, out=self.gate_log[layer])

    def take_log(self, gate_log: torch.Tensor) -> None:
        """Copy the kept gates out of a decode graph's log [L, B, M] (one row per batch row) into ours."""
        self.gate_log.copy_(gate_log.index_select(1, self.tokens.index_select(0, self.sampled)))

    def record_sampled(self) -> None:
        """After the step: add each sampled token's gates [L, N] to its sequence's statistics (one copy)."""
        if not self.sampled_uses:
            return
        gates = self.gate_log.cpu()
        for i, use in self.sampled_uses:
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
            sampled_uses.append((len(sampled), use))
            sampled.append(len(tokens) + count - 1)
        tokens += range(start, start + count)
        index += [use.gate_index] * count
        mask = list(use.allowed) + [False] * (max_members - len(use.allowed))
        allowed += [mask] * count
        top_k += [min(use.top_k, len(use.members))] * count
    source = torch.full((num_tokens,), len(tokens), dtype=torch.int64)
    source[torch.tensor(tokens, dtype=torch.int64)] = torch.arange(len(tokens))
    source = source.to(device)
    depth = max(len(use.members) for _, _, use, _ in rows)
    # A plain row deeper in its mix than M has no gate (source Tc, whose g row is all ones): any column does.
    writes = [CoefficientWrite(level.coeff, level.coeff.clone(), source[level.token_idx],
                               level.mix_index.clamp(max=max_members - 1)) for level in plan.levels[:depth]]

    def on_device(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    gate_log = torch.zeros(registry.gate_inv_temperature.shape[1], len(sampled), max_members, device=device)
    return CompositeGates(registry, on_device(tokens, torch.int64), on_device(index, torch.int64),
                          on_device(allowed, torch.bool), on_device(top_k, torch.int64), writes,
                          on_device(sampled, torch.int64), gate_log, sampled_uses)
