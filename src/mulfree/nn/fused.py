"""Fused training ops on the CPU: RMSNorm, BitLinear, the MLGRU and the GLU as autograd functions whose
element-wise work runs in C++ (kernels/cpu/train_ops.cpp) and that keep only their inputs for backward,
recomputing normalized and quantized activations there (the paper's fused BitLinear; references in
ops/fused_train.py).

The layers in nn/ take these paths when training on fp32 CPU tensors with the compiled kernels in use
(`MULFREE_BACKEND=reference` or `set_fused(False)` keeps the unfused torch ops, e.g. to compare memory).
Their RMS factors are a float64 sum rounded once to fp32, as in the packed engine, so a model's int8 codes
are the engine's.
"""

from __future__ import annotations

import torch

from mulfree.kernels import cpu_module, kernel_threads
from mulfree.kernels.ternary import resolve_backend

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


class _BitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, norm_w: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        cpu, name, threads = _run()
        x2 = _rows(x)
        q, a_scale = torch.empty_like(x2), torch.empty(x2.shape[0])
        cpu.norm_quant(x2, norm_w.detach().contiguous(), eps, q, a_scale, False, name, threads)
        trits, w_scale = _ternarize(weight)
        y = torch.matmul(q, trits.t())
        del q, trits
        y.mul_(a_scale[:, None] * w_scale)
        ctx.save_for_backward(x2, norm_w, weight)
        ctx.eps = eps
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, norm_w, weight = ctx.saved_tensors
        cpu, name, threads = _run()
        dy2 = _rows(dy)
        nw = norm_w.detach().contiguous()
        dw = None
        if ctx.needs_input_grad[2]:
            xq = torch.empty_like(x2)
            cpu.norm_quant(x2, nw, ctx.eps, xq, None, True, name, threads)
            dw = torch.matmul(dy2.t(), xq)
            del xq
        trits, w_scale = _ternarize(weight)
        dxhat = torch.matmul(dy2, trits).mul_(w_scale)
        del trits
        dx, dnw = torch.empty_like(x2), torch.empty_like(nw)
        cpu.rmsnorm_bwd(x2, nw, dxhat, ctx.eps, dx, dnw, name, threads)
        return dx.view(*dy.shape[:-1], x2.shape[1]), dnw, dw, None


def bitlinear(x: torch.Tensor, norm_w: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """BitLinear on the raw input x [..., K]: RMSNorm, int8 activations, ternary weight [N, K], one matmul."""
    return _BitLinear.apply(x, norm_w, weight, eps)


class _MLGRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fi, ff, fg, lb, gw, eps, h0, keep, skip):
        cpu, name, threads = _run()
        fi, ff, fg = fi.contiguous(), ff.contiguous(), fg.contiguous()
        h, out = torch.empty_like(fi), torch.empty_like(fi)
        lb_ = None if lb is None else lb.detach().contiguous()
        h0_ = None if h0 is None else h0.detach().contiguous()
        keep_ = None if keep is None else keep.to(torch.uint8).contiguous()
        cpu.mlgru_fwd(fi, ff, fg, lb_, gw.detach().contiguous(), eps, h0_, keep_, skip, h, out, name, threads)
        ctx.save_for_backward(fi, ff, fg, lb_, gw, h0_, keep_, h)
        ctx.eps, ctx.skip = eps, skip
        ctx.set_materialize_grads(False)
        return out, h

    @staticmethod
    def backward(ctx, dout, dh):
        fi, ff, fg, lb, gw, h0, keep, h = ctx.saved_tensors
        cpu, name, threads = _run()
        dout = torch.zeros_like(fi) if dout is None else dout.contiguous()
        dfi, dff, dfg = torch.empty_like(fi), torch.empty_like(fi), torch.empty_like(fi)
        dgw, dlb = torch.empty_like(gw), torch.empty(fi.shape[-1])
        dh0 = None if h0 is None else torch.empty_like(h0)
        cpu.mlgru_bwd(fi, ff, fg, lb, gw.detach().contiguous(), ctx.eps, h0, keep, ctx.skip, h, dout,
                      None if dh is None else dh.contiguous(), dfi, dff, dfg, dgw, dlb, dh0, name, threads)
        return dfi, dff, dfg, (dlb if lb is not None else None), dgw, None, dh0, None, None


def mlgru(fi: torch.Tensor, ff: torch.Tensor, fg: torch.Tensor, lb: torch.Tensor | None, gw: torch.Tensor,
          eps: float, h0: torch.Tensor | None = None, keep: torch.Tensor | None = None,
          skip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLGRU after its projections, gates [B, T, D] -> (rmsnorm(fg) · gw · silu(h), states h [B, T, D]);
    keeps the gates and the states for backward."""
    return _MLGRU.apply(fi, ff, fg, lb, gw, eps, h0, keep, skip)


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        cpu, name, threads = _run()
        g2 = _rows(gate_up)
        out = torch.empty(g2.shape[0], g2.shape[1] // 2)
        cpu.glu_fwd(g2, out, name, threads)
        ctx.save_for_backward(g2)
        return out.view(*gate_up.shape[:-1], out.shape[1])

    @staticmethod
    def backward(ctx, dz: torch.Tensor):
        (g2,) = ctx.saved_tensors
        cpu, name, threads = _run()
        dg = torch.empty_like(g2)
        cpu.glu_bwd(g2, _rows(dz), dg, name, threads)
        return dg.view(*dz.shape[:-1], g2.shape[1])


def glu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up of gate_up [..., 2I], keeping only gate_up for backward."""
    return _GLU.apply(gate_up)
