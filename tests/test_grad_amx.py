"""The ternary BitLinear's backward products on AMX-BF16 (`_cpu.ternary_grad_input` / `ternary_grad_weight`, the
fp32 operand split into three exact bf16 parts): against float64 products on odd shapes, shapes whose pool items
split the other operand's panels among them and shapes of many items, independent of the thread count; and their one-line refusals."""

import pytest
import torch

from mulfree.kernels import cpu_module

CPU = cpu_module()
AMX_BF16 = CPU is not None and CPU.cpu_features()["amx_bf16"]
needs_amx = pytest.mark.skipif(not AMX_BF16, reason="no AMX-BF16 on this CPU / OS")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def operands(t: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(t, n, generator=g) * torch.logspace(-3, 3, n)  # magnitudes a bf16 part alone cannot carry
    trits = torch.randint(-1, 2, (n, k), generator=g).float()
    q = torch.randint(-127, 128, (t, k), generator=g).float()
    a_scale = torch.rand(t, generator=g) * 0.05 + 1e-3
    return dy, trits, q, a_scale


def grad_input(dy, trits, threads=2):
    out = torch.full((dy.shape[0], trits.shape[1]), float("nan"))  # poisoned: every value must be written
    CPU.ternary_grad_input(dy, trits, out, threads)
    return out


def grad_weight(dy, a_scale, q, threads=2):
    out = torch.full((dy.shape[1], q.shape[1]), float("nan"))
    CPU.ternary_grad_weight(dy, a_scale, q, out, threads)
    return out


# Odd sizes on every axis; (37, 50, 70): too few 32-wide panels of the split operand for 2 threads, so the pool
# items split the other operand's panels among them; (200, 3072, 40) / (3000, 200, 24): a long reduction, many items;
# (33, 4200, 40) / (4200, 40, 33): dx's / dW's reduction in two chunks (over 128 steps of 32).
SHAPES = [(1, 1, 1), (3, 5, 7), (37, 50, 70), (33, 1, 17), (100, 512, 129), (200, 3072, 40), (3000, 200, 24),
          (33, 4200, 40), (4200, 40, 33)]


@needs_amx
@pytest.mark.parametrize("t,n,k", SHAPES)
def test_grad_input_equals_the_float64_product(t, n, k):
    dy, trits, _, _ = operands(t, n, k)
    ref = dy.double() @ trits.double()
    assert rel(grad_input(dy, trits), ref) < 1e-6
    assert rel(dy @ trits, ref) < 1e-6  # the fp32 matmul it replaces is held to the same bound


@needs_amx
@pytest.mark.parametrize("t,n,k", SHAPES)
def test_grad_weight_equals_the_float64_product(t, n, k):
    dy, _, q, a_scale = operands(t, n, k, seed=1)
    ref = (dy.double() * a_scale.double()[:, None]).t() @ q.double()
    assert rel(grad_weight(dy, a_scale, q), ref) < 1e-6


@needs_amx
@pytest.mark.parametrize("t,n,k", [(300, 700, 90), (40, 50, 300)])  # the second: item ranges differ per thread count
def test_results_do_not_depend_on_the_thread_count(t, n, k):
    dy, trits, q, a_scale = operands(t, n, k, seed=2)
    dx, dw = grad_input(dy, trits, 1), grad_weight(dy, a_scale, q, 1)
    for threads in (2, 3, 4):
        assert torch.equal(grad_input(dy, trits, threads), dx)
        assert torch.equal(grad_weight(dy, a_scale, q, threads), dw)


@needs_amx
def test_non_finite_gradients_stay_non_finite_where_fp32_would():
    dy, trits, _, _ = operands(20, 40, 30, seed=3)
    dy[3, 5] = float("nan")
    dy[7, :] = float("inf")
    out, ref = grad_input(dy, trits), dy @ trits
    assert torch.equal(out.isfinite(), ref.isfinite())
    finite = ref.isfinite()
    assert rel(out[finite], (dy.double() @ trits.double())[finite]) < 1e-6


@needs_amx
@pytest.mark.parametrize("t,n,k", [(0, 5, 3), (4, 0, 3), (4, 5, 0)])
def test_empty_axes_give_empty_or_zero_products(t, n, k):
    dy, trits, q, a_scale = operands(t, n, k)
    assert torch.equal(grad_input(dy, trits), torch.zeros(t, k))
    assert torch.equal(grad_weight(dy, a_scale, q), torch.zeros(n, k))


@needs_amx
def test_mismatched_shapes_are_refused():
    dy, trits, q, a_scale = operands(8, 16, 24)
    with pytest.raises(ValueError, match="do not match"):
        CPU.ternary_grad_input(dy, trits[:15], torch.empty(8, 24), 2)
    with pytest.raises(ValueError, match="do not match"):
        CPU.ternary_grad_weight(dy, a_scale[:7], q, torch.empty(16, 24), 2)


@pytest.mark.skipif(CPU is None or AMX_BF16, reason="this host has AMX-BF16")
def test_hosts_without_amx_bf16_get_a_clear_error():
    dy, trits, _, _ = operands(4, 4, 4)
    with pytest.raises(ValueError, match="needs AMX-BF16"):
        CPU.ternary_grad_input(dy, trits, torch.empty(4, 4), 2)
