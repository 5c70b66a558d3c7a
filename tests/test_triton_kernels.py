"""kernels/triton against its pure-torch references, on CPU tensors under the Triton interpreter, odd sizes.

BitLinear: int8 codes, ternary codes and scales exactly equal to `ops.ternary` / `ops.fused.rms_factor`, y
equal to the integer-product reference, gradients equal to autograd through the unfused straight-through
reference (1e-5 relative).
Recurrence: both forms equal `ops.scan.linear_recurrence_naive` in states, last state and every gradient.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit then builds interpreted kernels

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from mulfree.kernels.triton.bitlinear import bitlinear_ref, fused_bitlinear, rmsnorm_quant, ternarize
from mulfree.kernels.triton.mlgru import chunked, fused_recurrent
from mulfree.ops.fused import rms_factor, rmsnorm_ref
from mulfree.ops.scan import linear_recurrence_naive
from mulfree.ops.ternary import activation_quant, weight_quant

EPS = 1e-6


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch):
    """New float buffers start as NaN, so an element a kernel leaves unwritten fails the comparison."""
    for name in ("empty", "empty_like"):
        orig = getattr(torch, name)

        def poisoned(*args, _orig=orig, **kwargs):
            out = _orig(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        monkeypatch.setattr(torch, name, poisoned)


def assert_rel(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """max |got − ref| ≤ tol · max |ref| (NaN fails)."""
    err = (got.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= tol * scale, f"{name}: max|diff| {err:.3g} > {tol} * max|ref| {scale:.3g}"


def test_package_import_needs_no_triton():
    code = "import sys, mulfree, mulfree.kernels.triton; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# Compiles every kernel for sm_90 with the real compiler (no GPU needed: ptxas ships in the triton wheel),
# which checks what the interpreter lets through, and that fp fusion is off (no fma in the PTX).
COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from mulfree.kernels.triton import bitlinear, mlgru

consts = {"EPS": 1e-6, "BLOCK_K": 64, "BLOCK": 1024, "USE_H0": True, "REVERSE": True, "C": 16, "BD": 64}
kernels = [fn for mod in (bitlinear, mlgru) for name, fn in vars(mod).items()
           if isinstance(fn, JITFunction) and not name.startswith("_")]
assert len(kernels) == 7, kernels
for fn in kernels:
    sig = {p.name: "constexpr" if p.is_constexpr else "*i8" if p.name in ("q_ptr", "t_ptr")
           else "*fp32" if p.name.endswith("_ptr") else "i32" for p in fn.params}
    src = ASTSource(fn, sig, {k: consts[k] for k, v in sig.items() if v == "constexpr"})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    assert k.asm["cubin"] and "fma." not in k.asm["ptx"], fn.__name__
"""


def test_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], check=True, env=env, timeout=120)


def _bitlinear_inputs(shape: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = shape[-1]
    return 3 * torch.randn(shape), 1 + 0.1 * torch.randn(k), 0.02 * torch.randn(n, k)


@pytest.mark.parametrize("t, k", [(7, 33), (1, 1), (3, 128)], ids=["T7-K33", "T1-K1", "T3-K128"])
def test_rmsnorm_quant_codes_equal_reference(t: int, k: int):
    x, nw, _ = _bitlinear_inputs((t, k), 1)
    x[0] = 0.0  # an all-zero row: amax clamps to 1e-5, codes 0
    q, s_x, rstd = rmsnorm_quant(x, nw, EPS)
    q_ref, s_ref = activation_quant(rmsnorm_ref(x, nw, EPS))
    assert torch.equal(q, q_ref)
    assert torch.equal(s_x, s_ref.squeeze(-1))
    assert torch.equal(rstd, rms_factor(x, EPS).squeeze(-1))


def test_rmsnorm_quant_rounds_half_to_even():
    # mean(x²) + eps = 4096 makes rstd = 1/64 exactly, and the gain 64 gives x̂ = x, amax 127, inv = 1
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -1.5, 3.5]])
    eps = 4096.0 - x.double().pow(2).mean().item()
    q, _, _ = rmsnorm_quant(x, torch.full((8,), 64.0), eps)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 4]]


