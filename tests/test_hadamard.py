"""Randomized Hadamard incoherence: FWHT vs the explicit Sylvester matrix, exact inverse pair
(T⁻¹ T = I), rotated quantization approximates the layer, and quantize -> save -> reload."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mulfree.kernels import available_backends
from mulfree.kernels import hadamard as kernel
from mulfree.ops.hadamard import RandomHadamard, fwht, hadamard_block
from mulfree.quant.gptq import GPTQ
from mulfree.quant.shiftadd import ShiftAdd
from mulfree.quant.walker import load_quantized, quantize_model, save_quantized


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (5, 12), (2, 192), (1, 576), (2, 3, 1536), (37, 2048), (300, 576)])
def test_online_transform_kernel_equals_reference_bit_for_bit(backend, shape):
    """Blocks of 1 to 2048 (every butterfly level, in-vector and between vectors), one row to enough rows to
    split over the pool's threads."""
    r = RandomHadamard(shape[-1], seed=5)
    x = torch.randn(*shape) * 10
    x0 = x.clone()
    for got, want in ((kernel.apply_input(r, x, backend), r.apply_input(x)),
                      (kernel.invert_output(r, x, backend), r.invert_output(x))):
        assert got.shape == x.shape and torch.equal(got, want)
    assert torch.equal(x, x0)  # new tensors, the input untouched
    with pytest.raises(ValueError, match="does not match"):
        kernel.apply_input(r, torch.randn(2, shape[-1] + 1), backend)


def test_online_transform_kernel_leaves_autograd_to_torch():
    r = RandomHadamard(64, seed=1)
    x = torch.randn(2, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    kernel.apply_input(r, x).sum().backward()
    r.apply_input(x_ref).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, x_ref.grad)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n,block", [(8, 8), (24, 8), (576, 64), (1536, 512)], ids=["D8", "D24-B8", "D576", "D1536"])
def test_fwht_equals_explicit_hadamard(n, block):
    assert hadamard_block(n) == block
    x = torch.randn(3, 2, n, dtype=torch.float64)
    ref = x @ torch.block_diag(*[_sylvester(block).double()] * (n // block))
    torch.testing.assert_close(fwht(x, block), ref)
    # orthonormal form: x H / sqrt(b), H H = b I
    torch.testing.assert_close(fwht(fwht(x, block), block) / block, x)


def test_fwht_rejects_bad_block():
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.randn(4, 12), 8)


def test_transform_pair_is_exact_and_hessian_consistent():
    k = 96  # block 32, odd shift split
    rht = RandomHadamard(k, seed=3)
    w = torch.randn(5, k, dtype=torch.float64)
    x = torch.randn(40, k, dtype=torch.float64)
    torch.testing.assert_close(rht.apply_input(x) @ rht.rotate_weight(w).T, x @ w.T)
    xr = rht.apply_input(x)
    torch.testing.assert_close(rht.rotate_hessian(x.T @ x), xr.T @ xr)
    u = RandomHadamard(5 * 8, seed=5)  # output side: y = U⁻¹ (U W) x
    w2 = torch.randn(40, k, dtype=torch.float64)
    torch.testing.assert_close(u.invert_output(x @ u.rotate_output_weight(w2).T), x @ w2.T)
    assert torch.equal(RandomHadamard(k, 3).negative, rht.negative) and not torch.equal(RandomHadamard(k, 4).negative, rht.negative)


@pytest.mark.parametrize("method", [ShiftAdd(3, 16, "acc", rounds=3, incoherence="hadamard"),
                                    ShiftAdd(3, 16, "lat", rounds=3, incoherence="hadamard-io"),
                                    ShiftAdd(3, 16, "acc", rounds=3, incoherence="hadamard-out"),
                                    GPTQ(4, 16, blocksize=16, incoherence="hadamard-io")],
                         ids=["acc-in", "lat-io", "acc-out", "gptq-io"])
def test_rotated_layer_approximates_original(method):
    torch.manual_seed(0)
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    w = torch.randn(48, 64)
    b = torch.randn(48)
    layer = method.quantize(w, x.T @ x / 256, b)
    assert layer.rht is not None or layer.rht_out is not None
    assert layer.rht is None or layer.rht.block == 64
    assert layer.rht_out is None or layer.rht_out.block == 16
    with torch.no_grad():
        y = x @ w.T + b
        assert ((layer(x) - y) ** 2).mean() / (y**2).mean() < 0.1
        # the stored weight lives in the rotated basis: y = U⁻¹ (W'' T x) + b, up to float32 rounding (the layer's
        # dense weight has both transforms folded in: U⁻¹ W'' T, checked against the transforms as matrices)
        yr = (x if layer.rht is None else layer.rht.apply_input(x)) @ layer.dequantize().T
        want = (yr if layer.rht_out is None else layer.rht_out.invert_output(yr)) + b
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)
        t = torch.eye(64) if layer.rht is None else layer.rht.apply_input(torch.eye(64)).T
        u_inv = torch.eye(48) if layer.rht_out is None else layer.rht_out.invert_output(torch.eye(48)).T
        torch.testing.assert_close(layer.weight_dense(), u_inv @ layer.dequantize() @ t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,kind", [("acc", "hadamard"), ("lat", "hadamard-io")])
def test_quantize_save_reload_with_incoherence(mode, kind, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    x = torch.randint(0, 300, (1, 12))
    method = ShiftAdd(3, 16, mode, rounds=2, incoherence=kind, seed=7)
    metas = quantize_model(model, method, torch.randint(0, 300, (4, 16)), progress=False)
    down = next(m for name, m in metas.items() if name.endswith("down_proj"))
    assert down["incoherence"] == {"transform": "hadamard", "block": 16, "seed": down["incoherence"]["seed"]}
    assert len({m["incoherence"]["seed"] for m in metas.values()}) == len(metas)
    y = model(x).logits
    save_quantized(model, None, tmp_path / "q", method, metas, {})
    reloaded, _ = load_quantized(tmp_path / "q")
    assert reloaded.config.mulfree_quant["incoherence"] == kind
    assert ("incoherence_out" in down) == (kind == "hadamard-io")
    assert reloaded.config.mulfree_quant["incoherence_seed"] == 7
    torch.testing.assert_close(reloaded(x).logits, y, rtol=0, atol=0)
    layer = reloaded.get_submodule(next(iter(metas)))
    one = torch.randn(1, 1, 32)
    with torch.no_grad():  # single token: lat mode runs the LUT kernel on the transformed input
        want = kernel.apply_input(layer.rht, one) @ layer.dequantize().T
        want = want if layer.rht_out is None else kernel.invert_output(layer.rht_out, want)
        torch.testing.assert_close(layer(one), want + layer.bias if layer.bias is not None else want,
                                   rtol=1e-5, atol=1e-5)
