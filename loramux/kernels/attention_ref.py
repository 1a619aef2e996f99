"""Paged attention in plain torch: the reference for the Triton kernels (same signatures).

One loop over the sequences, each gathering its own context through its block
table and running float32 SDPA with an explicit mask: slow, obviously right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def context_slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position given a block table: [..., n_blocks] x [..., L] -> [..., L]."""
    blocks = torch.gather(block_table, -1, torch.div(positions, block_size, rounding_mode="floor"))
    return blocks * block_size + positions % block_size


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """[..., Q, 1] x [..., 1, K] positions -> bool mask, causal and optionally windowed."""
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


def decode_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """The reference does not split the context."""
    return 1


def paged_attention_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                           block_size: int, scale: float, sliding_window: int | None = None,
                           max_query_len: int | None = None) -> torch.Tensor:
    """**Semantics:** causal attention of each sequence's new tokens over its whole context, read from the cache.

    q: [T, Hq, D]; k_cache, v_cache: [num_slots, Hkv, D] (Hq a multiple of Hkv);
    block_tables: [N, max_blocks] int; query_start: [N + 1] int, sequence n's
    queries are rows query_start[n]:query_start[n+1] of q; context_lens: [N] int,
    its context length after this step (cached + new), so query i sits at
    position context_lens[n] - q_len + i. Key j is visible to a query at
    position p when j <= p and, with a window W, j > p - W.
    Returns [T, Hq, D] in q's dtype (rows outside every sequence are zero).
    max_query_len only sizes the Triton kernel's grid.
    """
    out = torch.zeros_like(q)
    group = q.shape[1] // k_cache.shape[1]
    for n in range(block_tables.shape[0]):
        start, end, ctx = int(query_start[n]), int(query_start[n + 1]), int(context_lens[n])
        key_pos = torch.arange(ctx, device=q.device)
        slots = context_slots(block_tables[n].long(), key_pos, block_size)
        keys = k_cache[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, ctx, D]
        values = v_cache[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        query_pos = torch.arange(ctx - (end - start), ctx, device=q.device)
        mask = window_mask(query_pos[:, None], key_pos[None, :], sliding_window)
        attended = F.scaled_dot_product_attention(q[start:end].float().transpose(0, 1), keys, values,
                                                  attn_mask=mask, scale=scale)
        out[start:end] = attended.transpose(0, 1).to(q.dtype)
    return out


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, scale: float,
                           sliding_window: int | None = None, num_splits: int = 1) -> torch.Tensor:
    """**Semantics:** one query per sequence (its last position) over its context, read from the cache.

    q: [B, Hq, D]; k_cache, v_cache: [num_slots, Hkv, D]; block_tables: [B, max_blocks]
    int; context_lens: [B] int (>= 1). Equal to `paged_attention_varlen` with one
    query per sequence; `num_splits` only changes how the kernel divides the work.
    Returns [B, Hq, D].
    """
    query_start = torch.arange(q.shape[0] + 1, device=q.device)
    return paged_attention_varlen(q, k_cache, v_cache, block_tables, query_start, context_lens, block_size, scale,
                                  sliding_window)
