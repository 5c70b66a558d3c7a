"""Pure-torch references of the packed engine's fused CPU steps (the C++ kernels under kernels/cpu/).

The RMS factor sums squares in float64 and rounds once to fp32, so the compiled kernel (also a
float64 sum, other order) gets the same fp32 factor, and the int8 activations match exactly.
Math: the MLGRU and GLU of `nn/mlgru.py` and `nn/glu.py` (the official code's output gate).
"""

from __future__ import annotations

import torch

from mulfree.ops.pack import FORMAT, packed_format, padded_k


def rms_factor(x: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 rsqrt(mean(x²) + eps) over the last dim, computed in float64: [..., 1]."""
    return torch.rsqrt(x.double().pow(2).mean(dim=-1, keepdim=True) + eps).float()


def rmsnorm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x · rms_factor(x) · w in fp32 (multiplied in that order, like the kernel)."""
    x = x.float()
    return x * rms_factor(x, eps) * w.float()


def rmsnorm_quant_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm then per-token absmax int8: (q int8 [T, Kpad] zero-padded, a_scale fp32 [T], sumq int32 [T])."""
    xh = rmsnorm_ref(x, w, eps)
    inv = 127.0 / xh.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    q = (xh * inv).round().clamp(-128, 127).to(torch.int8)
    k = x.shape[-1]
    qp = torch.zeros(*x.shape[:-1], padded_k(k), dtype=torch.int8)
    qp[..., :k] = q
    return qp, (1.0 / inv).squeeze(-1), q.to(torch.int32).sum(dim=-1, dtype=torch.int32)


def bitlinear_packed_ref(packed: torch.Tensor, n: int, scale: float, norm_w: torch.Tensor, x: torch.Tensor,
                         eps: float, fmt: str = FORMAT) -> torch.Tensor:
    """Reference BitLinear on packed weights (format `fmt`, `mulfree.ops.pack.packed_format`): x [T, K] fp32 ->
    [T, N] fp32."""
    k = x.shape[-1]
    q, a_scale, _ = rmsnorm_quant_ref(x, norm_w, eps)
    t = packed_format(fmt).unpack(packed, (n, k))
    dot = q[:, :k].to(torch.int64) @ t.to(torch.int64).T
    return dot.float() * (a_scale[:, None] * torch.tensor(scale, dtype=torch.float32))


def mlgru_step_ref(fi: torch.Tensor, ff: torch.Tensor, fg: torch.Tensor, lb: torch.Tensor | None,
                   g_norm: torch.Tensor, eps: float, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MLGRU over T tokens from the projections fi, ff, fg [T, D]: (out [T, D], new state [D])."""
    f = torch.sigmoid(ff)
    if lb is not None:
        f = lb + (1 - lb) * f
    i = torch.nn.functional.silu(fi) * (1 - f)
    hs = []
    h = state.float()
    for t in range(fi.shape[0]):
        h = f[t] * h + i[t]
        hs.append(h)
    hs = torch.stack(hs)
    return rmsnorm_ref(fg, g_norm, eps) * torch.nn.functional.silu(hs), h


def glu_step_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """z = silu(gate) * up with gate, up = the two halves of gate_up [T, 2I] -> [T, I]."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
