"""L-Mul: bit-trick ops vs an independent float64 model of the integer-add L-Mul, special values,
the C++ `lmul_matmul` kernel vs its torch reference on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mulfree.kernels import available_backends
from mulfree.kernels.lmul import lmul_matmul as lmul_matmul_fast
from mulfree.ops.lmul import FORMATS, float_format, fp_bits_add, lmul, lmul_matmul, lmul_offset, round_mantissa

INF, NAN = float("inf"), float("nan")
# (exponent bits, mantissa bits, has inf, largest finite) per dtype, written out independently of ops.lmul.
SPEC = {
    torch.float32: (8, 23, True, float(np.finfo(np.float32).max)),
    torch.bfloat16: (8, 7, True, (2 - 2**-7) * 2.0**127),
    torch.float16: (5, 10, True, 65504.0),
    torch.float8_e4m3fn: (4, 3, False, 448.0),
    torch.float8_e5m2: (5, 2, True, 57344.0),
}


def model_lmul(x: np.ndarray, y: np.ndarray, dtype: torch.dtype, k: int | None = None) -> np.ndarray:
    """Float64 model of integer-add L-Mul from the math: frexp decomposition, mantissa carry into the
    exponent, flush of zeros/subnormals/underflow, overflow to inf (saturation for e4m3fn)."""
    ebits, m, has_inf, maxv = SPEC[dtype]
    k = m if k is None else k
    l = k if k <= 3 else (3 if k == 4 else 4)
    emin = 2 - 2 ** (ebits - 1)  # exponent of the smallest normal
    big = INF if has_inf else maxv

    def decompose(v):
        f, e = np.frexp(np.abs(v))  # |v| = f·2^e, f in [0.5, 1)
        frac = np.round((2 * f - 1) * 2.0**k) / 2.0**k  # k-bit mantissa, half to even
        e = np.where(frac >= 1, e + 1, e)
        frac = np.where(frac >= 1, 0.0, frac)
        tiny = np.abs(v) < 2.0**emin
        over = (1 + frac) * np.ldexp(1.0, e - 1) > maxv  # rounding carried past the largest finite
        if not has_inf:  # e4m3fn: saturate to the largest k-bit value
            top = np.floor((maxv / 2.0**8 - 1) * 2.0**k) / 2.0**k
            frac = np.where(over, top, frac)
            e = np.where(over, 9, e)
            over = np.zeros_like(over)
        return frac, e - 1, tiny, over & ~tiny

    xm, xe, xz, xo = decompose(x)
    ym, ye, yz, yo = decompose(y)
    s = xm + ym + 2.0**-l  # in [0, 2 + 2^-l): the mantissa field may carry once or twice
    carry = np.floor(s)
    mag = (1 + s - carry) * np.ldexp(1.0, (xe + ye + carry).astype(np.int64))
    mag = np.where(mag < 2.0**emin, 0.0, mag)
    mag = np.where(mag > maxv, big, mag)
    mag = np.where(xz | yz, 0.0, mag)
    if has_inf:
        mag = np.where(xo | yo, INF, mag)
        mag = np.where((xo & yz) | (yo & xz), NAN, mag)
    sign = np.where(np.signbit(x) ^ np.signbit(y), -1.0, 1.0)
    return sign * mag


def assert_same(got: torch.Tensor, want: np.ndarray) -> None:
    g = got.double().numpy()
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(g), nan)
    np.testing.assert_array_equal(g[~nan], want[~nan])
    np.testing.assert_array_equal(np.signbit(g[~nan]), np.signbit(want[~nan]))


def all_finite(dtype: torch.dtype) -> torch.Tensor:
    v = torch.arange(256, dtype=torch.uint8).view(dtype)
    return v[torch.isfinite(v.float())]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_fp8_exhaustive_matches_model(dtype):
    v = all_finite(dtype)
    x, y = torch.meshgrid(v, v, indexing="ij")
    assert_same(lmul(x, y), model_lmul(x.double().numpy(), y.double().numpy(), dtype))


def random_pairs(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n/2 pairs of random finite bit patterns + n/2 pairs of N(0,1)·2^U(-20,20) values."""
    g = torch.Generator().manual_seed(seed)
    fmt = float_format(dtype)
    width = fmt.exp_bits + fmt.man_bits + 1
    out = []
    for _ in range(2):
        bits = torch.randint(0, 1 << width, (n // 2,), generator=g, dtype=torch.int64)
        bits = bits - ((bits >> (width - 1)) & 1) * (1 << width)
        raw = bits.to(fmt.view_dtype).view(dtype)
        scaled = (torch.randn(n // 2, generator=g) * torch.exp2(torch.randint(-20, 21, (n // 2,), generator=g)))
        both = torch.cat([raw, scaled.to(dtype)])
        out.append(torch.where(torch.isfinite(both.float()), both, torch.zeros((), dtype=dtype)))
    return out[0], out[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_random_pairs_match_model(dtype):
    x, y = random_pairs(dtype, 1_000_000, seed=1)
    assert_same(lmul(x, y), model_lmul(x.double().numpy(), y.double().numpy(), dtype))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7])
def test_mantissa_bits_match_model(k):
    x, y = random_pairs(torch.float32, 200_000, seed=k)
    assert_same(lmul(x, y, mantissa_bits=k), model_lmul(x.double().numpy(), y.double().numpy(), torch.float32, k))


def test_paper_constants_and_examples():
    assert [lmul_offset(FORMATS[d]) for d in SPEC] == [0x3F780000, 0x3F78, 0x3BC0, 0x37, 0x3B]
    x = torch.tensor([1.0, 1.5, 3.0])
    y = torch.tensor([1.0, 1.5, -2.5])
    assert lmul(x, y).tolist() == [1.0625, 2.125, -7.25]


@pytest.mark.parametrize("dtype", list(SPEC), ids=lambda d: str(d).split(".")[-1])
def test_special_values(dtype):
    ebits, m, has_inf, maxv = SPEC[dtype]
    t = lambda *v: torch.tensor(v).to(dtype)  # noqa: E731
    z = lmul(t(0.0, -0.0, 0.0, 1.5), t(0.5, 2.0, -0.0, 0.0)).float()
    assert z.tolist() == [0.0, 0.0, 0.0, 0.0] and torch.signbit(z).tolist() == [False, True, True, False]
    big = lmul(t(maxv, -maxv), t(maxv, maxv)).float()
    assert big.tolist() == ([INF, -INF] if has_inf else [448.0, -448.0])
    assert torch.isnan(lmul(t(NAN), t(1.0)).float()).all()
    if has_inf:
        r = lmul(t(INF, -INF, INF, 2.0), t(2.0, 3.0, 0.0, INF)).float()
        assert r[:2].tolist() == [INF, -INF] and torch.isnan(r[2]) and r[3] == INF
    tiny = 2.0 ** (2 - 2 ** (ebits - 1))  # smallest normal: its square underflows
    assert lmul(t(tiny), t(tiny)).float().item() == 0.0
    sub = torch.tensor([1]).to(FORMATS[dtype].view_dtype).view(dtype)  # smallest subnormal
    assert lmul(sub, t(2.0 ** (2 ** (ebits - 1) - 2))).float().item() == 0.0


def test_never_nan_from_finite():
    v = all_finite(torch.float8_e5m2)
    x, y = torch.meshgrid(v, v, indexing="ij")
    assert not torch.isnan(lmul(x, y).float()).any()


def test_mean_relative_error_full_mantissa():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1_000_000, generator=g), torch.randn(1_000_000, generator=g)
    exact = x.double() * y.double()
    mre = ((lmul(x, y).double() - exact).abs() / exact.abs()).mean().item()
    assert abs(mre - 0.0269) < 0.0005


def test_round_mantissa_and_fp_bits_add():
    x = torch.tensor([1.0 + 2**-4, 1.0 + 3 * 2**-4, 1.4, -1.95])
    assert round_mantissa(x, 3).tolist() == [1.0, 1.25, 1.375, -2.0]
    fmt = FORMATS[torch.float16]
    h = torch.tensor([1.5, -3.0, 0.0, 60000.0, 2.0**-14], dtype=torch.float16)
    bits = fp_bits_add(h.view(torch.int16).to(torch.int64) & 0xFFFF, fmt, 2 << fmt.man_bits)
    got = (bits - ((bits >> 15) & 1) * (1 << 16)).to(torch.int16).view(torch.float16).float()
    assert got.tolist() == [6.0, -12.0, 0.0, INF, 2.0**-12]
    down = fp_bits_add(torch.tensor([0x0400]), fmt, -(1 << fmt.man_bits))  # below smallest normal -> 0
    assert down.item() == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="one dtype"):
        lmul(torch.ones(2), torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="mantissa_bits"):
        lmul(torch.ones(2), torch.ones(2), mantissa_bits=24)
    with pytest.raises(ValueError, match="supports"):
        lmul(torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not chain"):
        lmul_matmul(torch.ones(2, 3), torch.ones(2, 3))


@pytest.mark.parametrize("dtype", list(SPEC), ids=lambda d: str(d).split(".")[-1])
def test_matmul_reference_is_sequential_sum_of_lmul(dtype):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 3, 5, 7, generator=g).to(dtype)
    b = torch.randn(7, 4, generator=g).to(dtype)
    want = torch.zeros(2, 3, 5, 4)
    for j in range(7):
        want += lmul(a[..., :, j : j + 1], b[j : j + 1, :]).float()
    got = lmul_matmul(a, b, chunk_elems=50)
    assert torch.equal(got, want)


SHAPES = [(1, 1, 1), (1, 7, 1), (3, 5, 17), (17, 64, 33), (5, 130, 1), (64, 9, 100), (40, 257, 49)]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("mkn", SHAPES, ids=lambda s: "M{}-K{}-N{}".format(*s))
@pytest.mark.parametrize("dtype,k", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, 3)],
                         ids=["f32", "bf16", "f32k3"])
