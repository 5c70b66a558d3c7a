"""Dispatch for L-Mul matmul: the C++ kernel for float32/bfloat16 operands, else the torch reference.

bfloat16 and k-bit-rounded float32 operands are float32 values with zero low mantissa bits and the same
exponent range, so one float32 kernel serves them (with the OFFSET for l(k)); float16 and fp8 operands
have other exponent ranges and use the reference `mulfree.ops.lmul.lmul_matmul`.
"""

from __future__ import annotations

import torch

from mulfree.kernels import backend as current_backend
from mulfree.kernels import cpu_module
from mulfree.ops import lmul as ref


def lmul_matmul(
    a: torch.Tensor, b: torch.Tensor, mantissa_bits: int | None = None, backend: str | None = None
) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] with L-Mul products and float32 accumulation -> float32 [..., M, N].

    Equal bit for bit to `mulfree.ops.lmul.lmul_matmul` on every backend. `backend` overrides
    `mulfree.kernels.backend()` (reference | scalar | avx2 | avxvnni | avx512; avxvnni runs
    the avx2 code); the kernel uses `torch.get_num_threads()` threads.
    """
    name = backend or current_backend()
    mod = cpu_module()
    if name == "reference" or mod is None or a.dtype not in (torch.float32, torch.bfloat16):
        return ref.lmul_matmul(a, b, mantissa_bits)
    if a.dtype != b.dtype:
        raise ValueError(f"lmul_matmul needs operands of one dtype; got {a.dtype} and {b.dtype}")
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"lmul_matmul shapes do not chain: {tuple(a.shape)} @ {tuple(b.shape)}")
    fmt = ref.float_format(a.dtype)
    k = fmt.man_bits if mantissa_bits is None else mantissa_bits
    if not 1 <= k <= fmt.man_bits:
        raise ValueError(f"mantissa_bits must be in 1..{fmt.man_bits} for {fmt.name}; got {mantissa_bits}")
    if k < fmt.man_bits:
        a, b = ref.round_mantissa(a, k), ref.round_mantissa(b, k)
    # bf16 -> f32 is exact and keeps the OFFSET: (127 << 23) - ((1 << 23) >> l(k)).
    offset = ref.lmul_offset(ref.FORMATS[torch.float32], k)
    a, b = a.detach().float(), b.detach().float()
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, n = a.shape[-2], b.shape[-1]
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, m, a.shape[-1])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    outs = [
        torch.from_numpy(mod.lmul_matmul_f32(x.contiguous(), y.contiguous(), offset, name, torch.get_num_threads()))
        for x, y in zip(a3, b3)
    ]
    if not outs:
        return torch.zeros(*batch, m, n)
    return torch.stack(outs).reshape(*batch, m, n)
