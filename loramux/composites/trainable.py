"""Trainable MoLE, MoR and MoRE composites over a transformers causal LM, applied with hooks.

Each composite is an nn.Module of float32 parameters that `attached(model)`
hooks into a (frozen, possibly bfloat16) transformers Llama-style model:

- a forward pre-hook on every decoder layer computes that layer's gate from the
  layer's input exactly as the engine does (loramux/composites/gates.py):
  g = softmax(W_g[l] · rmsnorm(x) / tau[l]), rmsnorm without a weight;
- a forward hook on every targeted projection adds the composite's delta
  (MoLE's per-projection gates, training only so far, are computed there, the
  same way from the projection's own input).

`tensors()` and `config()` give the contents of composite.safetensors and
loramux_composite.json in the format loramux/composites/format.py reads, so
what is trained here is what the engine serves.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from loramux.adapters_store.peft_format import LoraAdapter
from loramux.composites.gates import RMS_EPS
from loramux.config import LORA_TARGET_MODULES

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _projection(layer, module: str) -> nn.Linear:
    return getattr(layer.self_attn if module in ATTENTION_MODULES else layer.mlp, module)


def gate_softmax(x: torch.Tensor, weight: torch.Tensor, log_temperature: torch.Tensor) -> torch.Tensor:
    """x: [B, T, d], weight: [N, d], log_temperature: [] -> softmax(weight · rmsnorm(x) / tau): [B, T, N] float32."""
    xs = x.float()
    xs = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return torch.softmax(xs @ weight.T / log_temperature.exp(), dim=-1)


class LayerGates(nn.Module):
    """One gate per decoder layer over N members: W [L, N, hidden] and a learned temperature per layer."""

    def __init__(self, num_layers: int, num_members: int, hidden: int, init_std: float, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_layers, num_members, hidden, generator=generator) * init_std)
        self.log_temperature = nn.Parameter(torch.zeros(num_layers))

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden] the decoder layer's input -> g: [B, T, N] float32 (rows sum to 1)."""
        return gate_softmax(x, self.weight[layer], self.log_temperature[layer])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer in range(self.weight.shape[0]):
            out[f"layers.{layer}.gate.weight"] = self.weight[layer].detach().float()
            out[f"layers.{layer}.gate.temperature"] = self.log_temperature[layer].detach().exp().float()
        return out


class ProjectionGates(nn.Module):
    """One gate per (decoder layer, projection) over N members, reading the projection's own input:
    per module W [L, N, d_in] and a learned temperature per layer and module."""

    def __init__(self, num_layers: int, num_members: int, input_widths: dict[str, int], init_std: float,
                 generator: torch.Generator):
        super().__init__()
        self.targets = list(input_widths)
        self.weight = nn.ParameterDict({
            module: nn.Parameter(torch.randn(num_layers, num_members, d_in, generator=generator) * init_std)
            for module, d_in in input_widths.items()})
        self.log_temperature = nn.Parameter(torch.zeros(num_layers, len(input_widths)))

    def forward(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d_in] the projection's input -> g: [B, T, N] float32 (rows sum to 1)."""
        temperature = self.log_temperature[layer, self.targets.index(module)]
        return gate_softmax(x, self.weight[module][layer], temperature)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for m, module in enumerate(self.targets):
            for layer in range(self.weight[module].shape[0]):
                out[f"layers.{layer}.{module}.gate.weight"] = self.weight[module][layer].detach().float()
                out[f"layers.{layer}.{module}.gate.temperature"] = self.log_temperature[layer, m].detach().exp().float()
        return out