def test_kernel_equals_reference_bit_for_bit(backend, mkn, dtype, k):
    m, kk, n = mkn
    g = torch.Generator().manual_seed(m * 1000 + kk * 10 + n)
    a = (torch.randn(m, kk, generator=g) * torch.exp2(torch.randint(-3, 4, (m, kk), generator=g))).to(dtype)
    b = torch.randn(kk, n, generator=g).to(dtype)
    a[0, 0] = 0.0  # a zero operand
    want = lmul_matmul(a, b, mantissa_bits=k)
    got = lmul_matmul_fast(a, b, mantissa_bits=k, backend=backend)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("backend", available_backends())
def test_kernel_special_values_and_batch(backend):
    a = torch.tensor([[1.0, INF, 0.0], [NAN, 1.0, 1.0], [1e30, 1e30, 1e-30]])
    b = torch.tensor([[1.0, 0.0], [2.0, 1.0], [INF, 1e30]])
    want, got = lmul_matmul(a, b), lmul_matmul_fast(a, b, backend=backend)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    g = torch.Generator().manual_seed(7)
    qa, kb = torch.randn(2, 3, 6, 8, generator=g), torch.randn(1, 3, 8, 5, generator=g)
    assert torch.equal(lmul_matmul_fast(qa, kb, backend=backend), lmul_matmul(qa, kb))
