"""Kernel dispatch: the compiled `_cpu` extension when it is present, else pure-torch references.

`MULFREE_BACKEND=reference|scalar|avx2|avxvnni|avx512` forces a path (tests use it to cover every one);
otherwise the best path the running CPU supports is chosen. `ops/` holds the reference of every
kernel; this package imports nothing else from mulfree.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
    return list(_available())


@lru_cache(maxsize=1)
def _available() -> tuple[str, ...]:
    """`available_backends`, probed once (CPU features do not change while the process runs)."""
    mod = cpu_module()
    if mod is None:
        return ("reference",)
    feats = mod.cpu_features()
    out = ["reference", "scalar"]
    if feats["avx2"]:
        out.append("avx2")
    if feats["avxvnni"]:
        out.append("avxvnni")
    if feats["avx512vnni"]:
        out.append("avx512")
    return tuple(out)


class BackendError(ValueError):
    """A `MULFREE_BACKEND` value this machine cannot run (the CLI reports it in one line)."""


def backend() -> str:
    """The backend to use now: `MULFREE_BACKEND` if set (and available), else the fastest one."""
    forced = os.environ.get("MULFREE_BACKEND", "").strip().lower()
    avail = _available()
    if forced:
        if forced not in BACKENDS:
            raise BackendError(f"MULFREE_BACKEND={forced!r} is unknown; use one of {', '.join(BACKENDS)}")
        if forced not in avail:
            raise BackendError(f"MULFREE_BACKEND={forced!r} is not available on this machine; use one of "
                               f"{', '.join(avail)}")
        return forced
    return avail[-1]


_override = threading.local()  # the calling thread's innermost `use_threads` kernel count
_torch_turn = threading.Lock()
_torch_users = 0  # open `use_threads` contexts that set torch's thread count, on any thread
_torch_saved = 1  # torch's thread count before the first of them


def kernel_threads() -> int:
    """Threads our kernels use now: this thread's innermost `use_threads` value, else torch's thread count."""
    value = getattr(_override, "kernels", None)
    if value is not None:
        return value
    import torch

    return torch.get_num_threads()


@contextmanager
def use_threads(kernels: int, torch_ops: int | None = None) -> Iterator[None]:
    """Run our kernels on `kernels` threads and, if given, torch's own ops on `torch_ops` meanwhile.

    Two pools that both spin on a 2-core host slow each other down when a decode step alternates
    between them hundreds of times (docs/shiftadd.md): a decode loop of tiny torch ops runs them on one
    thread and keeps both cores for the LUT kernels. The kernel count is per calling thread; torch's count is
    one per process, so it goes back to its value before the first context when the last one ends (threads
    restoring each other's values in turn left it at one thread for good).
    """
    import torch

    global _torch_users, _torch_saved
    saved = getattr(_override, "kernels", None)
    _override.kernels = max(1, kernels)
    if torch_ops is not None:
        with _torch_turn:
            if _torch_users == 0:
                _torch_saved = torch.get_num_threads()
            _torch_users += 1
            torch.set_num_threads(max(1, torch_ops))
    try:
        yield
    finally:
        _override.kernels = saved
        if torch_ops is not None:
            with _torch_turn:
                _torch_users -= 1
                if _torch_users == 0:
                    torch.set_num_threads(_torch_saved)