class HookedComposite(nn.Module):
    """Base of the trainable composites: the hooks, the gates seen in the last forward, the file contents."""

    kind = ""

    def __init__(self, num_layers: int, targets: tuple[str, ...]):
        super().__init__()
        self.num_layers = num_layers
        self.targets = targets
        self.gates: LayerGates | ProjectionGates | None = None
        self.last_gates: list[torch.Tensor] = []  # [B, T, N] per gate (layer or projection) of the last forward

    def delta(self, layer: int, module: str, x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """x: [B, T, d_in] float32, g: [B, T, N] or None -> the projection's added output [B, T, d_out]."""
        raise NotImplementedError

    @contextmanager
    def attached(self, model):
        """Hook the composite into `model` (a transformers causal LM) for the duration of the block."""
        handles, state = [], {}
        self.last_gates = []
        for l, layer in enumerate(model.model.layers):
            def pre(_, args, kwargs, l=l):
                hidden = args[0] if args else kwargs["hidden_states"]
                state["g"] = self.gates(l, hidden) if isinstance(self.gates, LayerGates) else None
                if state["g"] is not None:
                    self.last_gates.append(state["g"])
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            for module in self.targets:
                def post(_, inputs, out, l=l, module=module):
                    x = inputs[0].float()
                    g = state["g"]
                    if isinstance(self.gates, ProjectionGates):  # this projection's gate reads its own input
                        g = self.gates(l, module, x)
                        self.last_gates.append(g)
                    return out + self.delta(l, module, x, g).to(out.dtype)
                handles.append(_projection(layer, module).register_forward_hook(post))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def balance_loss(self, token_mask: torch.Tensor) -> torch.Tensor:
        """MoLE's gate balancing loss -log prod_i q_i, q_i = member i's mean gate weight over the last forward's
        layers and real tokens (token_mask [B, T], 1 = not padding)."""
        mask = token_mask.float()[..., None]
        q = torch.stack([(g * mask).sum((0, 1)) for g in self.last_gates]).mean(0) / mask.sum()
        return -q.clamp_min(1e-9).log().sum()


def _peft_tensor_key(layer: int, module: str, factor: str) -> str:
    return f"layers.{layer}.{module}.{factor}"


class TrainableMoLE(HookedComposite):
    """Learned gates over N frozen LoRA members: y += sum_i g_i s_i B_i A_i x, with g per decoder layer
    (`granularity` "layer", from the layer's input) or per projection ("projection", from its own input)."""

    kind = "mole"

    def __init__(self, members: dict[str, LoraAdapter], shapes: dict[str, tuple[int, int]], num_layers: int,
                 hidden: int, seed: int, granularity: str = "layer"):
        targets = tuple(m for m in LORA_TARGET_MODULES if any(m in a.target_modules for a in members.values()))
        super().__init__(num_layers, targets)
        self.member_names = list(members)
        self.granularity = granularity
        generator = torch.Generator().manual_seed(seed)
        if granularity == "layer":
            self.gates = LayerGates(num_layers, len(members), hidden, 0.01, generator)
        elif granularity == "projection":
            self.gates = ProjectionGates(num_layers, len(members), {m: shapes[m][1] for m in targets}, 0.01,
                                         generator)
        else:
            raise ValueError(f"MoLE gate granularity must be 'layer' or 'projection', not {granularity!r}")
        # Members are frozen buffers: per (layer, module) their A stacked along the rank [sum r, d_in], B along
        # the rank [d_out, sum r], and each rank row's member and scale, so one matmul pair serves all members.
        self._stacked: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for layer in range(num_layers):
            for module in targets:
                parts = [(i, a) for i, a in enumerate(members.values()) if (layer, module) in a.weights]
                if not parts:
                    continue
                a_cat = torch.cat([a.weights[(layer, module)][0].float() for _, a in parts])
                b_cat = torch.cat([a.weights[(layer, module)][1].float() for _, a in parts], dim=1)
                index = torch.cat([torch.full((a.rank,), i) for i, a in parts])
                scale = torch.cat([torch.full((a.rank,), a.scale) for _, a in parts])
                self._stacked[(layer, module)] = (a_cat, b_cat, index, scale)

    def delta(self, layer, module, x, g):
        if (layer, module) not in self._stacked:
            return torch.zeros((), dtype=x.dtype)
        a, b, index, scale = self._stacked[(layer, module)]
        return ((x @ a.T) * g.index_select(-1, index) * scale) @ b.T

    def tensors(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The gates, float32 whatever `dtype`: MoLE ships no factors of its own (its members are experts)."""
        return self.gates.tensors()

    def config(self) -> dict:
        return {"type": "mole", "members": self.member_names, "gate": {"granularity": self.granularity, "top_k": 0}}


class SharedLora(nn.Module):
    """One LoRA per (layer, module): A [r, d_in] (PEFT's Kaiming-uniform init) and B [d_out, r] = 0."""

    def __init__(self, shapes: dict[str, tuple[int, int]], num_layers: int, targets: tuple[str, ...], rank: int,
                 generator: torch.Generator):
        super().__init__()
        self.rank, self.targets = rank, targets
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for layer in range(num_layers):
            for module in targets:
                d_out, d_in = shapes[module]
                bound = 1 / d_in ** 0.5  # kaiming_uniform_(a=sqrt(5)) as PEFT
                key = f"{layer}_{module}"
                self.lora_A[key] = nn.Parameter((torch.rand(rank, d_in, generator=generator) * 2 - 1) * bound)
                self.lora_B[key] = nn.Parameter(torch.zeros(d_out, rank))

    def factors(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = f"{layer}_{module}"
        return self.lora_A[key], self.lora_B[key]

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for key in self.lora_A:
            layer, module = key.split("_", 1)
            out[_peft_tensor_key(int(layer), module, "lora_A")] = self.lora_A[key].detach().to(dtype)
            out[_peft_tensor_key(int(layer), module, "lora_B")] = self.lora_B[key].detach().to(dtype)
        return out


class TrainableMoR(HookedComposite):
    """One shared LoRA, N experts of rank- and output-scaling vectors, a router per layer:
    y += s sum_i g_i diag(lambda_B_i) B diag(lambda_A_i) A x."""

    kind = "mor"

    def __init__(self, shapes: dict[str, tuple[int, int]], num_layers: int, hidden: int, targets: tuple[str, ...],
                 num_experts: int, rank: int, seed: int):
        super().__init__(num_layers, targets)
        generator = torch.Generator().manual_seed(seed)
        self.scale = 2.0  # lora_alpha = 2 r, as the demo experts
        self.lora = SharedLora(shapes, num_layers, targets, rank, generator)
        self.gates = LayerGates(num_layers, num_experts, hidden, 0.01, generator)
        # lambdas start near 1, a little apart so that the experts (and their gradients) differ
        self.lambda_A, self.lambda_B = nn.ParameterDict(), nn.ParameterDict()
        for layer in range(num_layers):
            for module in targets:
                key = f"{layer}_{module}"
                self.lambda_A[key] = nn.Parameter(1 + 0.1 * torch.randn(num_experts, rank, generator=generator))
                self.lambda_B[key] = nn.Parameter(1 + 0.1 * torch.randn(num_experts, shapes[module][0],
                                                                       generator=generator))

    def delta(self, layer, module, x, g):
        a, b = self.lora.factors(layer, module)
        key = f"{layer}_{module}"
        # sum_i g_i lambda_B_i * (B (lambda_A_i * h)) = [g_i lambda_A_i h]_(i,j) @ [lambda_B_i[d] B[d, j]]^T:
        # one matmul over N * r columns instead of N outputs of width d_out.
        h = x @ a.T  # [B, T, r]
        weighted = (g[..., :, None] * self.lambda_A[key] * h[..., None, :]).flatten(-2)  # [B, T, N * r]
        expert_b = (self.lambda_B[key][:, :, None] * b[None]).permute(1, 0, 2).flatten(1)  # [d_out, N * r]
        return self.scale * weighted @ expert_b.T

    def tensors(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        out = self.lora.tensors(dtype) | self.gates.tensors()
        for key in self.lambda_A:
            layer, module = key.split("_", 1)
            out[_peft_tensor_key(int(layer), module, "lambda_A")] = self.lambda_A[key].detach().to(dtype)
            out[_peft_tensor_key(int(layer), module, "lambda_B")] = self.lambda_B[key].detach().to(dtype)
        return out

    def config(self) -> dict:
        return {"type": "mor", "num_experts": self.gates.weight.shape[1], "rank": self.lora.rank,
                "lora_alpha": self.scale * self.lora.rank, "target_modules": list(self.targets),
                "gate": {"granularity": "layer", "top_k": 0}}


class TrainableMoRE(HookedComposite):
    """One shared LoRA whose rank prefixes are the experts; per module a selector over `rank_choices` reads a
    learned task embedding. Training picks the argmax rank with a straight-through gradient, so the forward is
    the one the engine serves (rank fixed per task and module)."""

    kind = "more"

    def __init__(self, shapes: dict[str, tuple[int, int]], num_layers: int, hidden: int, targets: tuple[str, ...],
                 rank: int, rank_choices: list[int], tasks: list[str], embedding_dim: int, seed: int):
        super().__init__(num_layers, targets)
        generator = torch.Generator().manual_seed(seed)
        self.scale = 2.0
        self.rank_choices, self.tasks = rank_choices, tasks
        self.lora = SharedLora(shapes, num_layers, targets, rank, generator)
        self.task_embeddings = nn.Parameter(torch.randn(len(tasks), embedding_dim, generator=generator))
        self.selectors = nn.ParameterDict({
            f"{layer}_{module}": nn.Parameter(torch.randn(len(rank_choices), embedding_dim, generator=generator) * 0.1)
            for layer in range(num_layers) for module in targets})
        # prefix masks of the choices [C, r]; the contrastive term's projection of token states (training only)
        self.register_buffer("prefixes", (torch.arange(rank)[None] < torch.tensor(rank_choices)[:, None]).float())
        self.state_projection = nn.Linear(hidden, embedding_dim, bias=False)
        self.batch_tasks = torch.zeros(0, dtype=torch.long)  # [B] task of each row, set before a forward

    def rank_mask(self, layer: int, module: str) -> torch.Tensor:
        """[B, r]: the selected prefix per row (hard), with the selector's softmax gradient (straight-through)."""
        probs = torch.softmax(self.task_embeddings[self.batch_tasks] @ self.selectors[f"{layer}_{module}"].T, -1)
        hard = nn.functional.one_hot(probs.argmax(-1), len(self.rank_choices)).float()
        return (hard + probs - probs.detach()) @ self.prefixes

    def delta(self, layer, module, x, g):
        a, b = self.lora.factors(layer, module)
        return self.scale * ((x @ a.T) * self.rank_mask(layer, module)[:, None, :]) @ b.T

    def contrastive_loss(self, states: torch.Tensor, token_mask: torch.Tensor, temperature: float = 0.1
                         ) -> torch.Tensor:
        """InfoNCE between each row's mean token state [B, hidden] (projected) and the task embeddings."""
        mask = token_mask.float()[..., None]
        pooled = (states.float() * mask).sum(1) / mask.sum(1)
        z = nn.functional.normalize(self.state_projection(pooled), dim=-1)
        e = nn.functional.normalize(self.task_embeddings, dim=-1)
        return nn.functional.cross_entropy(z @ e.T / temperature, self.batch_tasks)

    def tensors(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        out = self.lora.tensors(dtype)
        out["task_embeddings"] = self.task_embeddings.detach().float()
        for key, selector in self.selectors.items():
            layer, module = key.split("_", 1)
            out[_peft_tensor_key(int(layer), module, "selector")] = selector.detach().float()
        return out

    def config(self) -> dict:
        return {"type": "more", "rank": self.lora.rank, "lora_alpha": self.scale * self.lora.rank,
                "target_modules": list(self.targets), "rank_choices": self.rank_choices, "tasks": self.tasks,
                "default_task": self.tasks[0]}

    def selected_ranks(self) -> dict[str, dict[str, int]]:
        """task -> rank choice -> number of modules that use it (what the engine will serve)."""
        with torch.no_grad():
            picks = torch.stack([(self.task_embeddings @ s.T).argmax(-1) for s in self.selectors.values()])  # [M, T]
        return {task: {str(c): int((picks[:, t] == i).sum()) for i, c in enumerate(self.rank_choices)}
                for t, task in enumerate(self.tasks)}
