"""Python entry points of the ShiftAdd LUT GEMV kernel, with the pure-torch fallback.

`backend` is one of `mulfree.kernels.BACKENDS` (None = `mulfree.kernels.backend()`); "reference"
or a missing extension runs `mulfree.ops.bcq.bcq_lut_gemv` on the stored planes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mulfree.kernels import backend as default_backend
from mulfree.kernels import cpu_module
from mulfree.ops.bcq import bcq_lut_gemv

LANES = 16  # rows per kernel tile


@dataclass
class LutWeights:
    """Latency-mode BCQ weights in storage layout and in the kernel's tile layout."""

    planes: torch.Tensor  # uint8 [q, N, C]
    exps: torch.Tensor  # int8 [C, NG, q, T]
    signs: torch.Tensor  # int8 [C, NG, q, T]
    tiles: torch.Tensor  # uint8 [ceil(N/16), C, q, 16]
    n: int
    group: int


def prepare(planes: torch.Tensor, exps: torch.Tensor, signs: torch.Tensor, n: int, group: int) -> LutWeights:
    """Re-lay stored planes [q, N, C] as row tiles [ceil(N/16), C, q, 16] for the kernel."""
    q, _, c = planes.shape
    nt = -(-n // LANES)
    padded = torch.nn.functional.pad(planes, (0, 0, 0, nt * LANES - n))
    tiles = padded.view(q, nt, LANES, c).permute(1, 3, 0, 2).contiguous()
    return LutWeights(planes, exps.contiguous(), signs.contiguous(), tiles, n, group)


def lut_gemv(x: torch.Tensor, w: LutWeights, backend: str | None = None, threads: int = 1) -> torch.Tensor:
    """y [N] = W x for x fp32 [K] on Latency-mode BCQ weights (`prepare` output)."""
    name = backend or default_backend()
    if name == "reference" or cpu_module() is None:
        return bcq_lut_gemv(x, w.planes, w.exps, w.signs, w.n, w.group)
    y = torch.empty(w.n, dtype=torch.float32)
    cpu_module().shiftadd_lut_gemv(
        x.float().contiguous(), w.tiles, w.exps, w.signs, y, w.n, w.group, name, threads
    )
    return y
