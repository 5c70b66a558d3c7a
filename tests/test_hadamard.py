"""Randomized Hadamard incoherence: FWHT vs the explicit Sylvester matrix, exact inverse pair
(T⁻¹ T = I), rotated quantization approximates the layer, and quantize -> save -> reload."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from mulfree.ops.hadamard import RandomHadamard, fwht, hadamard_block  # noqa: E402
from mulfree.quant.gptq import GPTQ  # noqa: E402
from mulfree.quant.shiftadd import ShiftAdd  # noqa: E402
from mulfree.quant.walker import load_quantized, quantize_model, save_quantized  # noqa: E402


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
    assert torch.equal(RandomHadamard(k, 3).negative, rht.negative) and not torch.equal(RandomHadamard(k, 4).negative, rht.negative)


@pytest.mark.parametrize("method", [ShiftAdd(3, 16, "acc", rounds=3, incoherence="hadamard"),
                                    ShiftAdd(3, 16, "lat", rounds=3, incoherence="hadamard"),
                                    GPTQ(4, 16, blocksize=16, incoherence="hadamard")], ids=["acc", "lat", "gptq"])
def test_rotated_layer_approximates_original(method):
    torch.manual_seed(0)
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    w = torch.randn(32, 64)
    layer = method.quantize(w, x.T @ x / 256, None)
    assert layer.rht is not None and layer.rht.block == 64
    with torch.no_grad():
        err = ((layer(x) - x @ w.T) ** 2).mean() / ((x @ w.T) ** 2).mean()
        assert err < 0.1
        # the stored weight lives in the rotated basis
        torch.testing.assert_close(layer(x), layer.rht.apply_input(x) @ layer.dequantize().T)


@pytest.mark.parametrize("mode", ["acc", "lat"])
def test_quantize_save_reload_with_incoherence(mode, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    x = torch.randint(0, 300, (1, 12))
    method = ShiftAdd(3, 16, mode, rounds=2, incoherence="hadamard", seed=7)
    metas = quantize_model(model, method, torch.randint(0, 300, (4, 16)), progress=False)
    down = next(m for name, m in metas.items() if name.endswith("down_proj"))
    assert down["incoherence"] == {"transform": "hadamard", "block": 16, "seed": down["incoherence"]["seed"]}
    assert len({m["incoherence"]["seed"] for m in metas.values()}) == len(metas)
    y = model(x).logits
    save_quantized(model, None, tmp_path / "q", method, metas, {})
    reloaded, _ = load_quantized(tmp_path / "q")
    assert reloaded.config.mulfree_quant["incoherence"] == "hadamard"
    assert reloaded.config.mulfree_quant["incoherence_seed"] == 7
    torch.testing.assert_close(reloaded(x).logits, y, rtol=0, atol=0)
