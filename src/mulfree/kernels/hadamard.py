"""Dispatch for the online side of randomized Hadamard incoherence (`RandomHadamard.apply_input` and
`invert_output`): the C++ kernel (`kernels/cpu/hadamard.cpp`, one pass of copy, sign flips, butterflies and a
power-of-two scale per row) for float32 CPU tensors outside autograd, else the torch reference in
`mulfree.ops.hadamard`; both compute the same operations in the same order and agree bit for bit (the
kernel's AVX2 loops too: each output is the same single add or subtract). Rows split over `kernel_threads()`."""

from __future__ import annotations

import torch

from mulfree.kernels import backend as current_backend
from mulfree.kernels import cpu_module, kernel_threads
from mulfree.ops.hadamard import RandomHadamard


def _native(x: torch.Tensor, backend: str | None) -> str | None:
    """The backend the C++ kernel runs `x` on, or None when the torch reference must (no extension, the
    `reference` backend, another dtype or device, or autograd)."""
    name = backend or current_backend()
    usable = (
        cpu_module() is not None
        and name != "reference"
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not (x.requires_grad and torch.is_grad_enabled())
    )
    return name if usable else None


def _check(r: RandomHadamard, x: torch.Tensor) -> None:
    if x.shape[-1] != r.dim:
        raise ValueError(f"input width {x.shape[-1]} does not match the transform's {r.dim}")


def _run(r: RandomHadamard, x: torch.Tensor, shift: int, signs_first: bool, backend: str) -> torch.Tensor:
    rows = x.reshape(-1, r.dim).contiguous()
    y = torch.empty_like(rows)
    cpu_module().hadamard(rows, y, r.negative, r.block, shift, signs_first, backend, kernel_threads())
    return y.view(x.shape)


def apply_input(r: RandomHadamard, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """x' = T x (equal to `r.apply_input(x)`)."""
    _check(r, x)
    name = _native(x, backend)
    return r.apply_input(x) if name is None else _run(r, x, r.shift_in, True, name)


def invert_output(r: RandomHadamard, y: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """y = U⁻¹ y'' (equal to `r.invert_output(y)`)."""
    _check(r, y)
    name = _native(y, backend)
    return r.invert_output(y) if name is None else _run(r, y, r.shift_w, False, name)
