"""Attention over the paged KV cache.

The flat batch of a step holds the decode tokens first (one per sequence),
then each prefill chunk as a contiguous run. `AttentionMetadata` is built once
per step and shared by every layer: the slot each new token's K/V is written
to, and the cache slots each query reads, as gather indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
class AttentionMetadata:
    """slot_mapping: [T] cache slot of every new token.
    decode_gather: [B, L] cache slots each decode row reads (padded);
    decode_mask: [B, 1, 1, L] bool, True where the slot is part of the context.
    """

    slot_mapping: torch.Tensor
    num_decode: int
    decode_gather: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: list[PrefillSpan]


def context_slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position given a block table: [..., n_blocks] x [..., L] -> [..., L]."""
    blocks = torch.gather(block_table, -1, torch.div(positions, block_size, rounding_mode="floor"))
    return blocks * block_size + positions % block_size


def gather_rows(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache[index] for an index of any shape; index_select is several times faster than advanced indexing."""
    return cache.index_select(0, index.reshape(-1)).view(*index.shape, *cache.shape[1:])


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """[..., Q, 1] x [..., 1, K] positions -> bool mask, causal and optionally windowed."""
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Write the new K/V into the cache, then attend over each sequence's context.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; k_cache, v_cache: [num_slots, Hkv, D].
    Returns [T, Hq, D].
    """
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    if meta.num_decode:
        nd = meta.num_decode
        keys = gather_rows(k_cache, meta.decode_gather).transpose(1, 2)  # [B, Hkv, L, D]
        values = gather_rows(v_cache, meta.decode_gather).transpose(1, 2)
        out[:nd] = F.scaled_dot_product_attention(
            q[:nd].unsqueeze(2), keys, values, attn_mask=meta.decode_mask, enable_gqa=gqa
        ).squeeze(2)
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.length * span.num_seqs)

        def heads_first(t: torch.Tensor) -> torch.Tensor:  # [B * L, H, D] -> [B, H, L, D]
            return t.view(span.num_seqs, -1, *t.shape[1:]).transpose(1, 2)

        if span.gather_idx is None:
            keys, values = heads_first(k[rows]), heads_first(v[rows])
        else:
            keys = heads_first(gather_rows(k_cache, span.gather_idx))
            values = heads_first(gather_rows(v_cache, span.gather_idx))
        attended = F.scaled_dot_product_attention(
            heads_first(q[rows]), keys, values, attn_mask=span.mask, is_causal=span.mask is None, enable_gqa=gqa)
        out[rows] = attended.transpose(1, 2).reshape(-1, *q.shape[1:])
    return out
