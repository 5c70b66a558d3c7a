"""L-Mul (Luo & Sun, arXiv 2410.00907): a float product as ONE integer addition on the bit patterns.

Float x = (-1)^s · (1 + x_m) · 2^{x_e}. L-Mul replaces the mantissa product by a constant:

    L-Mul(x, y) = (1 + x_m + y_m + 2^{-l(k)}) · 2^{x_e + y_e},  l(k) = k if k <= 3; 3 if k == 4; 4 if k > 4

realised on the bit patterns (sign bit excluded) as the hardware would do it:

    out[mag] = x[mag] + y[mag] - OFFSET,   OFFSET = (bias << m) - ((1 << m) >> l(k))
    out[sign] = x[sign] xor y[sign]

A mantissa carry (x_m + y_m + 2^-l >= 1) flows into the exponent, so the result is 2^{e+1}·(x_m + y_m + 2^-l)
rather than the paper's literal formula; this is the form of the paper's PTX and of all hardware.

Bit fields (ggml style), sign | exponent | mantissa:

    float32      s eeeeeeee mmmmmmmmmmmmmmmmmmmmmmm   bias 127  OFFSET 0x3F780000
    bfloat16     s eeeeeeee mmmmmmm                   bias 127  OFFSET 0x3F78
    float16      s eeeee mmmmmmmmmm                   bias 15   OFFSET 0x3BC0
    fp8 e4m3fn   s eeee mmm                           bias 7    OFFSET 0x37  (no inf; 0x7F = NaN)
    fp8 e5m2     s eeeee mm                           bias 15   OFFSET 0x3B

Special values (the paper gives none; ours, exact and tested):
- zero or subnormal operand -> ±0 (subnormals flush to zero), sign by xor; never NaN from finite inputs;
- result magnitude below the smallest normal (underflow) -> ±0;
- overflow -> ±inf for IEEE formats; fp8 e4m3fn has no inf, so it saturates to ±448 (0x7E);
- NaN operand -> NaN; inf · nonzero -> ±inf; inf · 0 -> NaN (canonical positive quiet NaN).

`mantissa_bits=k` first rounds each operand to k mantissa bits (round-half-even on the bit pattern) and
uses l(k): "L-Mul with a k-bit mantissa". `fp_bits_add` is the shared primitive (also used by ShiftAdd:
multiplying by 2^P is adding P << m to the bit pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    """Bit layout of one float format: exponent/mantissa widths, bias and the integer dtype to view it as."""

    name: str
    dtype: torch.dtype
    view_dtype: torch.dtype
    exp_bits: int
    man_bits: int
    has_inf: bool

    @property
    def bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def sign_bit(self) -> int:
        return 1 << (self.exp_bits + self.man_bits)

    @property
    def mag_mask(self) -> int:
        return self.sign_bit - 1

    @property
    def min_normal(self) -> int:
        """Magnitude field of the smallest normal number."""
        return 1 << self.man_bits

    @property
    def inf_field(self) -> int:
        """Magnitude field with all exponent bits set (inf for IEEE formats)."""
        return ((1 << self.exp_bits) - 1) << self.man_bits

    @property
    def max_finite(self) -> int:
        """Magnitude field of the largest finite number (e4m3fn: 0x7E = 448)."""
        return self.inf_field - 1 if self.has_inf else self.mag_mask - 1

    @property
    def nan_bits(self) -> int:
        """The canonical quiet NaN this module returns."""
        return self.inf_field | (1 << (self.man_bits - 1)) if self.has_inf else self.mag_mask


FORMATS: dict[torch.dtype, FloatFormat] = {
    f.dtype: f
    for f in (
        FloatFormat("float32", torch.float32, torch.int32, 8, 23, True),
        FloatFormat("bfloat16", torch.bfloat16, torch.int16, 8, 7, True),
        FloatFormat("float16", torch.float16, torch.int16, 5, 10, True),
        FloatFormat("float8_e4m3fn", torch.float8_e4m3fn, torch.uint8, 4, 3, False),
        FloatFormat("float8_e5m2", torch.float8_e5m2, torch.uint8, 5, 2, True),
    )
}


def float_format(dtype: torch.dtype) -> FloatFormat:
    """The `FloatFormat` of a supported dtype; ValueError for any other."""
    if dtype not in FORMATS:
        names = ", ".join(f.name for f in FORMATS.values())
        raise ValueError(f"L-Mul supports {names}; got {dtype}")
    return FORMATS[dtype]


def l_of(k: int) -> int:
    """The paper's offset exponent l(k) for a k-bit mantissa."""
    return k if k <= 3 else (3 if k == 4 else 4)


