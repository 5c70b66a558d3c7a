"""The MLGRU recurrence h_t = f_t ⊙ h_{t−1} + i_t in Triton: a fused-recurrent form and a chunked form.

Both keep the contract of `ops.scan.linear_recurrence`: f, i [B, T, D] fp32, h0 [B, D] or None ->
(states [B, T, D], last [B, D]), with its backward, the adjoint recurrence
dh_t = g_t + f_{t+1} ⊙ dh_{t+1}; di = dh, df = dh ⊙ h_{t−1}, dh0 = f_0 ⊙ dh_0.
- `fused_recurrent`: one program per (batch, block of D) walks time, forward and backward; launched with
  fp fusion off, it rounds exactly as the torch loop does.
- `chunked`: steps compose as affine maps h ↦ f·h + i, so each chunk of C steps is one associative scan
  (cumulative products of f and the chunk's states from zero), all chunks in parallel; then one pass per
  (batch, block of D) carries the state across chunks: h_t = h̃_t + (Π_{chunk start..t} f) · H_{chunk start}.
  Its backward is the same chunked scan run backwards in time with gate f_{t+1}.
Reference: `ops.scan.linear_recurrence_naive` (tests/test_triton_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BD = 64  # D-block of one program


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """h ↦ a1·h + b1, then h ↦ a2·h + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def fused_recurrent_fwd_kernel(f_ptr, i_ptr, h0_ptr, o_ptr, T, D, USE_H0: tl.constexpr, BD: tl.constexpr):
    i_d, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_h = tl.zeros([BD], dtype=tl.float32)
    if USE_H0:
        b_h = tl.load(h0_ptr + i_b * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    p = i_b * T * D + o_d
    for _ in range(T):
        b_h = tl.load(f_ptr + p, mask=m_d, other=0.0) * b_h + tl.load(i_ptr + p, mask=m_d, other=0.0)
        tl.store(o_ptr + p, b_h, mask=m_d)
        p += D


@triton.jit
def fused_recurrent_bwd_kernel(f_ptr, o_ptr, h0_ptr, g_ptr, di_ptr, df_ptr, dh0_ptr, T, D,
                               USE_H0: tl.constexpr, BD: tl.constexpr):
    i_d, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    # b_dh carries f_{t+1} · dh_{t+1} into step t
    b_dh = tl.zeros([BD], dtype=tl.float32)
    p = i_b * T * D + (T - 1) * D + o_d
    for _ in range(T - 1):
        b_dh = tl.load(g_ptr + p, mask=m_d, other=0.0) + b_dh
        tl.store(di_ptr + p, b_dh, mask=m_d)
        tl.store(df_ptr + p, b_dh * tl.load(o_ptr + p - D, mask=m_d, other=0.0), mask=m_d)
        b_dh = tl.load(f_ptr + p, mask=m_d, other=0.0) * b_dh
        p -= D
    # t = 0: the previous state is h0, or zero without one
    b_dh = tl.load(g_ptr + p, mask=m_d, other=0.0) + b_dh
    tl.store(di_ptr + p, b_dh, mask=m_d)
    if USE_H0:
        tl.store(df_ptr + p, b_dh * tl.load(h0_ptr + i_b * D + o_d, mask=m_d, other=0.0), mask=m_d)
        tl.store(dh0_ptr + i_b * D + o_d, tl.load(f_ptr + p, mask=m_d, other=0.0) * b_dh, mask=m_d)
    else:
        tl.store(df_ptr + p, tl.zeros([BD], dtype=tl.float32), mask=m_d)


@triton.jit
def _chunk_steps(i_c, T, REVERSE: tl.constexpr, C: tl.constexpr):
    """Chunk i_c's C steps in scan order: (time index, valid, time index of their gate, gate valid)."""
    s = i_c * C + tl.arange(0, C)
    if REVERSE:
        # backwards in time, step t's gate is f_{t+1} (none for the last step: dh_T = 0)
        t = T - 1 - s
        t_f = t + 1
    else:
        t = s
        t_f = s
    return t, s < T, t_f, (s < T) & (t_f < T)


@triton.jit
def chunk_scan_kernel_local(f_ptr, i_ptr, o_ptr, T, D, REVERSE: tl.constexpr, C: tl.constexpr,
                                BD: tl.constexpr):
    i_d, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    t, m_t, t_f, m_f = _chunk_steps(i_c, T, REVERSE, C)
    base = i_b * T * D
    p = base + t[:, None] * D + o_d[None, :]
    m = m_t[:, None] & m_d[None, :]
    b_f = tl.load(f_ptr + base + t_f[:, None] * D + o_d[None, :], mask=m_f[:, None] & m_d[None, :], other=0.0)
    b_i = tl.load(i_ptr + p, mask=m, other=0.0)
    # [C, BD]: the chunk's states from a zero state
    _, b_h = tl.associative_scan((b_f, b_i), 0, _affine_combine)
    tl.store(o_ptr + p, b_h, mask=m)


@triton.jit
def chunk_scan_kernel_carry(f_ptr, o_ptr, h0_ptr, T, D, USE_H0: tl.constexpr, REVERSE: tl.constexpr,
                                C: tl.constexpr, BD: tl.constexpr):
    i_d, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_H = tl.zeros([BD], dtype=tl.float32)
    if USE_H0:
        b_H = tl.load(h0_ptr + i_b * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    base = i_b * T * D
    last = tl.arange(0, C)[:, None] == C - 1
    for i_c in range(tl.cdiv(T, C)):
        t, m_t, t_f, m_f = _chunk_steps(i_c, T, REVERSE, C)
        p = base + t[:, None] * D + o_d[None, :]
        m = m_t[:, None] & m_d[None, :]
        m_g = m_f[:, None] & m_d[None, :]
        b_f = tl.load(f_ptr + base + t_f[:, None] * D + o_d[None, :], mask=m_g, other=0.0)
        b_h = tl.load(o_ptr + p, mask=m, other=0.0) + tl.cumprod(b_f, 0) * b_H[None, :]
        tl.store(o_ptr + p, b_h, mask=m)
        b_H = tl.sum(tl.where(last, b_h, 0.0), 0)


def _block_d(d: int) -> int:
    return min(MAX_BD, triton.next_power_of_2(d))


def _chunk_scan(f: torch.Tensor, i: torch.Tensor, h0: torch.Tensor | None, chunk: int, reverse: bool
                ) -> torch.Tensor:
    """States of h_t = f_t h_{t−1} + i_t (reverse: h_t = f_{t+1} h_{t+1} + i_t, h0 unused) in chunks."""
    b, t, d = f.shape
    bd = _block_d(d)
    out = torch.empty_like(i)
    n_chunks = triton.cdiv(t, chunk)
    chunk_scan_kernel_local[(triton.cdiv(d, bd), n_chunks, b)](
        f, i, out, t, d, REVERSE=reverse, C=chunk, BD=bd, enable_fp_fusion=False)
    if n_chunks > 1 or h0 is not None:
        chunk_scan_kernel_carry[(triton.cdiv(d, bd), b)](
            f, out, out if h0 is None else h0, t, d, USE_H0=h0 is not None, REVERSE=reverse, C=chunk, BD=bd,
            enable_fp_fusion=False)
    return out


def _previous_states(states: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """h_{t−1} for every t: [h0 (or zeros), h_0, ..., h_{T−2}]."""
    first = torch.zeros_like(states[:, :1]) if h0 is None else h0.unsqueeze(1)
    return torch.cat([first, states[:, :-1]], dim=1)


class FusedRecurrentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: torch.Tensor, i: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        f, i = f.contiguous(), i.contiguous()
        h0 = None if h0 is None else h0.contiguous()
        b, t, d = f.shape
        bd = _block_d(d)
        out = torch.empty_like(i)
        fused_recurrent_fwd_kernel[(triton.cdiv(d, bd), b)](
            f, i, out if h0 is None else h0, out, t, d, USE_H0=h0 is not None, BD=bd, enable_fp_fusion=False)
        ctx.save_for_backward(f, out, h0)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        f, out, h0 = ctx.saved_tensors
        g = g.contiguous()
        b, t, d = f.shape
        bd = _block_d(d)
        di, df = torch.empty_like(g), torch.empty_like(g)
        dh0 = None if h0 is None else torch.empty_like(h0)
        fused_recurrent_bwd_kernel[(triton.cdiv(d, bd), b)](
            f, out, out if h0 is None else h0, g, di, df, di if dh0 is None else dh0, t, d,
            USE_H0=h0 is not None, BD=bd, enable_fp_fusion=False)
        return df, di, dh0


class ChunkedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: torch.Tensor, i: torch.Tensor, h0: torch.Tensor | None, chunk: int) -> torch.Tensor:
        f, i = f.contiguous(), i.contiguous()
        h0 = None if h0 is None else h0.contiguous()
        out = _chunk_scan(f, i, h0, chunk, reverse=False)
        ctx.chunk = chunk
        ctx.save_for_backward(f, out, h0)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        f, out, h0 = ctx.saved_tensors
        dh = _chunk_scan(f, g.contiguous(), None, ctx.chunk, reverse=True)
        df = dh * _previous_states(out, h0)
        dh0 = None if h0 is None else f[:, 0] * dh[:, 0]
        return df, dh, dh0, None


def fused_recurrent(f: torch.Tensor, i: torch.Tensor, h0: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """f, i [B, T, D] fp32, h0 [B, D] or None -> (states [B, T, D], last state [B, D]), time walked in order.

    Example: `h, h_last = fused_recurrent(f, i, state)`; equals `ops.scan.linear_recurrence(f, i, state)`.
    """
    states = FusedRecurrentFunction.apply(f, i, h0)
    return states, states[:, -1]


def chunked(f: torch.Tensor, i: torch.Tensor, h0: torch.Tensor | None = None, chunk: int = 16
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `fused_recurrent`, in chunks of `chunk` steps (a power of two) scanned in parallel.

    Equal to the sequential loop up to float rounding (the scan multiplies in another order).
    """
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    states = ChunkedFunction.apply(f, i, h0, chunk)
    return states, states[:, -1]
