"""Fused training ops on the CPU: RMSNorm, BitLinear (with the block norm or the MLGRU output gate before it as a
prologue), the whole ternary GLU and the MLGRU state scan as autograd functions whose element-wise work runs in
C++ (kernels/cpu/train_ops.cpp) and that keep only their inputs for backward, recomputing normalized, gated and
quantized activations there (the paper's fused BitLinear; references in ops/fused_train.py), and the GLU's
gate_up too. The forward codes x trits products run on the packed ternary kernels (exact, so bit-identical).

The layers in nn/ take these paths when training on fp32 CPU tensors with the compiled kernels in use
(`MULFREE_BACKEND=reference` or `set_fused(False)` keeps the unfused torch ops, e.g. to compare memory).
Their RMS factors are a float64 sum rounded once to fp32, as in the packed engine, so a model's int8 codes
are the engine's. Training on CUDA tensors, BitLinear and the MLGRU recurrence run the Triton kernels of
kernels/triton/ instead (`triton_active`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from mulfree.kernels import cpu_module, kernel_threads
from mulfree.kernels.ternary import amx_enabled, resolve_backend
from mulfree.ops.pack import padded_k

_enabled = True


def set_fused(enabled: bool) -> bool:
    """Turn the fused CPU ops on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def active(x: torch.Tensor) -> bool:
    """Whether the fused ops run for input x: while autograd records (training), fp32 on the CPU outside
    autocast, kernels compiled and not switched off. Inference keeps the unfused ops, whose fp32 reductions
    are those of the official reference forward (tests/test_official_fidelity.py)."""
    return (_enabled and torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and cpu_module() is not None
            and resolve_backend(None) != "reference")


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


@lru_cache(maxsize=1)
def _triton() -> bool:
    from mulfree.kernels import triton

    return triton.available()


def triton_active(x: torch.Tensor) -> bool:
    """Whether the Triton kernels (kernels/triton/) run for x: while training on a CUDA tensor, triton installed."""
    return _enabled and torch.is_grad_enabled() and _on_gpu(x) and _triton()


