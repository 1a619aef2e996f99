"""Attention over the paged KV cache, behind one backend chosen at start-up.

The flat batch of a step holds the decode tokens first (one per sequence),
then each prefill chunk as a contiguous run. `AttentionMetadata` is built once
per step and shared by every layer: the slot each new token's K/V is written
to, every sequence's block table and context length, and where its queries
start. Backends:

- `triton` (CUDA): paged kernels that read K/V through the block table; a
  decode-only step reads nothing but device tensors, so a CUDA graph captured
  for a batch size serves every context length.
- `torch`: the reference kernels (same signatures, a loop over sequences).
- `sdpa` (the CPU path): gathers each step's context and runs batched
  SDPA per prefill span; its gather indices (`SdpaPlan`) are built once per
  step. Decode gathers whole cache blocks and folds each KV head's query
  heads into its query rows (see `grouped_decode_attention`).
- `cpu` (the CPU default for bfloat16 on AVX512-BF16): prefill as `sdpa`;
  decode reads the paged cache in place with a C++ kernel
  (`loramux/kernels/cpu_attention.cpp`), with no gather or copy of the context.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loramux.kernels import attention_ref, cpu_extension
from loramux.kernels.attention_ref import context_slots, window_mask

logger = logging.getLogger(__name__)


@dataclass
class PrefillSpan:
    """Prefill chunks of `num_seqs` sequences, each `length` new tokens, in consecutive batch rows from `start`.

    gather_idx: [ctx] cache slots of the sequence's whole context (cached + new),
      for a single sequence with cached context; None when the chunks start at
      position 0, so their own K/V are the whole context (batched, no gather).
    mask: [length, ctx] bool (True = attend), or None for plain causal attention
    """

    start: int
    length: int
    num_seqs: int
    gather_idx: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class SdpaPlan:
    """The sdpa backend's gather indices, built once per step.

    decode_blocks: [B, nb] cache blocks each decode row reads, its block table's
    first nb entries (nb covers the longest context; padding reads block 0);
    decode_bias: [B, 1, 1, nb * block_size] float32, 0 where the slot is part
    of the context and -inf elsewhere (added to the scores).
    """

    decode_blocks: torch.Tensor | None
    decode_bias: torch.Tensor | None
    prefills: list[PrefillSpan]


@dataclass
class AttentionMetadata:
    """What every layer's attention reads, as device tensors (N = sequences of the step, decode first).

    slot_mapping: [T] int64 cache slot each new token's K/V is written to;
    block_tables: [N, max_blocks] int32; context_lens: [N] int32, context after
    this step (cached + new); query_start: [N + 1] int32, sequence n's rows are
    query_start[n]:query_start[n+1]; max_query_len sizes the prefill grid.
    sdpa: the gather plan of the sdpa and cpu backends (`build_plan`; cpu's holds prefill spans only), None
    for the paged-kernel backends.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start: torch.Tensor
    num_decode: int
    max_query_len: int
    sdpa: SdpaPlan | None = None

    @property
    def is_decode_only(self) -> bool:
        return self.num_decode == self.context_lens.shape[0]


def gather_rows(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache[index] for an index of any shape; index_select is several times faster than advanced indexing."""
    return cache.index_select(0, index.reshape(-1)).view(*index.shape, *cache.shape[1:])


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Whole cache blocks, heads first: cache [num_slots, H, D], blocks [B, nb] -> [B, H, nb * block_size, D].

    One row per block of block_size * H * D contiguous values: an order of
    magnitude fewer, longer copies than gathering slot by slot. The result is
    a strided view of the gathered rows.
    """
    per_block = cache.view(-1, block_size * cache.shape[1] * cache.shape[2])
    rows = per_block.index_select(0, blocks.reshape(-1))
    return rows.view(blocks.shape[0], -1, *cache.shape[1:]).transpose(1, 2)


def build_sdpa_plan(tables: torch.Tensor, positions: torch.Tensor, num_decode: int,
                    prefill_chunks: list[tuple[int, int]], block_size: int, sliding_window: int | None,
                    device: torch.device, gather_decode: bool = True) -> SdpaPlan:
    """Gather indices and masks of one step for the sdpa backend (host tensors in, device tensors out).

    tables: [N, max_blocks] int64 block tables, decode sequences first; positions: [T];
    prefill_chunks: (first position, new tokens) of each prefill sequence, in batch order;
    gather_decode: also the decode rows' blocks and bias (False where a kernel reads the cache in place).
    """
    decode_blocks = decode_bias = None
    if num_decode and gather_decode:
        num_blocks = int(positions[:num_decode].max()) // block_size + 1
        decode_blocks = tables[:num_decode, :num_blocks].to(device)
        key_pos = torch.arange(num_blocks * block_size)[None, :]
        attends = window_mask(positions[:num_decode, None], key_pos, sliding_window)[:, None, None, :]
        decode_bias = torch.zeros(attends.shape).masked_fill_(~attends, float("-inf")).to(device)
    prefills: list[PrefillSpan] = []
    row = num_decode
    for i, (start, n) in enumerate(prefill_chunks, start=num_decode):
        if start == 0:
            # A chunk from position 0 attends only to itself: batch it with the previous one if same length.
            last = prefills[-1] if prefills else None
            if last is not None and last.gather_idx is None and last.length == n:
                last.num_seqs += 1
            else:
                mask = None
                if sliding_window is not None and n > sliding_window:
                    key_pos = torch.arange(n)
                    mask = window_mask(key_pos[:, None], key_pos[None, :], sliding_window).to(device)
                prefills.append(PrefillSpan(row, n, 1, None, mask))
        else:
            key_pos = torch.arange(start + n)
            mask = window_mask(positions[row:row + n, None], key_pos[None, :], sliding_window).to(device)
            prefills.append(PrefillSpan(row, n, 1, context_slots(tables[i], key_pos, block_size).to(device), mask))
        row += n
    return SdpaPlan(decode_blocks, decode_bias, prefills)


class AttentionBackend:
    """Writes the step's new K/V into the cache, then attends; one instance per engine.

    graph_capturable: a decode step reads only device tensors (no host value of
    the context, no host sync), so CUDA graphs may capture it.
    """

    name = ""
    graph_capturable = False

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int, sliding_window: int | None,
                 device: torch.device):
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.device = device

    def build_plan(self, tables: torch.Tensor, positions: torch.Tensor, num_decode: int,
                   prefill_chunks: list[tuple[int, int]]) -> SdpaPlan | None:
        """The step's gather plan, for backends that gather (arguments as `build_sdpa_plan`); None otherwise."""
        return None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D]; k_cache, v_cache: [num_slots, Hkv, D] -> [T, Hq, D]."""
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        return self.attend(q, k, v, k_cache, v_cache, meta)

    def attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError


class PagedKernelAttention(AttentionBackend):
    """The paged kernels of one module (Triton, or the torch reference with the same signatures).

    Both read lengths from the metadata's tensors, so the static decode path
    runs with either; only Triton's stay on the device (the reference loops on the host).
    """

    def __init__(self, kernels, *args):
        super().__init__(*args)
        self.kernels = kernels
        self.name = "torch" if kernels is attention_ref else "triton"
        self.graph_capturable = kernels is not attention_ref
        self._splits: dict[int, int] = {}

    def decode_splits(self, batch: int) -> int:
        """Context splits of a decode batch (fixed per batch size, so graphs capture it)."""
        if batch not in self._splits:
            self._splits[batch] = self.kernels.decode_splits(batch, self.num_kv_heads, self.device)
        return self._splits[batch]

    def attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        if meta.is_decode_only:
            return self.kernels.paged_attention_decode(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.block_size, self.scale,
                self.sliding_window, num_splits=self.decode_splits(q.shape[0]))
        return self.kernels.paged_attention_varlen(
            q, k_cache, v_cache, meta.block_tables, meta.query_start, meta.context_lens, self.block_size,
            self.scale, self.sliding_window, max_query_len=meta.max_query_len)


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Decode attention with the query heads of each KV head as its query rows.

    Semantics: softmax(q @ keys^T * scale + bias) @ values, per sequence and KV head;
    q: [B, Hkv, G, D]; keys, values: [B, Hkv, L, D] (any strides); bias: [B, 1, 1, L] float32 -> [B, Hkv, G, D].
    Measured on the CPU at one query row per head: in float32 torch's SDPA
    kernel, reading the strided keys and values as they are, is fastest; in
    bfloat16 it runs 2-3x slower than two batched matmuls over contiguous
    copies with the softmax in float32 (as transformers' eager attention
    does). A matmul over the strided view would copy it element by element,
    several times slower than `contiguous()`.
    """
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)
    scores = torch.matmul(q, keys.contiguous().transpose(-1, -2)).float() * scale + bias
    return torch.matmul(scores.softmax(-1).to(values.dtype), values.contiguous())


