"""Python entry points of the packed ternary kernels, each with its pure-torch fallback.

`backend` is one of `mulfree.kernels.BACKENDS` (None = `mulfree.kernels.backend()`); "reference"
or a missing extension runs the torch references in `mulfree.ops.pack` / `mulfree.ops.fused`.
`threads` = 0 uses every core.
"""

from __future__ import annotations

import torch

from mulfree.kernels import backend as default_backend
from mulfree.kernels import cpu_module
from mulfree.ops import fused
from mulfree.ops.pack import FORMAT, packed_format, padded_k


def resolve_backend(backend: str | None) -> str:
    """The backend to run: the argument, else MULFREE_BACKEND / the best available one."""
    name = backend or default_backend()
    if name != "reference" and cpu_module() is None:
        return "reference"
    return name


def ternary_matmul(packed: torch.Tensor, n: int, q: torch.Tensor, backend: str | None = None,
                   threads: int = 0, fmt: str = FORMAT) -> torch.Tensor:
    """Exact out[t, n] = sum_k trit[n, k] * q[t, k], int32 [T, n]; q int8 [T, K] (zero-padded to Kpad here);
    `packed` in format `fmt` (`mulfree.ops.pack.packed_format`: mulfree-t2 / t2, mulfree-t1 / t1)."""
    f = packed_format(fmt)
    name = resolve_backend(backend)
    if name == "reference":
        return f.matmul_ref(packed, n, q)
    k = q.shape[1]
    qp = torch.zeros(q.shape[0], f.padded_k(k), dtype=torch.int8)
    qp[:, :k] = q
    sumq = q.to(torch.int32).sum(dim=1, dtype=torch.int32)
    out = torch.full((q.shape[0], n), -(2**31), dtype=torch.int32)  # poisoned: the kernel must write every value
    cpu_module().ternary_matmul(packed.contiguous(), n, qp, sumq, out, name, threads, format=f.short, k=k)
    return out


def rmsnorm_quant(x: torch.Tensor, w: torch.Tensor, eps: float,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused RMSNorm + int8 quantization of x [T, K]: (q int8 [T, Kpad], a_scale fp32 [T], sumq int32 [T])."""
    name = resolve_backend(backend)
    if name == "reference":
        return fused.rmsnorm_quant_ref(x, w, eps)
    t, k = x.shape
    q = torch.full((t, padded_k(k)), 99, dtype=torch.int8)  # poisoned: the kernel must write every byte
    a_scale = torch.full((t,), float("nan"))
    sumq = torch.empty(t, dtype=torch.int32)
    cpu_module().rmsnorm_quant(x.float().contiguous(), w.float().contiguous(), eps, q, a_scale, sumq, name)
    return q, a_scale, sumq


def bitlinear_packed(packed: torch.Tensor, n: int, scale: float, norm_w: torch.Tensor, x: torch.Tensor, eps: float,
                     backend: str | None = None, threads: int = 0, fmt: str = FORMAT) -> torch.Tensor:
    """BitLinear on packed weights (format `fmt`): RMSNorm -> int8 -> ternary matmul -> scales; x [T, K] -> [T, n]
    fp32."""
    f = packed_format(fmt)
    name = resolve_backend(backend)
    if name == "reference":
        return fused.bitlinear_packed_ref(packed, n, scale, norm_w, x, eps, fmt=f.name)
    mod = cpu_module()
    lin = mod.PackedLinear(packed.contiguous(), n, x.shape[1], float(scale), norm_w.float().contiguous(),
                           format=f.short)
    out = torch.full((x.shape[0], n), float("nan"))
    mod.bitlinear(lin, x.float().contiguous(), out, eps, name, threads)
    return out


def mlgru_step(fi: torch.Tensor, ff: torch.Tensor, fg: torch.Tensor, lb: torch.Tensor | None, g_norm: torch.Tensor,
               eps: float, state: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MLGRU over T tokens from projections [T, D]: (out [T, D], new state [D])."""
    name = resolve_backend(backend)
    if name == "reference":
        return fused.mlgru_step_ref(fi, ff, fg, lb, g_norm, eps, state)
    d = fi.shape[1]
    st = state.float().clone().contiguous()
    out = torch.full_like(fi, float("nan"), dtype=torch.float32)
    lbt = torch.zeros(d) if lb is None else lb.float().contiguous()
    cpu_module().mlgru_step(fi.float().contiguous(), ff.float().contiguous(), fg.float().contiguous(), lbt,
                            lb is not None, g_norm.float().contiguous(), eps, st, out, name)
    return out, st


def glu_step(gate_up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """z = silu(gate) * up from gate_up [T, 2I] -> [T, I]."""
    name = resolve_backend(backend)
    if name == "reference":
        return fused.glu_step_ref(gate_up)
    out = torch.full((gate_up.shape[0], gate_up.shape[1] // 2), float("nan"))
    cpu_module().glu_step(gate_up.float().contiguous(), out, name)
    return out


def amx_available() -> bool:
    """True when the CPU has AMX-INT8 and the OS granted this process the tile state."""
    mod = cpu_module()
    return mod is not None and mod.cpu_features()["amx_int8"]


def amx_enabled() -> bool:
    """Whether AMX is available and on (`set_amx`, `MULFREE_AMX`): the extension's switch, which it only turns on
    where AMX-INT8 is usable (read on every fused backward, so it skips `cpu_features()`)."""
    mod = cpu_module()
    return mod is not None and mod.amx_enabled()


def set_amx(enabled: bool) -> bool:
    """Route ternary GEMMs of >= 8 tokens on the avx512 backend through AMX tiles (default where available,
    `MULFREE_AMX=0` turns it off); returns the previous setting."""
    if not amx_available():
        if enabled:
            raise RuntimeError("AMX-INT8 is not available on this CPU / OS; the avx512 VNNI kernels are used")
        return False
    return cpu_module().set_amx(enabled)
