"""L-Mul / bf16 / fp8 products inside a tiny random HF Llama: registry wiring, exactness of the fp32 path,
kernel = reference inside the model, error ordering, the error table and the `mulfree lmul eval` CLI."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mulfree.cli import main  # noqa: E402
from mulfree.commands.lmul import error_table  # noqa: E402
from mulfree.kernels import available_backends  # noqa: E402
from mulfree.quant.lmul_apply import Product, apply_products, matmul  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))


def logits(model, product, where, **kw):
    m = copy.deepcopy(model)
    counts = apply_products(m, product, where, **kw)
    with torch.no_grad():
        return m(IDS).logits, counts, m


def test_fp32_products_reproduce_the_model(tiny):
    with torch.no_grad():
        ref = tiny(IDS).logits
    out, counts, m = logits(tiny, Product.parse("fp32"), "all")
    assert counts == {"attention": 2, "linear": 14}  # 7 linears per layer, lm_head kept
    assert m.config._attn_implementation == "mulfree_lmul"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert apply_products(copy.deepcopy(tiny), Product.parse("fp32"), "linear", include_head=True)["linear"] == 15


@pytest.mark.parametrize("where", ["attention", "linear", "all"])
def test_lmul_changes_logits_a_little_and_kernel_equals_reference(tiny, where, monkeypatch):
    with torch.no_grad():
        ref = tiny(IDS).logits
    monkeypatch.setenv("MULFREE_BACKEND", "reference")
    want, _, _ = logits(tiny, Product.parse("lmul3"), where)
    assert 0 < (want - ref).abs().max() < 0.5
    for backend in available_backends()[1:]:
        monkeypatch.setenv("MULFREE_BACKEND", backend)
        got, _, _ = logits(tiny, Product.parse("lmul3"), where)
        assert torch.equal(got, want)


def test_matmul_error_ordering():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(16, 64, generator=g), torch.randn(64, 24, generator=g) * 0.02
    exact = a.double() @ b.double()
    err = {n: ((matmul(a, b, Product.parse(n)).double() - exact).norm() / exact.norm()).item()
           for n in ("fp32", "bf16", "fp8_e4m3", "fp8_e5m2", "lmul7", "lmul3")}
    assert err["fp32"] < 1e-6 < err["bf16"] < err["fp8_e4m3"] < err["fp8_e5m2"]
    assert err["bf16"] < err["lmul7"] < err["lmul3"] < 0.1


def test_error_table_reproduces_paper_claims():
    g = torch.Generator().manual_seed(0)
    t = error_table(torch.randn(200_000, generator=g), torch.randn(200_000, generator=g))
    assert t["lmul3"] < t["fp8_e5m2"]  # 3-bit L-Mul beats e5m2
    assert abs(t["lmul4"] - t["fp8_e4m3"]) < 0.01  # 4-bit L-Mul ~ e4m3 (5.3 % vs 4.5 %)
    assert t["bf16"] < 0.005 and abs(t["lmul7"] - 0.027) < 0.001


def test_bad_product_and_where(tiny):
    with pytest.raises(ValueError, match="unknown product"):
        Product.parse("fp16")
    with pytest.raises(ValueError, match="1..23"):
        Product.parse("lmul0")
    with pytest.raises(ValueError, match="where"):
        apply_products(copy.deepcopy(tiny), Product.parse("fp32"), "everywhere")


def test_cli_eval_on_local_hf_dir(tiny, tmp_path, capsys):
    from mulfree.data.text import train_tokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 200
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(text, vocab_size=300))
    tiny.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "t.txt"
    data.write_text(text)
    rc = main(["lmul", "eval", "--model", str(tmp_path / "m"), "--where", "attention", "--methods", "fp32,lmul3",
               "--data", str(data), "--windows", "2", "--window", "16", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "lmul3" in out and "vs fp32" in out
    assert main(["lmul", "eval", "--model", str(tmp_path / "m"), "--methods", "fp7"]) == 2
    assert "unknown product mode" in capsys.readouterr().err


def test_cli_refuses_bad_windows_before_loading(tmp_path, capsys):
    for flags, words in ((["--window", "1"], "--window 1 is out of range"), (["--windows", "0"], "--windows 0"),
                         (["--json", str(tmp_path)], "is a directory")):
        assert main(["lmul", "eval", "--model", str(tmp_path / "none"), *flags]) == 2
        assert words in capsys.readouterr().err