@pytest.mark.parametrize("n, k", [(19, 33), (1, 1), (5, 1030)], ids=["N19-K33", "N1-K1", "N5-K1030"])
def test_ternarize_equals_weight_quant(n: int, k: int):
    w = 0.02 * torch.randn(n, k)
    t, s_w = ternarize(w)
    t_ref, s_ref = weight_quant(w)
    assert torch.equal(t, t_ref) and torch.equal(s_w, s_ref)


def test_ternarize_ties_round_to_zero():
    t, s_w = ternarize(torch.tensor([[1.0, -1.0, 0.5, -0.5, 2.0, 0.0, 0.0, 3.0]]))  # absmean 1: ±0.5 are ties
    assert s_w.item() == 1.0 and t.tolist() == [[1, -1, 0, 0, 1, 0, 0, 1]]


SHAPES = [((7, 33), 19), ((1, 5), 3), ((2, 3, 33), 19), ((9, 64), 1)]  # x [..., K], N


@pytest.mark.parametrize("shape, n", SHAPES, ids=["T7-K33-N19", "T1-K5-N3", "B2-T3-K33-N19", "T9-K64-N1"])
def test_fused_bitlinear_forward_and_grads(shape: tuple[int, ...], n: int):
    x, nw, w = _bitlinear_inputs(shape, n)
    ours = [a.clone().requires_grad_() for a in (x, nw, w)]
    refs = [a.clone().requires_grad_() for a in (x, nw, w)]
    y = fused_bitlinear(*ours, EPS)
    q, s_x = activation_quant(rmsnorm_ref(x, nw, EPS))
    t, s_w = weight_quant(w)
    y_int = torch.matmul(q.float(), t.float().t()) * (s_x * s_w)
    assert y.shape == (*shape[:-1], n)
    assert_rel("y", y, y_int, 1e-6)

    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref = bitlinear_ref(*refs, EPS)
    y_ref.backward(dy)
    assert_rel("y_ref", y_ref, y_int, 1e-5)
    for name, a, b in zip(("dx", "dnorm_weight", "dW"), ours, refs):
        assert_rel(name, a.grad, b.grad, 1e-5)


RECURRENCES = {
    "fused_recurrent": fused_recurrent,
    "chunked4": lambda f, i, h0: chunked(f, i, h0, chunk=4),
    "chunked16": chunked,
}


@pytest.mark.parametrize("form", list(RECURRENCES))
@pytest.mark.parametrize("use_h0", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("b, t, d", [(2, 13, 10), (1, 1, 1), (1, 21, 70)],
                         ids=["B2-T13-D10", "B1-T1-D1", "B1-T21-D70"])
def test_recurrence_equals_naive(form: str, use_h0: bool, b: int, t: int, d: int):
    f, i = torch.rand(b, t, d), torch.randn(b, t, d)
    h0 = torch.randn(b, d) if use_h0 else None
    g, g_last = torch.randn(b, t, d), torch.randn(b, d)
    results = []
    for fn in (linear_recurrence_naive, RECURRENCES[form]):
        args = [a.clone().requires_grad_() for a in (f, i)]
        args.append(h0.clone().requires_grad_() if use_h0 else None)
        states, last = fn(*args)
        ((states * g).sum() + (last * g_last).sum()).backward()
        results.append([states, last] + [a.grad for a in args if a is not None])
    refs, ours = results
    for name, got, ref in zip(["states", "last", "df", "di", "dh0"], ours, refs):
        # with T = 1 and no h0 the loop never multiplies by f, so autograd leaves its gradient None: zero
        assert_rel(name, got, torch.zeros_like(got) if ref is None else ref, 1e-5)
    if form == "fused_recurrent":  # walks time in order with fp fusion off: the very roundings of the loop
        assert torch.equal(ours[0], refs[0])


def test_chunk_must_be_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        chunked(torch.rand(1, 4, 2), torch.rand(1, 4, 2), chunk=6)
