"""Python entry points of the ShiftAdd LUT kernels (one-token GEMV, T-token GEMM), with the
pure-torch fallback.

`backend` is one of `mulfree.kernels.BACKENDS` (None = `mulfree.kernels.backend()`); "reference"
or a missing extension runs `mulfree.ops.bcq.bcq_lut_gemv` on the stored planes (token by token
for the GEMM). The compiled GEMM runs the GEMV's per-token kernels, so its row t equals
`lut_gemv(x[t])` bit for bit on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mulfree.kernels import backend as default_backend
from mulfree.kernels import cpu_module
from mulfree.ops.bcq import bcq_lut_gemv

LANES = 16  # rows per kernel tile (one 16-float vector)
QUAD = 4  # tiles per quad: the 4 bytes of one 32-bit key lane


@dataclass
class LutWeights:
    """Latency-mode BCQ weights in storage layout and in the kernel's quad layout."""

    planes: torch.Tensor  # uint8 [q, N, C] (stored layout, for the reference path)
    exps: torch.Tensor  # int8 [C, NG, q, T]
    signs: torch.Tensor  # int8 [C, NG, q, T]
    kexps: torch.Tensor  # int8 [NG, C, q, T]: exps with the row group outermost (kernel order)
    ksigns: torch.Tensor  # int8 [NG, C, q, T]
    escale: torch.Tensor  # fp32 [NG, C, q, T]: exponent, -inf where the term is absent
    keys: torch.Tensor  # uint8 [ceil(N/64), C, q, 16, 4]: [Q, c, i, l, b] = key of row 64Q + 16b + l
    n: int
    group: int
    layer: tuple | None = None  # (rht, rht_out, bias) of the layer `forward` runs, set by `attach_layer`
    native: object | None = field(
        default=None, repr=False, compare=False
    )  # extension handle, made on first use

    def __getstate__(self) -> dict:
        return {**self.__dict__, "native": None}  # copies and pickles rebuild the handle

    def handle(self) -> object:
        """The extension's `ShiftAddWeights` over these tensors (no copy), created once."""
        if self.native is None:
            native = cpu_module().ShiftAddWeights(self.keys, self.kexps, self.ksigns, self.escale, self.n, self.group)
            if self.layer is not None:
                rht, rht_out, bias = self.layer
                if rht is not None:
                    native.set_input_transform(rht.negative, rht.block, rht.shift_in)
                neg = None if rht_out is None else rht_out.negative
                native.set_output(neg, 1 if rht_out is None else rht_out.block,
                                  0 if rht_out is None else rht_out.shift_w, bias)
            self.native = native
        return self.native

    def attach_layer(self, rht, rht_out, bias: torch.Tensor | None) -> None:
        """Make `forward` the whole layer: input transform `rht`, output inverse `rht_out` (RandomHadamard or
        None) and `bias` (fp32 [N] or None, read in place) around the product."""
        self.layer = (rht, rht_out, None if bias is None else bias.detach().float().contiguous())
        self.native = None


def prepare(planes: torch.Tensor, exps: torch.Tensor, signs: torch.Tensor, n: int, group: int) -> LutWeights:
    """Re-lay stored planes [q, N, C] as quads [ceil(N/64), C, q, 16, 4], in the order the kernel reads them."""
    q, _, c = planes.shape
    nq = -(-n // (LANES * QUAD))
    padded = torch.nn.functional.pad(planes, (0, 0, 0, nq * LANES * QUAD - n))
    keys = padded.view(q, nq, QUAD, LANES, c).permute(1, 4, 0, 3, 2).contiguous()
    kexps, ksigns = exps.transpose(0, 1).contiguous(), signs.transpose(0, 1).contiguous()
    escale = torch.where(ksigns != 0, kexps.float(), torch.tensor(float("-inf")))
    return LutWeights(planes, exps, signs, kexps, ksigns, escale, keys, n, group)


def lut_gemv(x: torch.Tensor, w: LutWeights, backend: str | None = None, threads: int = 1) -> torch.Tensor:
    """y [N] = W x for x fp32 [K] on Latency-mode BCQ weights (`prepare` output)."""
    name = backend or default_backend()
    if name == "reference" or cpu_module() is None:
        return bcq_lut_gemv(x, w.planes, w.exps, w.signs, w.n, w.group)
    y = torch.empty(w.n, dtype=torch.float32)
    w.handle().gemv(x.float().contiguous(), y, name, threads)
    return y


def lut_gemm(x: torch.Tensor, w: LutWeights, backend: str | None = None, threads: int = 1) -> torch.Tensor:
    """Y [T, N] = X Wᵀ for X fp32 [T, K] on Latency-mode BCQ weights (`prepare` output).

    Per token the same lookup tables and key lookups as `lut_gemv` (row t of Y equals
    `lut_gemv(X[t])` exactly); tokens are tiled so each 128-row key block is read once per tile.
    No dense weight is built. Example: `lut_gemm(torch.randn(16, 576), w, threads=2)` -> [16, N].
    """
    name = backend or default_backend()
    x = x.float().contiguous()
    if name == "reference" or cpu_module() is None:
        rows = [bcq_lut_gemv(xt, w.planes, w.exps, w.signs, w.n, w.group) for xt in x]
        return torch.stack(rows) if rows else torch.empty(0, w.n)
    y = torch.empty(x.shape[0], w.n, dtype=torch.float32)
    w.handle().gemm(x, y, name, threads)
    return y


def forward(x: torch.Tensor, w: LutWeights, backend: str | None = None, threads: int = 1) -> torch.Tensor:
    """The attached layer (`attach_layer`) on X fp32 [T, K]: Y = U⁻¹ (W (T X)) + b in one native call.

    Equal bit for bit to composing `kernels.hadamard`, `lut_gemv` / `lut_gemm` and the bias add, which is
    what runs on the "reference" backend or without the extension; one call per linear keeps the
    Python overhead of a decode step small next to its LUT work.
    """
    name = backend or default_backend()
    if name == "reference" or cpu_module() is None:
        from mulfree.kernels import hadamard

        rht, rht_out, bias = w.layer or (None, None, None)
        x = x if rht is None else hadamard.apply_input(rht, x, name)
        y = lut_gemm(x, w, name)  # row t equals lut_gemv(x[t])
        y = y if rht_out is None else hadamard.invert_output(rht_out, y, name)
        return y if bias is None else y + bias
    y = torch.empty(x.shape[0], w.n, dtype=torch.float32)
    w.handle().forward(x, y, name, threads)
    return y