class SdpaAttention(AttentionBackend):
    """The CPU path: grouped attention over gathered K/V (decode) and SDPA per prefill span.

    Decode folds the query heads that share a KV head into that head's query
    rows ([B, Hkv, group, D] against [B, Hkv, L, D], one bias row per
    sequence): the same attention as `enable_gqa` with one query each, which
    torch's CPU kernels run several times slower (12x in bfloat16).
    """

    name = "sdpa"
    gathers_decode = True

    def build_plan(self, tables, positions, num_decode, prefill_chunks) -> SdpaPlan:
        return build_sdpa_plan(tables, positions, num_decode, prefill_chunks, self.block_size, self.sliding_window,
                               self.device, self.gathers_decode)

    def attend_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor:
        """The decode rows' attention: q [num_decode, Hq, D] -> [num_decode, Hq, D]."""
        plan, nd, num_kv_heads = meta.sdpa, q.shape[0], k_cache.shape[1]
        keys = gather_blocks(k_cache, plan.decode_blocks, self.block_size)
        values = gather_blocks(v_cache, plan.decode_blocks, self.block_size)
        grouped = q.view(nd, num_kv_heads, -1, q.shape[2])
        return grouped_decode_attention(grouped, keys, values, plan.decode_bias, self.scale).reshape(q.shape)

    def attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        plan, nd = meta.sdpa, meta.num_decode
        gqa = q.shape[1] != k.shape[1]
        if nd:
            decoded = self.attend_decode(q[:nd], k_cache, v_cache, meta)
            if not plan.prefills:
                return decoded
        out = torch.empty_like(q)
        if nd:
            out[:nd] = decoded
        for span in plan.prefills:
            rows = slice(span.start, span.start + span.length * span.num_seqs)

            def heads_first(t: torch.Tensor) -> torch.Tensor:  # [B * L, H, D] -> [B, H, L, D]
                return t.view(span.num_seqs, -1, *t.shape[1:]).transpose(1, 2)

            if span.gather_idx is None:
                keys, values = heads_first(k[rows]), heads_first(v[rows])
            else:
                keys = heads_first(gather_rows(k_cache, span.gather_idx))
                values = heads_first(gather_rows(v_cache, span.gather_idx))
            attended = F.scaled_dot_product_attention(
                heads_first(q[rows]), keys, values, attn_mask=span.mask, is_causal=span.mask is None,
                enable_gqa=gqa)
            out[rows] = attended.transpose(1, 2).reshape(-1, *q.shape[1:])
        return out


