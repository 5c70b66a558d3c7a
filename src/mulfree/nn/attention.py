"""Causal multi-head self-attention with rotary position embeddings (Llama style, no bias),
for the Transformer++ baseline. The KV cache is a (k, v) pair of [B, H, T, Dh] tensors.

By default every row of a batch sits at the same positions (past .. past + T). Rows of different lengths
can share one forward (batched decode, `mulfree.infer.kv_batch`) in two ways: their caches left-padded to one
length with each row's own RoPE `positions` and a `key_mask` that hides the padding keys; or, one token per row,
as a list of the rows' own caches (`attend_rows`), so that a decode step copies no cache (a padded batch copies
every row's whole cache, twice, at every step). Caches grow in place in buffers with room (`append_kv`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., T, Dh] for integer positions [..., T] (half-split layout, as Llama's rotate_half)."""
    half = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / theta ** (half / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, Dh] by the tables [T, Dh] (shared positions) or [B, 1, T, Dh] (per row)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


FILLED = "_mulfree_kv_filled"  # attribute of a KV buffer made by `append_kv`: how many positions hold keys


def append_kv(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`cache` [B, H, T, Dh] and `new` [B, H, t, Dh] as one [B, H, T + t, Dh] view of a buffer with room to grow:
    written in place when `cache` is the latest view of such a buffer (no holder has appended past it), else
    copied into a new buffer of twice the length, so a token costs amortized O(1) copies, not the whole cache."""
    T, end, base = cache.shape[2], cache.shape[2] + new.shape[2], cache._base
    if (base is not None and getattr(base, FILLED, None) == T and end <= base.shape[2]
            and cache.data_ptr() == base.data_ptr() and cache.stride() == base.stride()
            and cache.shape[:2] == base.shape[:2]):  # the whole buffer's positions 0..T (not a row of a batch)
        buffer = base
    else:
        buffer = cache.new_empty(cache.shape[0], cache.shape[1], max(64, 2 * end), cache.shape[3])
        buffer[:, :, :T].copy_(cache)
    buffer[:, :, T:end].copy_(new)
    setattr(buffer, FILLED, end)
    return buffer[:, :, :end]


def attend_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor]],
    scale: float | None = None, gqa: bool = False,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One new token per row: row b's k, v [B, H_kv, 1, Dh] appended to its own cache rows[b] (`append_kv`), its
    query q [B, H, 1, Dh] attending over them -> (out [B, H, 1, Dh], the rows' grown caches)."""
    out, grown = [], []
    for b, (past_k, past_v) in enumerate(rows):
        kb, vb = append_kv(past_k, k[b : b + 1]), append_kv(past_v, v[b : b + 1])
        out.append(F.scaled_dot_product_attention(q[b : b + 1], kb, vb, scale=scale, enable_gqa=gqa))
        grown.append((kb, vb))
    return torch.cat(out), grown


class RotaryAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, rope_theta: float = 10000.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.rope_theta = rope_theta
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, T, D], cache of past (k, v) [B, H, past, Dh] or None -> (out [B, T, D], new cache).

        positions: int64 [B, T], each row's RoPE positions; None: past .. past + T for every row.
        key_mask: bool [B, past + T], False marks a padding key (cached or new) that no query may see;
        None: every key is real. Causality is by cache slot, so padding belongs on the left.
        cache may instead be a list of B rows' own (k, v) [1, H, past_b, Dh] (T = 1, positions given): the new
        cache is then the list of the rows' grown caches (`attend_rows`).
        """
        B, T, D = x.shape
        rows = isinstance(cache, list)
        past = 0 if cache is None or rows else cache[0].shape[2]
        q, k, v = (
            p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if positions is None:
            positions = torch.arange(past, past + T, device=x.device)
        cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)  # [T, Dh] or per row [B, T, Dh]
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh], broadcast over heads
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if rows:
            y, grown = attend_rows(q, k, v, cache)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, D)), grown
        if cache is not None:
            k, v = append_kv(cache[0], k), append_kv(cache[1], v)
        if past == 0 and key_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Query t (absolute past + t) sees keys 0..past + t.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            if key_mask is not None:
                # Each query keeps its own key, so a padding query gets a finite output instead of NaN
                # (a NaN there would reach the real rows through the masked values: 0 * NaN = NaN).
                own = mask & ~mask.tril(diagonal=past - 1)
                mask = mask & key_mask[:, None, None, :] | own  # [B, 1, T, past + T]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.o_proj(y), (k, v)
