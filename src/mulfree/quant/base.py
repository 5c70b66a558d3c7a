"""What every PTQ method implements (`QuantMethod`) and the per-layer calibration statistics the
walker feeds it (`HessianStats`, filled by forward hooks as GPTQ's per-layer `add_batch`).

A method gets one linear at a time: its weight W [N, K] (float32, `nn.Linear` layout), the
statistics' H = mean xᵀx [K, K] (None without calibration) and the bias, and returns the quantized
layer (`qlinear.py`). With asymmetric calibration the walker first replaces W by the least-squares
target `asymmetric_target(W, H, C)`, C = mean xᵀx_fp from the same statistics.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D: the layers the walker quantizes."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """W [out, in] of nn.Linear or GPT-2 Conv1D (stored [in, out])."""
    w = module.weight.detach()
    return w.T if type(module).__name__ == "Conv1D" else w


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as float32 rows [M, K]."""
    return x.reshape(-1, x.shape[-1]).float()


class HessianStats:
    """Calibration statistics of one linear input: H = Σ xᵀx over its input rows and, when the FP
    model's input of the same layer is passed too, C = Σ xᵀx_fp (the asymmetric target's cross term).

    Linears fed the same tensor (q/k/v, gate/up) share one object, so each product is formed once.
    Example:
        stats = HessianStats(k)
        handle = linear.register_forward_hook(lambda _m, args, out: stats.add_batch(args[0], out))
        ...  # run the calibration batches
        h = stats.hessian()  # [K, K]
    """

    STRIP = 256  # H's upper triangle is summed in row strips of about this many rows (see `_add_upper`)

    def __init__(self, columns: int):
        self.h = torch.zeros(columns, columns)  # while summing, only the upper triangle is current
        self.c: torch.Tensor | None = None
        self.rows = 0

    def add_batch(
        self, inp: torch.Tensor, out: torch.Tensor | None = None, fp_inp: torch.Tensor | None = None
    ) -> None:
        """Add one batch: `inp` [..., K] the layer's input (`out` unused, as GPTQ's hook signature has
        it); `fp_inp` [..., K] the same layer's input in the FP model on the same calibration batch."""
        if self.rows < 0:
            raise RuntimeError("HessianStats: add_batch after hessian() or cross()")
        x = _rows(inp)
        self._add_upper(x)
        if fp_inp is not None:
            if self.c is None:
                self.c = torch.zeros_like(self.h)
            self.c.addmm_(x.T, _rows(fp_inp))
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = mean over calibration rows of x xᵀ: [K, K] float32 (the sums become the means in place, once:
        a 5632-wide H is 127 MB, and linears sharing an input share it)."""
        self._to_means()
        return self.h

    def cross(self) -> torch.Tensor:
        """C = mean over calibration rows of x x_fpᵀ: [K, K] (zeros when no FP input was added)."""
        self._to_means()
        return self.c if self.c is not None else torch.zeros_like(self.h)

    def drop_cross(self) -> None:
        """Free C once every asymmetric target that needs it is made."""
        self.c = None

    def _add_upper(self, x: torch.Tensor) -> None:
        """Add the upper triangle of xᵀx in place, strip by strip (each strip's rows against the columns from its
        first row on): H is symmetric, so s strips do (s + 1) / 2s of the full product's work, at about the full
        product's speed per FLOP (docs/shiftadd.md, Limits)."""
        for r0, r1 in self._strips():
            self.h[r0:r1, r0:].addmm_(x[:, r0:r1].T, x[:, r0:])

    def _strips(self) -> list[tuple[int, int]]:
        k = self.h.shape[0]
        width = -(-k // -(-k // self.STRIP))
        return [(r0, min(k, r0 + width)) for r0 in range(0, k, width)]

    def _to_means(self) -> None:
        if self.rows >= 0:
            for r0, r1 in self._strips():  # the lower triangle from the upper: exactly symmetric
                self.h[r1:, r0:r1] = self.h[r0:r1, r1:].T
                # a strip's diagonal block too: a GEMM may sum its (i, j) and (j, i) in different orders (AVX2 hosts)
                block = self.h[r0:r1, r0:r1]
                upper = torch.ones(r1 - r0, r1 - r0, dtype=torch.bool).triu()
                block.copy_(torch.where(upper, block, block.T))
            for sums in (self.h, self.c):
                if sums is not None:
                    sums.div_(max(self.rows, 1))
            self.rows = -1  # means now; add_batch refuses further batches


def asymmetric_target(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, percdamp: float) -> torch.Tensor:
    """W' = argmin ‖X_fp Wᵀ − X_q W'ᵀ‖ = W Cᵀ H⁻¹ with H = X_qᵀX_q, C = X_qᵀX_fp (both per token), written
    W + W (C − H)ᵀ H_d⁻¹ with H dampened as the solver does, so that W' = W where the two streams agree.
    Quantizing W' against H then minimizes the asymmetric objective (up to a constant)."""
    return asymmetric_solve(w, h, asymmetric_rhs(w, h, cross), percdamp)


def asymmetric_rhs(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """(C − H) Wᵀ [K, N] of `asymmetric_target`, without a [K, K] temporary (C can be freed after it)."""
    wt = w.float().T
    return (cross.float() @ wt).sub_(h.float() @ wt)


def asymmetric_solve(w: torch.Tensor, h: torch.Tensor, rhs: torch.Tensor, percdamp: float) -> torch.Tensor:
    """W + (H_d⁻¹ rhs)ᵀ by a Cholesky solve in fp32, like the GPTQ solve (Frantar et al. factor H in fp32 too):
    besides H, two [K, K] matrices are alive at once."""
    h = h.float()
    h_d = h.clone()
    h_d.diagonal().add_(percdamp * torch.diag(h).mean() + 1e-12)  # H_d, as the solver dampens it
    lower = torch.linalg.cholesky(h_d)
    del h_d
    return w.float() + torch.cholesky_solve(rhs, lower).T


class QuantMethod(Protocol):
    """A PTQ method as the walker (`walker.quantize_model`) drives it; RTN, GPTQ and ShiftAdd subclass
    this explicitly and inherit the defaults below.

    Per decoder block the walker asks `make_stats` for each distinct linear input (when
    `needs_stats`), feeds the statistics by hooks, calls `assign_bits` once with every linear's
    (W, H) and then `quantize` per linear in call order.
    """

    name: str  # saved as the dir's `quant_method`
    needs_stats: bool  # calibration statistics (H) required; without them `quantize` gets h=None
    percdamp: float = 0.01  # H dampening (fraction of mean diag) of the solve and the asymmetric target

    @property
    def needs_block_stats(self) -> bool:
        """Whether `assign_bits` reads every linear's H before the first is quantized (the walk then collects them
        all from the unquantized block first)."""
        return False

    @property
    def needs_hessian(self) -> bool:
        """Former name of `needs_stats`."""
        return self.needs_stats

    def config(self) -> dict:
        """The method's settings, saved in the quantized dir's config.json."""
        ...

    def make_stats(self, layer: nn.Module) -> HessianStats:
        """Empty statistics for `layer`'s input."""
        return HessianStats(linear_weight(layer).shape[1])

    def resume_after(self, layers: int) -> None:
        """Continue a walk whose first `layers` linears an earlier run quantized (`quant.resume`): a method whose
        layers depend on their index sets it here."""

    def assign_bits(self, layers: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, int]:
        """Bits per linear of one block from {name: (W, H)}; {} = the method's own width everywhere."""
        return {}

    def quantize(
        self, w: torch.Tensor, h: torch.Tensor | None, bias: torch.Tensor | None, bits: int | None = None
    ) -> nn.Module:
        """The quantized layer for W [N, K] fitted against H [K, K] (or without H); `bits` overrides
        the method's width (from `assign_bits`)."""
        ...
