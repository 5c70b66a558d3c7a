"""Triton kernels for GPU training: the fused BitLinear and the MLGRU recurrence (fused-recurrent, chunked).

Each is tested against its pure-torch reference on the CPU under TRITON_INTERPRET=1. Importing this package
needs no triton: the entry points load their module (and triton) on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

_EXPORTS = {
    "fused_bitlinear": "bitlinear",
    "bitlinear_ref": "bitlinear",
    "fused_recurrent": "mlgru",
    "chunked": "mlgru",
}
__all__ = ["available", "bitlinear_ref", "chunked", "fused_bitlinear", "fused_recurrent"]


def available() -> bool:
    """True when triton is installed and has somewhere to run: a CUDA device, or TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
