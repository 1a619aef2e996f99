"""Llama-family decoder (Llama, SmolLM, Mistral, Qwen2) over a paged KV cache.

Our own forward pass, so that the paged cache and the per-step LoRA plan fit:
q/k/v and gate/up are fused into one matmul each and every projection is a
`LoraLinear`. Weights keep Hugging Face names on the way in (`load_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PretrainedConfig

from loramux.engine import dense_gemm
from loramux.engine.attention import AttentionBackend, AttentionMetadata
from loramux.engine.layer_ops import LayerOps, Rope
from loramux.engine.lora_linear import LoraLinear
from loramux.kernels import LoraBackend, LoraPlan

if TYPE_CHECKING:
    from loramux.composites.gates import CompositeGates

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
NO_LORA = LoraPlan(levels=())


@dataclass
class StepContext:
    """Everything one forward pass needs besides the tokens, built once per step."""

    attention: AttentionMetadata
    lora_plan: LoraPlan
    composite: "CompositeGates | None" = None  # fills lora_plan's coefficients per decoder layer


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that adapters and the KV cache are checked against."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None
    qkv_bias: bool

    @classmethod
    def from_hf_config(cls, config: PretrainedConfig) -> "ModelShape":
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {config.model_type!r} is not supported; "
                             f"loramux serves {', '.join(SUPPORTED_MODEL_TYPES)}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        window = getattr(config, "sliding_window", None)
        if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=window,
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        )

    def lora_target_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every LoRA-targetable projection."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def rope_inv_freq(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies [head_dim / 2] and attention scaling, as the config asks."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float(), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables [max_pos, head_dim], looked up by position once per forward pass."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int, dtype: torch.dtype):
        super().__init__()
        inv_freq, scaling = rope_inv_freq(config, head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", (emb.cos() * scaling).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> Rope:
        """positions: [T] -> (cos, sin), each [T, 1, D]: every decoder layer rotates with the same pair."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, ops: LayerOps):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.rms_norm = ops.rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, d] -> [T, d]."""
        return self.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape, qkv: LoraLinear, o_proj: LoraLinear, attend: AttentionBackend,
                 ops: LayerOps):
        super().__init__()
        self.shape = shape
        self.qkv_proj = qkv
        self.o_proj = o_proj
        self.attend = attend
        self.rotate = ops.rotate

    def forward(self, x: torch.Tensor, rope: Rope, kv_cache: tuple[torch.Tensor, torch.Tensor],
                ctx: StepContext) -> torch.Tensor:
        s = self.shape
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q, k, v = self.qkv_proj(x, ctx.lora_plan).split([q_size, kv_size, kv_size], dim=-1)
        q = self.rotate(q.view(-1, s.num_heads, s.head_dim), rope)
        k = self.rotate(k.view(-1, s.num_kv_heads, s.head_dim), rope)
        out = self.attend(q, k, v.view(-1, s.num_kv_heads, s.head_dim), *kv_cache, ctx.attention)
        return self.o_proj(out.reshape(-1, q_size), ctx.lora_plan)

    def forward_dense(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Causal attention over one whole sequence, no KV cache and no LoRA; x: [T, d] -> [T, d]."""
        s = self.shape
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q, k, v = self.qkv_proj(x, NO_LORA).split([q_size, kv_size, kv_size], dim=-1)
        q = self.rotate(q.view(-1, s.num_heads, s.head_dim), rope)
        k = self.rotate(k.view(-1, s.num_kv_heads, s.head_dim), rope)
        v = v.view(-1, s.num_kv_heads, s.head_dim)
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(0, 1).reshape(-1, q_size), NO_LORA)


class MLP(nn.Module):
    def __init__(self, gate_up: LoraLinear, down: LoraLinear, ops: LayerOps):
        super().__init__()
        self.gate_up_proj = gate_up
        self.down_proj = down
        self.silu_mul = ops.silu_mul

    def forward(self, x: torch.Tensor, plan: LoraPlan) -> torch.Tensor:
        return self.down_proj(self.silu_mul(self.gate_up_proj(x, plan)), plan)


class DecoderLayer(nn.Module):
    def __init__(self, attn: Attention, mlp: MLP, input_norm: RMSNorm, post_norm: RMSNorm):
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = input_norm
        self.post_attention_layernorm = post_norm

    def forward(self, x, rope, kv_cache, ctx):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.lora_plan)

    def forward_dense(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """The base layer alone over one whole sequence (no KV cache, no LoRA)."""
        x = x + self.self_attn.forward_dense(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x), NO_LORA)


class CausalLM(nn.Module):
    """The decoder stack plus the LM head.

    `kv_caches[i]` is layer i's (k_cache, v_cache), each [num_slots, Hkv, D],
    attached by the engine once the block budget is known.
    """

    def __init__(self, config: PretrainedConfig, weights: dict[str, torch.Tensor], backend: LoraBackend,
                 max_positions: int, dtype: torch.dtype, device: torch.device, attention_backend: AttentionBackend,
                 layer_ops: LayerOps):
        super().__init__()
        self.shape = s = ModelShape.from_hf_config(config)

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ValueError(f"checkpoint has no tensor {name!r}")
            return weights.pop(name).to(device=device, dtype=dtype)

        def take_optional(name: str) -> torch.Tensor | None:
            return take(name) if name in weights else None

        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.rotary = RotaryEmbedding(config, s.head_dim, max_positions, dtype).to(device)
        layers = []
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            qkv_bias = None
            if s.qkv_bias:
                qkv_bias = torch.cat([take(p + f"self_attn.{n}.bias") for n in ("q_proj", "k_proj", "v_proj")])
            qkv = LoraLinear(
                torch.cat([take(p + f"self_attn.{n}.weight") for n in ("q_proj", "k_proj", "v_proj")]), qkv_bias,
                ("q_proj", "k_proj", "v_proj"), (q, kv, kv), backend)
            o_proj = LoraLinear(take(p + "self_attn.o_proj.weight"), take_optional(p + "self_attn.o_proj.bias"),
                                ("o_proj",), (s.hidden_size,), backend)
            gate_up = LoraLinear(
                torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]), None,
                ("gate_proj", "up_proj"), (s.intermediate_size, s.intermediate_size), backend)
            down = LoraLinear(take(p + "mlp.down_proj.weight"), None, ("down_proj",), (s.hidden_size,), backend)
            layers.append(DecoderLayer(
                Attention(s, qkv, o_proj, attention_backend, layer_ops), MLP(gate_up, down, layer_ops),
                RMSNorm(take(p + "input_layernorm.weight"), config.rms_norm_eps, layer_ops),
                RMSNorm(take(p + "post_attention_layernorm.weight"), config.rms_norm_eps, layer_ops)))
        self.layers = nn.ModuleList(layers)
        self.embed_tokens = nn.Parameter(take("model.embed_tokens.weight"), requires_grad=False)
        self.norm = RMSNorm(take("model.norm.weight"), config.rms_norm_eps, layer_ops)
        if getattr(config, "tie_word_embeddings", False):
            weights.pop("lm_head.weight", None)
        lm_head = take_optional("lm_head.weight")
        self.lm_head = self.embed_tokens if lm_head is None else nn.Parameter(lm_head, requires_grad=False)
        if dense_gemm.packs_weights(device, dtype):
            # a tied LM head gets a packed copy: the embedding lookup needs the plain table
            self.lm_head = nn.Parameter(dense_gemm.prepack(self.lm_head), requires_grad=False)
            for _, module in self.lora_linears():
                module.weight = nn.Parameter(dense_gemm.prepack(module.weight), requires_grad=False)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def lora_linears(self) -> list[tuple[int, LoraLinear]]:
        """(layer index, module) of every LoRA-aware projection."""
        out = []
        for i, layer in enumerate(self.layers):
            out += [(i, layer.self_attn.qkv_proj), (i, layer.self_attn.o_proj),
                    (i, layer.mlp.gate_up_proj), (i, layer.mlp.down_proj)]
        return out

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext,
                logit_rows: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; logit_rows: [B] rows to score -> logits [B, vocab] (float32)."""
        x = self.embed_tokens[input_ids]
        rope = self.rotary(positions)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, self.kv_caches)):
            if ctx.composite is not None:
                ctx.composite.apply(i, x)
            x = layer(x, rope, kv_cache, ctx)
        x = self.norm(x[logit_rows])
        return dense_gemm.linear(x, self.lm_head).float()

    @torch.inference_mode()
    def final_hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The base model's normed last-layer states of one sequence: input_ids [T] -> [T, hidden].

        Runs beside the step loop (the router embeds with it): it reads the
        weights only and touches neither the KV cache nor the adapter slots.
        """
        rope = self.rotary(torch.arange(input_ids.shape[0], device=input_ids.device))
        x = self.embed_tokens[input_ids]
        for layer in self.layers:
            x = layer.forward_dense(x, rope)
        return self.norm(x)
