"""Fused BitLinear forward and backward: RMSNorm → per-token int8 absmax → ternary matmul, in Triton.

The element-wise parts are Triton kernels, the two products are torch matmuls (cuBLAS on a GPU):
- `rmsnorm_quant_fwd_kernel`: one row's RMS factor (sum of squares in float64, as `ops.fused.rms_factor`,
  so the int8 codes match the CPU path exactly), x̂ = x·rstd·w, then its int8 codes and scale;
- `ternary_fwd_kernel`: t = clamp(round(W / s_w), -1, 1) with s_w the torch absmean (`ops.ternary`);
- `rmsnorm_quant_bwd_kernel`: recomputes the codes from the saved x and rstd (the [T, K] activations are
  never kept) and runs the RMSNorm backward, with per-program partial sums for the gain's gradient.
y = (q · tᵀ) · (s_x · s_w) is an integer product (exact in fp32, also under TF32), so it equals the
reference; the backward is the straight-through estimator of `nn/bitlinear.py`. Kernels are launched with
fp fusion off, so each float operation rounds as in the torch reference. `bitlinear_ref` is the unfused
autograd reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mulfree.ops.fused import rmsnorm_ref
from mulfree.ops.ternary import WEIGHT_EPS, fake_activation_quant, fake_weight_quant

MAX_K = 32768  # one row lives in registers (in fp64 for the sum of squares)
TERNARY_BLOCK = 1024


@triton.jit
def _absmax_int8(xh):
    """Per-row int8 absmax codes of x̂ (as float, exact integers) and their scale 1/inv."""
    amax = tl.maximum(tl.max(tl.abs(xh), axis=0), 1e-5)
    # torch evaluates 127 / amax as reciprocal then product: the same two roundings, so the same inv
    inv = 127.0 * tl.div_rn(1.0, amax)
    y = xh * inv
    # round half to even: adding 1.5·2²³ leaves no fraction bits for |y| ≤ 128 (fp fusion must be off)
    q = tl.clamp((y + 12582912.0) - 12582912.0, -128.0, 127.0)
    return q, tl.div_rn(1.0, inv)


@triton.jit
def rmsnorm_quant_fwd_kernel(x_ptr, w_ptr, q_ptr, sx_ptr, rstd_ptr, K, EPS: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * K + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x64 = x.to(tl.float64)
    # float64 mean of squares, rounded once to fp32: the factor `ops.fused.rms_factor` computes
    rstd = (1.0 / tl.sqrt(tl.sum(x64 * x64, axis=0) / K + EPS)).to(tl.float32)
    q, s_x = _absmax_int8(x * rstd * w)
    tl.store(q_ptr + row * K + cols, q.to(tl.int8), mask=mask)
    tl.store(sx_ptr + row, s_x)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def ternary_fwd_kernel(w_ptr, sw_ptr, t_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = w * tl.div_rn(1.0, tl.load(sw_ptr))
    # clamp(round_half_even(y), -1, 1) without rounding: ±0.5 round to 0, anything beyond to ±1
    t = (y > 0.5).to(tl.int8) - (y < -0.5).to(tl.int8)
    tl.store(t_ptr + offs, t, mask=mask)


@triton.jit
def rmsnorm_quant_bwd_kernel(x_ptr, rstd_ptr, w_ptr, dxh_ptr, dx_ptr, xq_ptr, dw_ptr, T, K, ROWS,
                             BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * ROWS
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BLOCK_K], dtype=tl.float32)
    for row in range(start, tl.minimum(start + ROWS, T)):
        rstd = tl.load(rstd_ptr + row)
        xn = tl.load(x_ptr + row * K + cols, mask=mask, other=0.0).to(tl.float32) * rstd
        # the forward's codes, recomputed with the same operations: x̃ = q · s_x feeds dW = dyᵀ · x̃
        q, s_x = _absmax_int8(xn * w)
        tl.store(xq_ptr + row * K + cols, q * s_x, mask=mask)
        dxh = tl.load(dxh_ptr + row * K + cols, mask=mask, other=0.0)
        g = dxh * w
        c = tl.sum(g * xn, axis=0) / K
        dx = rstd * (g - xn * c)
        tl.store(dx_ptr + row * K + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        b_dw += dxh * xn
    tl.store(dw_ptr + pid * K + cols, b_dw, mask=mask)


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def _check_k(k: int) -> int:
    if k > MAX_K:
        raise ValueError(f"fused_bitlinear keeps a row in registers: K={k} exceeds {MAX_K}; use nn.BitLinear")
    return triton.next_power_of_2(k)


def rmsnorm_quant(x: torch.Tensor, norm_weight: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, K] contiguous -> (q int8 [T, K], s_x fp32 [T], rstd fp32 [T]); x̂ = x · rstd · gain ≈ s_x · q."""
    n_rows, k = x.shape
    block = _check_k(k)
    q = torch.empty(n_rows, k, dtype=torch.int8, device=x.device)
    s_x = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(s_x)
    rmsnorm_quant_fwd_kernel[(n_rows,)](x, norm_weight, q, s_x, rstd, k, EPS=float(eps), BLOCK_K=block,
                                        num_warps=_num_warps(block), enable_fp_fusion=False)
    return q, s_x, rstd


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (t int8 in {-1, 0, 1}, s_w fp32 scalar), equal to `ops.ternary.weight_quant`.

    s_w is torch's absmean, the very reduction `weight_quant` runs, so the codes match it on any device.
    """
    w = weight.contiguous()
    s_w = w.float().abs().mean().clamp(min=WEIGHT_EPS)
    t = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    grid = (triton.cdiv(w.numel(), TERNARY_BLOCK),)
    ternary_fwd_kernel[grid](w, s_w, t, w.numel(), BLOCK=TERNARY_BLOCK, enable_fp_fusion=False)
    return t, s_w


def _programs(n_rows: int, device: torch.device) -> int:
    """How many programs share the rows in the backward: one per SM on a GPU, a few in the interpreter."""
    if device.type == "cuda":
        return min(n_rows, torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)


def rmsnorm_quant_bwd(x: torch.Tensor, rstd: torch.Tensor, norm_weight: torch.Tensor, dxh: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Given dL/dx̂ [T, K] fp32: (dx [T, K] in x's dtype, x̃ = q · s_x fp32 [T, K], dnorm_weight fp32 [K])."""
    n_rows, k = x.shape
    block = _check_k(k)
    n_prog = _programs(n_rows, x.device)
    rows = triton.cdiv(n_rows, n_prog)
    n_prog = triton.cdiv(n_rows, rows)
    dx = torch.empty_like(x)
    xq = torch.empty(n_rows, k, dtype=torch.float32, device=x.device)
    dw = torch.empty(n_prog, k, dtype=torch.float32, device=x.device)
    rmsnorm_quant_bwd_kernel[(n_prog,)](x, rstd, norm_weight, dxh, dx, xq, dw, n_rows, k, rows, BLOCK_K=block,
                                        num_warps=_num_warps(block), enable_fp_fusion=False)
    return dx, xq, dw.sum(0)


class FusedBitLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float
                ) -> torch.Tensor:
        k = x.shape[-1]
        x2 = x.reshape(-1, k).contiguous()
        norm_weight = norm_weight.contiguous()
        q, s_x, rstd = rmsnorm_quant(x2, norm_weight, eps)
        t, s_w = ternarize(weight)
        # int8 × {-1, 0, 1} sums are exact in fp32 (|sum| < 2²⁴ for K < 2¹⁷), so summation order is moot
        y = torch.matmul(q.float(), t.float().t()) * (s_x[:, None] * s_w)
        ctx.save_for_backward(x2, rstd, norm_weight, t, s_w)
        ctx.x_shape, ctx.w_dtype = x.shape, weight.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, rstd, norm_weight, t, s_w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).float()
        dxh = torch.matmul(dy2, t.float()) * s_w
        dx, xq, dnw = rmsnorm_quant_bwd(x2, rstd, norm_weight, dxh)
        dw = torch.matmul(dy2.t(), xq).to(ctx.w_dtype) if ctx.needs_input_grad[2] else None
        return dx.reshape(ctx.x_shape), dnw.to(norm_weight.dtype), dw, None


def fused_bitlinear(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
                    ) -> torch.Tensor:
    """BitLinear with its RMSNorm on raw x [..., K], gain [K], latent weight [N, K] -> y [..., N] (x's dtype).

    Equals `bitlinear_ref` in value (integer parts exactly) and in gradient (straight-through estimator).
    Example: `fused_bitlinear(x, layer.norm.weight, layer.weight, layer.norm.eps)` for an `nn.BitLinear`.
    """
    return FusedBitLinearFunction.apply(x, norm_weight, weight, eps)


def bitlinear_ref(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
                  ) -> torch.Tensor:
    """Unfused reference in fp32: float64-factor RMSNorm → activation STE → weight STE → linear."""
    xq = fake_activation_quant(rmsnorm_ref(x, norm_weight, eps))
    return torch.nn.functional.linear(xq, fake_weight_quant(weight))