class CpuKernelAttention(SdpaAttention):
    """The CPU default for bfloat16 on AVX512-BF16: prefill as `sdpa`; decode reads K/V where they lie in the
    paged cache (`cpu_attention.cpp`), where gathering them first moved the whole context twice a step."""

    name = "cpu"
    gathers_decode = False

    def __init__(self, *args):
        super().__init__(*args)
        if not cpu_extension.load():
            raise RuntimeError("the C++ CPU kernels are not available here (see the log); use the sdpa backend")

    def attend_decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        nd = q.shape[0]
        return torch.ops.loramux_cpu_attention.decode(
            q.contiguous(), k_cache, v_cache, meta.block_tables[:nd], meta.context_lens[:nd], self.block_size,
            self.scale, self.sliding_window or 0)


def select_attention_backend(requested: str, num_kv_heads: int, head_dim: int, block_size: int,
                             sliding_window: int | None, device: torch.device,
                             dtype: torch.dtype = torch.float32) -> AttentionBackend:
    """Pick the backend once: Triton on CUDA (when installed); on the CPU the C++ decode kernel for bfloat16
    where it builds, sdpa otherwise."""
    args = (num_kv_heads, head_dim, block_size, sliding_window, device)
    if requested == "torch":
        return PagedKernelAttention(attention_ref, *args)
    if requested == "cpu":
        if not cpu_extension.serves(device, dtype):
            raise ValueError("--attention-backend cpu needs a bfloat16 model on a CPU with AVX512-BF16 and a C++ "
                             "compiler (see the log); use sdpa")
        return CpuKernelAttention(*args)
    if requested == "auto" and device.type != "cuda":
        return CpuKernelAttention(*args) if cpu_extension.serves(device, dtype) else SdpaAttention(*args)
    if requested == "sdpa":
        return SdpaAttention(*args)
    try:
        from loramux.kernels import triton_attention
    except ImportError as exc:
        if requested == "triton":
            raise ValueError(f"--attention-backend triton needs the triton package: {exc}") from exc
        logger.warning("triton is not installed: attention falls back to sdpa (gathers K/V, no CUDA graphs)")
        return SdpaAttention(*args)
    return PagedKernelAttention(triton_attention, *args)
