"""Energy accounting: hand-counted MACs on tiny shapes, per-arith conversion, ordering, HF configs, CLI."""

from __future__ import annotations

import json

import pytest

from mulfree.cli import main
from mulfree.energy import ARITHS, ENERGY_PJ, count_ops
from mulfree.models.mmfree import MMFreeConfig
from mulfree.models.transformer import TransformerConfig

MM = MMFreeConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, intermediate_size=16)
TF = TransformerConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, intermediate_size=16, num_attention_heads=2)


def test_macs_by_hand():
    # MMfree: i,f,g,o 4·8·8 + gate 8·32 + down 16·8 + head 8·10 = 720
    assert count_ops(MM, "ternary")["macs"] == {"weights": 720}
    # Transformer++: q,k,v,o 4·64 + gate,up,down 3·128 + head 80 = 720; attention 2·context·d
    assert count_ops(TF, "fp32", context=5)["macs"] == {"weights": 720, "attention": 80}


def test_weight_energy_per_arith():
    e = {a: count_ops(MM, a)["energy_pj"]["weights"] for a in ARITHS}
    assert e["fp32"] == pytest.approx(720 * (ENERGY_PJ["fp32_mul"] + ENERGY_PJ["fp32_add"]))
    assert e["bf16"] == pytest.approx(720 * (ENERGY_PJ["fp16_mul"] + ENERGY_PJ["fp32_add"]))
    assert e["lmul"] == pytest.approx(720 * (ENERGY_PJ["int32_add"] + ENERGY_PJ["fp32_add"]))
    quant = (8 + 8) * 4 + (8 + 32) + (16 + 8) + (8 + 10)  # one fp32 mul per input and per output
    assert e["ternary"] == pytest.approx(720 * ENERGY_PJ["int32_add"] + quant * ENERGY_PJ["fp32_mul"])
    assert e["int8"] == pytest.approx(e["ternary"] + 720 * ENERGY_PJ["int8_mul"])


@pytest.mark.parametrize("preset", ["370m", "1.3b"])
def test_ordering_at_paper_sizes(preset):
    mm = {a: count_ops(MMFreeConfig.from_preset(preset), a)["energy_pj"]["total"] for a in ARITHS}
    tf = {a: count_ops(TransformerConfig.from_preset(preset), a)["energy_pj"]["total"] for a in ARITHS}
    assert mm["ternary"] < mm["int8"] < mm["lmul"] < mm["bf16"] < mm["fp32"]
    assert mm["ternary"] < tf["ternary"] and tf["bf16"] / mm["ternary"] > 10
    # L-Mul: an int32 add replaces the fp32 mul, the fp32 accumulation stays -> (0.1 + 0.9) / (3.7 + 0.9)
    lm = count_ops(MMFreeConfig.from_preset(preset), "lmul")["energy_pj"]["weights"]
    fp = count_ops(MMFreeConfig.from_preset(preset), "fp32")["energy_pj"]["weights"]
    assert lm / fp == pytest.approx(1.0 / 4.6)


def test_attention_grows_with_context_and_hf_gqa():
    a = count_ops(TF, "bf16", context=100)["macs"]["attention"]
    assert count_ops(TF, "bf16", context=200)["macs"]["attention"] == 2 * a
    hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
          "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1}
    assert count_ops(hf, "fp32", context=5)["macs"] == {"weights": 720 - 2 * 32, "attention": 80}


def test_errors():
    with pytest.raises(ValueError, match="unknown arith"):
        count_ops(MM, "fp64")
    with pytest.raises(ValueError, match="num_attention_heads"):
        count_ops({"model_type": "llama", "vocab_size": 1, "hidden_size": 8, "num_hidden_layers": 1,
                   "intermediate_size": 8}, "fp32")


def test_cli(tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["energy", "--model", "mmfree:370m", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ternary" in text and "vs fp32" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["arith"] for r in rows] == list(ARITHS)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TF.to_dict()))
    assert main(["energy", "--model", str(tmp_path / "m"), "--arith", "lmul", "--context", "5"]) == 0
    assert main(["energy", "--model", "nosuch:370m"]) == 2
    assert "unknown model family" in capsys.readouterr().err


def test_cli_refuses_bad_values(tmp_path, capsys):
    assert main(["energy", "--model", "mmfree:370m", "--context", "-1"]) == 2
    assert "--context -1 is out of range" in capsys.readouterr().err
    assert main(["energy", "--model", "mmfree:370m", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps({**MM.to_dict(), "num_hidden_layers": 10**8}))
    assert main(["energy", "--model", str(tmp_path / "c.json")]) == 2
    assert "num_hidden_layers" in capsys.readouterr().err