def lmul_offset(fmt: FloatFormat, mantissa_bits: int | None = None) -> int:
    """OFFSET = (bias << m) - ((1 << m) >> l(k)); e.g. 0x3F780000 for float32, 0x37 for e4m3."""
    k = fmt.man_bits if mantissa_bits is None else mantissa_bits
    return (fmt.bias << fmt.man_bits) - ((1 << fmt.man_bits) >> l_of(k))


def to_bits(x: torch.Tensor) -> torch.Tensor:
    """The unsigned bit pattern of `x` as int64 (sign bit included)."""
    fmt = float_format(x.dtype)
    return x.contiguous().view(fmt.view_dtype).to(torch.int64) & ((fmt.sign_bit << 1) - 1)


def from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `to_bits`: an int64 tensor of unsigned bit patterns viewed as `dtype`."""
    fmt = float_format(dtype)
    width = fmt.exp_bits + fmt.man_bits + 1
    if fmt.view_dtype != torch.uint8:  # signed view: wrap patterns with the top bit set
        bits = bits - ((bits >> (width - 1)) & 1) * (1 << width)
    return bits.to(fmt.view_dtype).view(dtype)


def _check_k(fmt: FloatFormat, mantissa_bits: int | None) -> int:
    k = fmt.man_bits if mantissa_bits is None else int(mantissa_bits)
    if not 1 <= k <= fmt.man_bits:
        raise ValueError(f"mantissa_bits must be in 1..{fmt.man_bits} for {fmt.name}; got {mantissa_bits}")
    return k


def round_bits(bits: torch.Tensor, fmt: FloatFormat, k: int) -> torch.Tensor:
    """Round bit patterns to k mantissa bits (half to even); subnormals flush to ±0, inf/NaN kept.

    Overflow while rounding gives inf (IEEE) or the largest k-bit finite value (e4m3fn).
    """
    sign = bits & fmt.sign_bit
    mag = bits & fmt.mag_mask
    special = mag >= (fmt.inf_field if fmt.has_inf else fmt.mag_mask)
    drop = fmt.man_bits - k
    if drop > 0:
        low = (1 << drop) - 1
        r = (mag + ((1 << (drop - 1)) - 1) + ((mag >> drop) & 1)) & ~low
        if not fmt.has_inf:
            r = r.clamp(max=fmt.max_finite & ~low)
    else:
        r = mag
    r = torch.where(mag < fmt.min_normal, 0, r)
    return torch.where(special, mag, r) | sign


def round_mantissa(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """`x` rounded to `mantissa_bits` mantissa bits (RNE), same dtype; subnormals flush to zero."""
    fmt = float_format(x.dtype)
    return from_bits(round_bits(to_bits(x), fmt, _check_k(fmt, mantissa_bits)), x.dtype)


def fp_bits_add(bits: torch.Tensor, fmt: FloatFormat, addend: torch.Tensor | int) -> torch.Tensor:
    """Add `addend` to the magnitude field of bit patterns: the integer add behind L-Mul and shifts.

    `addend = P << fmt.man_bits` multiplies a normal float by 2^P. Results below the smallest normal
    flush to ±0; results past the largest finite become ±inf (IEEE) or saturate (e4m3fn).
    Zero/subnormal, inf and NaN inputs are returned unchanged (zero as ±0). Returns int64 bit patterns.
    """
    sign = bits & fmt.sign_bit
    mag = bits & fmt.mag_mask
    s = mag + addend
    res = torch.where(s < fmt.min_normal, 0, s)
    res = torch.where(s > fmt.max_finite, fmt.inf_field if fmt.has_inf else fmt.max_finite, res)
    res = torch.where(mag > fmt.max_finite, mag, res)  # inf / NaN unchanged
    res = torch.where(mag < fmt.min_normal, 0, res)  # zero / subnormal -> ±0
    return res | sign


def lmul_bits(xb: torch.Tensor, yb: torch.Tensor, fmt: FloatFormat, k: int) -> torch.Tensor:
    """L-Mul on int64 bit patterns already rounded to k mantissa bits; returns int64 bit patterns."""
    xm = xb & fmt.mag_mask
    ym = yb & fmt.mag_mask
    sign = (xb ^ yb) & fmt.sign_bit
    s = xm + ym - lmul_offset(fmt, k)
    res = torch.where(s < fmt.min_normal, 0, s)  # exponent underflow
    res = torch.where(s > fmt.max_finite, fmt.inf_field if fmt.has_inf else fmt.max_finite, res)
    zx, zy = xm < fmt.min_normal, ym < fmt.min_normal
    res = torch.where(zx | zy, 0, res)
    if fmt.has_inf:
        ix, iy = xm == fmt.inf_field, ym == fmt.inf_field
        res = torch.where(ix | iy, fmt.inf_field, res)
        nan = (xm > fmt.inf_field) | (ym > fmt.inf_field) | (ix & zy) | (iy & zx)
    else:
        nan = (xm == fmt.mag_mask) | (ym == fmt.mag_mask)
    return torch.where(nan, fmt.nan_bits, res | sign)


def _operand_bits(
    op: str, x: torch.Tensor, y: torch.Tensor, mantissa_bits: int | None
) -> tuple[torch.Tensor, torch.Tensor, FloatFormat, int]:
    """Bit patterns of both operands (rounded to `mantissa_bits` when given), their format and k."""
    if x.dtype != y.dtype:
        raise ValueError(f"{op} needs operands of one dtype; got {x.dtype} and {y.dtype}")
    fmt = float_format(x.dtype)
    k = _check_k(fmt, mantissa_bits)
    xb, yb = to_bits(x), to_bits(y)
    if k < fmt.man_bits:
        xb, yb = round_bits(xb, fmt, k), round_bits(yb, fmt, k)
    return xb, yb, fmt, k


def lmul(x: torch.Tensor, y: torch.Tensor, mantissa_bits: int | None = None) -> torch.Tensor:
    """Element-wise L-Mul of two same-dtype tensors (broadcasting); result in that dtype.

    Args:
        x, y: float32, bfloat16, float16, float8_e4m3fn or float8_e5m2 tensors of the same dtype.
        mantissa_bits: round operands to this many mantissa bits first and use l(k) (default: all bits).
    Example: lmul(torch.tensor([1.5]), torch.tensor([1.5])) -> tensor([2.125]).
    """
    xb, yb, fmt, k = _operand_bits("lmul", x, y, mantissa_bits)
    return from_bits(lmul_bits(*torch.broadcast_tensors(xb, yb), fmt, k), x.dtype)


def lmul_matmul(
    a: torch.Tensor, b: torch.Tensor, mantissa_bits: int | None = None, chunk_elems: int = 1 << 21
) -> torch.Tensor:
    """a @ b with every product an L-Mul (in the operands' format) and float32 accumulation.

    Reference for the C++ kernel: products are added to the float32 accumulator in ascending k order,
    one at a time, so results are reproducible bit for bit. The reduction dim is chunked so at most
    about `chunk_elems` products exist at once (memory O(output + chunk), not O(M·N·K)).

    Args:
        a: [..., M, K], b: [..., K, N] (same dtype, batch dims broadcast). Returns float32 [..., M, N].
    """
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"lmul_matmul shapes do not chain: {tuple(a.shape)} @ {tuple(b.shape)}")
    ab, bb, fmt, k = _operand_bits("lmul_matmul", a, b, mantissa_bits)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, kk, n = a.shape[-2], a.shape[-1], b.shape[-1]
    out = torch.zeros(*batch, m, n, dtype=torch.float32)
    kc = max(1, chunk_elems // max(1, out.numel()))
    for k0 in range(0, kk, kc):
        pa = ab[..., :, k0 : k0 + kc].unsqueeze(-1)  # [..., M, kc, 1]
        pb = bb[..., k0 : k0 + kc, :].unsqueeze(-3)  # [..., 1, kc, N]
        prod = from_bits(lmul_bits(pa, pb, fmt, k), a.dtype).float()  # [..., M, kc, N]
        for j in range(prod.shape[-2]):
            out += prod[..., j, :]
    return out