def triton_bitlinear(x: torch.Tensor, norm_w: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton fused BitLinear (norm + int8 + ternary + matmul; backward recomputes the codes)."""
    from mulfree.kernels.triton import fused_bitlinear

    return fused_bitlinear(x, norm_w, weight, eps)


def triton_recurrence(f: torch.Tensor, i: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = f_t h_{t-1} + i_t by the Triton fused-recurrent kernel: (states, last state)."""
    from mulfree.kernels.triton import fused_recurrent

    return fused_recurrent(f, i, h0)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _run():
    """(the extension, backend name, threads) for one kernel call."""
    return cpu_module(), resolve_backend(None), kernel_threads()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        cpu, name, threads = _run()
        x2 = _rows(x)
        out = torch.empty_like(x2)
        cpu.rmsnorm_fwd(x2, w.detach().contiguous(), eps, out, name, threads)
        ctx.save_for_backward(x2, w)
        ctx.eps = eps
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w = ctx.saved_tensors
        cpu, name, threads = _run()
        dx, dw = torch.empty_like(x2), torch.empty_like(w)
        cpu.rmsnorm_bwd(x2, w.detach().contiguous(), _rows(dy), ctx.eps, dx, dw, name, threads)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x · rms_factor(x) · w, keeping only x for backward."""
    return _RMSNorm.apply(x, w, eps)


def _ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(trits fp32 [N, K], scale) of the latent weight (the reference: ops.fused_train.ternarize)."""
    cpu, name, threads = _run()
    trits = torch.empty(weight.shape)
    return trits, cpu.ternarize(weight.detach().contiguous(), trits, name, threads)


# Below this K every sum of K products of int8 codes (|q| <= 127) and trits is an integer under 2^24, which fp32
# holds exactly: the packed int8 kernel's int32 sums and the fp32 matmul then give the same floats.
_EXACT_K = (1 << 24) // 127


def _scaled_product(q: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(q @ ternarize(weight)ᵀ) · (a_scale · w_scale) for the integer codes q [T, K] (fp32) and their scales [T]:
    on the packed ternary kernels (the weight packed to 2 bits, the codes to int8; `vpmaddubsw` / `vpdpbusd` / AMX
    instead of fp32 FMAs, the scales applied as the kernel writes its outputs) where the integer sums are exact,
    else the fp32 matmul (also under torch.compile, whose tracing cannot call the extension). Equal either way, bit
    for bit: the sums are the same integers, then one fp32 product with the fp32 product of the scales."""
    cpu, name, threads = _run()
    n, k = weight.shape
    if name == "scalar" or k >= _EXACT_K or torch.compiler.is_compiling():
        trits, w_scale = _ternarize(weight)
        return torch.matmul(q, trits.t()).mul_(a_scale[:, None] * w_scale)
    kpad = padded_k(k)
    packed = torch.empty((n + 3) // 4, kpad, dtype=torch.uint8)  # ternarized straight into pack_ternary's layout
    w_scale = cpu.ternarize(weight.detach().contiguous(), None, name, threads, packed=packed)
    codes = (q if kpad == k else torch.nn.functional.pad(q, (0, kpad - k))).to(torch.int8)
    y = torch.empty(q.shape[0], n)
    cpu.ternary_matmul_scaled(packed, n, codes, q.sum(1).to(torch.int32), a_scale, w_scale, y, name, threads, k=k)
    return y


def _bitlinear_fwd(x2, norm_w, weight, eps, kind, pre_w, pre_eps, h2) -> torch.Tensor:
    """BitLinear of prologue(x2) [T, K] -> [T, N]: norm + int8 codes, times the ternary weight, scaled once."""
    cpu, name, threads = _run()
    inp = _prologue(kind, x2, pre_w, pre_eps, h2)
    q, a_scale = torch.empty_like(inp), torch.empty(inp.shape[0])
    cpu.norm_quant(inp, norm_w.detach().contiguous(), eps, q, a_scale, False, name, threads)
    del inp
    return _scaled_product(q, a_scale, weight)


@lru_cache(maxsize=1)
def _has_amx_bf16() -> bool:
    return cpu_module().cpu_features()["amx_bf16"]


def _amx_grads(name: str) -> bool:
    """Whether the backward products run on AMX-BF16 (`_cpu.ternary_grad_input` / `ternary_grad_weight`: fp32
    accuracy, dy split into three exact bf16 parts): the avx512 backend with AMX on, on a CPU with AMX-BF16."""
    return name == "avx512" and not torch.compiler.is_compiling() and _has_amx_bf16() and amx_enabled()


def _bitlinear_bwd(dy2, x2, norm_w, weight, eps, kind, pre_w, pre_eps, h2, need_dw: bool):
    """(dx, d norm_w, d weight, d pre_w, dh) of `_bitlinear_fwd` given dL/dy, recomputing the prologue and codes:
    straight-through gradients (dW = dyᵀ·x̃ with the scaled codes, dx̂ = dy·W̃). Both products are fp32 GEMMs, or
    on AMX-BF16 the same sums in another order (`_amx_grads`)."""
    cpu, name, threads = _run()
    nw = norm_w.detach().contiguous()
    inp = _prologue(kind, x2, pre_w, pre_eps, h2)
    amx, dw = _amx_grads(name), None
    if need_dw and amx:
        q, a_scale = torch.empty_like(inp), torch.empty(inp.shape[0])
        cpu.norm_quant(inp, nw, eps, q, a_scale, False, name, threads)
        dw = torch.empty(dy2.shape[1], inp.shape[1])
        cpu.ternary_grad_weight(dy2, a_scale, q, dw, threads)
        del q
    elif need_dw:
        xq = torch.empty_like(inp)
        cpu.norm_quant(inp, nw, eps, xq, None, True, name, threads)
        dw = torch.matmul(dy2.t(), xq)
        del xq
    trits, w_scale = _ternarize(weight)
    if amx:
        dxhat = torch.empty(dy2.shape[0], trits.shape[1])
        cpu.ternary_grad_input(dy2, trits, dxhat, threads)
        dxhat.mul_(w_scale)
    else:
        dxhat = torch.matmul(dy2, trits).mul_(w_scale)
    del trits
    dinp, dnw = torch.empty_like(inp), torch.empty_like(nw)
    cpu.rmsnorm_bwd(inp, nw, dxhat, eps, dinp, dnw, name, threads)
    del inp, dxhat
    dx, dpre, dh = _prologue_bwd(kind, x2, pre_w, pre_eps, h2, dinp)
    return dx, dnw, dw, dpre, dh


class _BitLinear(torch.autograd.Function):
    """BitLinear of prologue(x); saves x (and the prologue's inputs), never the prologue's output."""

    @staticmethod
    def forward(ctx, x, norm_w, weight, eps, kind, pre_w, pre_eps, h):
        x2 = _rows(x)
        h2 = None if h is None else _rows(h)
        y = _bitlinear_fwd(x2, norm_w, weight, eps, kind, pre_w, pre_eps, h2)
        ctx.save_for_backward(x2, norm_w, weight, pre_w, h2)
        ctx.eps, ctx.kind, ctx.pre_eps = eps, kind, pre_eps
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, norm_w, weight, pre_w, h2 = ctx.saved_tensors
        dx, dnw, dw, dpre, dh = _bitlinear_bwd(_rows(dy), x2, norm_w, weight, ctx.eps, ctx.kind, pre_w, ctx.pre_eps,
                                               h2, ctx.needs_input_grad[2])
        shape = (*dy.shape[:-1], x2.shape[1])
        return (dx.view(shape), dnw, dw, None, None, dpre, None,
                None if dh is None else dh.view(*dy.shape[:-1], h2.shape[1]))


class _GLU(torch.autograd.Function):
    """The ternary GLU down(glu(gate_up(pre_norm(x)))) as one node that keeps only x: gate_up [T, 2I], the
    largest activation of a block (6 floats per token and width at the official I = 8d/3), is recomputed in
    backward (one more gate_up product) instead of kept for the GLU and down_proj."""

    @staticmethod
    def forward(ctx, x, pre_w, pre_eps, gate_nw, gate_w, gate_eps, down_nw, down_w, down_eps):
        x2 = _rows(x)
        kind = None if pre_w is None else "norm"
        gate_up = _bitlinear_fwd(x2, gate_nw, gate_w, gate_eps, kind, pre_w, pre_eps, None)
        y = _bitlinear_fwd(gate_up, down_nw, down_w, down_eps, "glu", None, 0.0, None)
        ctx.save_for_backward(x2, pre_w, gate_nw, gate_w, down_nw, down_w)
        ctx.eps = pre_eps, gate_eps, down_eps
        return y.view(*x.shape[:-1], down_w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, pre_w, gate_nw, gate_w, down_nw, down_w = ctx.saved_tensors
        (pre_eps, gate_eps, down_eps), need = ctx.eps, ctx.needs_input_grad
        kind = None if pre_w is None else "norm"
        gate_up = _bitlinear_fwd(x2, gate_nw, gate_w, gate_eps, kind, pre_w, pre_eps, None)
        dgate_up, d_down_nw, d_down_w, _, _ = _bitlinear_bwd(_rows(dy), gate_up, down_nw, down_w, down_eps, "glu",
                                                             None, 0.0, None, need[7])
        del gate_up
        dx, d_gate_nw, d_gate_w, dpre, _ = _bitlinear_bwd(dgate_up, x2, gate_nw, gate_w, gate_eps, kind, pre_w,
                                                          pre_eps, None, need[4])
        return (dx.view(dy.shape[:-1] + (x2.shape[1],)), dpre, None, d_gate_nw, d_gate_w, None, d_down_nw, d_down_w,
                None)


def glu(x: torch.Tensor, pre_norm_w: torch.Tensor | None, pre_eps: float, gate_nw: torch.Tensor,
        gate_w: torch.Tensor, gate_eps: float, down_nw: torch.Tensor, down_w: torch.Tensor,
        down_eps: float) -> torch.Tensor:
    """The ternary GLU of nn/glu.py on the fused path (the block's RMSNorm first when `pre_norm_w` is given; each
    BitLinear with its own norm weight and eps), keeping only x for backward."""
    return _GLU.apply(x, pre_norm_w, pre_eps, gate_nw, gate_w, gate_eps, down_nw, down_w, down_eps)


def _prologue(kind: str | None, x2: torch.Tensor, pre_w: torch.Tensor | None, pre_eps: float,
              h2: torch.Tensor | None) -> torch.Tensor:
    """The BitLinear's input from its saved inputs: x, rmsnorm(x) · pre_w, glu(x) or the MLGRU output gate."""
    if kind is None:
        return x2
    cpu, name, threads = _run()
    if kind == "glu":
        out = torch.empty(x2.shape[0], x2.shape[1] // 2)
        cpu.glu_fwd(x2, out, name, threads)
        return out
    out = torch.empty_like(x2)
    if kind == "norm":
        cpu.rmsnorm_fwd(x2, pre_w.detach().contiguous(), pre_eps, out, name, threads)
    else:
        cpu.mlgru_gate(x2, pre_w.detach().contiguous(), h2, pre_eps, out, name, threads)
    return out


def _prologue_bwd(kind, x2, pre_w, pre_eps, h2, dinp):
    """(dL/dx, dL/dpre_w, dL/dh) of `_prologue` given dL/d(its output)."""
    if kind is None:
        return dinp, None, None
    cpu, name, threads = _run()
    dx = torch.empty_like(x2)
    if kind == "glu":
        cpu.glu_bwd(x2, dinp, dx, name, threads)
        return dx, None, None
    dpre = torch.empty_like(pre_w)
    if kind == "norm":
        cpu.rmsnorm_bwd(x2, pre_w.detach().contiguous(), dinp, pre_eps, dx, dpre, name, threads)
        return dx, dpre, None
    dh = torch.empty_like(h2)
    cpu.mlgru_gate_bwd(x2, pre_w.detach().contiguous(), h2, dinp, pre_eps, dx, dpre, dh, name, threads)
    return dx, dpre, dh


@dataclass(frozen=True)
class Prologue:
    """What a BitLinear applies to its input first: "norm" an RMSNorm (`weight`, `eps`), "glu" silu(gate) · up of
    x = [gate, up], "gate" the MLGRU output rmsnorm(x) · weight · silu(h). The fused path recomputes it in
    backward, so only its inputs are kept."""

    kind: str
    weight: torch.Tensor | None = None
    eps: float = 0.0
    h: torch.Tensor | None = None


def bitlinear(x: torch.Tensor, norm_w: torch.Tensor, weight: torch.Tensor, eps: float,
              prologue: Prologue | None = None) -> torch.Tensor:
    """BitLinear on prologue(x) [..., K]: RMSNorm, int8 activations, ternary weight [N, K], one matmul."""
    if prologue is None:
        return _BitLinear.apply(x, norm_w, weight, eps, None, None, 0.0, None)
    return _BitLinear.apply(x, norm_w, weight, eps, prologue.kind, prologue.weight, prologue.eps, prologue.h)


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fi, ff, lb, h0, keep, skip):
        cpu, name, threads = _run()
        fi, ff = fi.contiguous(), ff.contiguous()
        h = torch.empty_like(fi)
        lb_ = None if lb is None else lb.detach().contiguous()
        h0_ = None if h0 is None else h0.detach().contiguous()
        keep_ = None if keep is None else keep.to(torch.uint8).contiguous()
        cpu.mlgru_scan(fi, ff, lb_, h0_, keep_, skip, h, name, threads)
        ctx.save_for_backward(fi, ff, lb_, h0_, keep_, h)
        ctx.skip = skip
        return h

    @staticmethod
    def backward(ctx, dh):
        fi, ff, lb, h0, keep, h = ctx.saved_tensors
        cpu, name, threads = _run()
        dfi, dff = dh.contiguous().clone(), torch.empty_like(ff)
        dlb = torch.empty(fi.shape[-1])
        dh0 = None if h0 is None else torch.empty_like(h0)
        cpu.mlgru_scan_bwd(fi, ff, lb, h0, keep, ctx.skip, h, dfi, dff, dlb, dh0, name, threads)
        return dfi, dff, (dlb if lb is not None else None), dh0, None, None


def mlgru_scan(fi: torch.Tensor, ff: torch.Tensor, lb: torch.Tensor | None = None, h0: torch.Tensor | None = None,
               keep: torch.Tensor | None = None, skip: bool = False) -> torch.Tensor:
    """The MLGRU's states h [B, T, D] from its input and forget projections (nn/mlgru.py's recurrence, `keep`
    False at padding); keeps fi, ff and h for backward."""
    return _Scan.apply(fi, ff, lb, h0, keep, skip)
