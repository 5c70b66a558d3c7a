"""Kernel dispatch: the compiled `_cpu` extension when it is present, else pure-torch references.

`MULFREE_BACKEND=reference|scalar|avx2|avxvnni|avx512` forces a path (tests use it to cover every one);
otherwise the best path the running CPU supports is chosen. `ops/` holds the reference of every
kernel; this package imports nothing else from mulfree.
"""

from __future__ import annotations

import os
from functools import lru_cache
from types import ModuleType

BACKENDS = ("reference", "scalar", "avx2", "avxvnni", "avx512")


@lru_cache(maxsize=1)
def cpu_module() -> ModuleType | None:
    """The compiled extension, or None when the package was installed without it."""
    try:
        from mulfree.kernels import _cpu
    except ImportError:
        return None
    return _cpu


def available_backends() -> list[str]:
    """Backends usable on this machine, slowest first."""
    mod = cpu_module()
    if mod is None:
        return ["reference"]
    feats = mod.cpu_features()
    out = ["reference", "scalar"]
    if feats["avx2"]:
        out.append("avx2")
    if feats["avxvnni"]:
        out.append("avxvnni")
    if feats["avx512vnni"]:
        out.append("avx512")
    return out


def backend() -> str:
    """The backend to use now: `MULFREE_BACKEND` if set (and available), else the fastest one."""
    forced = os.environ.get("MULFREE_BACKEND", "").strip().lower()
    avail = available_backends()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"MULFREE_BACKEND={forced!r} is unknown; use one of {', '.join(BACKENDS)}")
        if forced not in avail:
            raise RuntimeError(
                f"MULFREE_BACKEND={forced!r} is not available on this machine; available: {', '.join(avail)}"
            )
        return forced
    return avail[-1]
