"""The T2R4 packed format: documented bit layout, round trips, scale handling."""

from __future__ import annotations

import json

import pytest
import torch

from mulfree.ops.pack import pack_ternary, packed_shape, ternarize, unpack_ternary
from mulfree.ops.ternary import weight_quant


def test_worked_byte_from_docstring():
    t = torch.zeros(1, 256, dtype=torch.int8)
    t[0, 5], t[0, 69], t[0, 133], t[0, 197] = -1, 0, 1, 0
    p = pack_ternary(t)
    assert p.shape == (1, 256)
    assert int(p[0, 5]) == 0x64
    assert int(p[0, 64 + 5]) == 0x55  # row 1 is padding: weights 0 -> codes 1,1,1,1


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 256), (5, 257), (9, 1000), (130, 64)],
                         ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_round_trip(shape):
    t = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.int8)
    p = pack_ternary(t)
    assert p.dtype == torch.uint8 and tuple(p.shape) == packed_shape(*shape)
    assert torch.equal(unpack_ternary(p, shape), t)


def test_row_interleave_layout():
    t = torch.zeros(8, 512, dtype=torch.int8)
    t[6, 300] = 1  # group 1, row 2, block 1, byte 300-256 = 44, bit pair 0
    p = pack_ternary(t)
    diff = (p != 0x55).nonzero().tolist()
    assert diff == [[1, 256 + 2 * 64 + 44]]
    assert int(p[1, 256 + 128 + 44]) == 0x56


def test_unpack_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        unpack_ternary(torch.zeros(2, 256, dtype=torch.uint8), (4, 256))
    with pytest.raises(ValueError, match="code 3"):
        unpack_ternary(torch.full((1, 256), 0xFF, dtype=torch.uint8), (4, 256))
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_ternary(torch.full((2, 2), 2, dtype=torch.int8))
    for bad in (0.5, float("nan")):  # a float 0.5 once packed as the trit 0
        with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
            pack_ternary(torch.tensor([[bad, 1.0, -1.0]]))


def test_ternarize_latent_matches_weight_quant():
    w = torch.randn(17, 33, generator=torch.Generator().manual_seed(0))
    t, s = ternarize(w)
    rt, rs = weight_quant(w)
    assert torch.equal(t, rt) and s == float(rs)


def test_ternarize_keeps_scale_of_already_ternary_weights():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    t, s = weight_quant(w)
    wq = t.float() * s  # a fake-quantized (already ternary) weight
    t2, s2 = ternarize(wq)
    assert torch.equal(t2, t)
    assert s2 == pytest.approx(float(s), rel=1e-6)
    _, requant = weight_quant(wq)  # what re-quantizing would do: the scale shrinks
    assert float(requant) < 0.9 * float(s)


def test_cli_pack_out_rule(tmp_path, capsys):
    from mulfree.cli import main
    from mulfree.models.io import save_model
    from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM

    save_model(MMFreeForCausalLM(MMFreeConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1)), tmp_path / "m")
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["pack", "--model", str(tmp_path / "m"), "--out", str(out)]) == 2
    assert "already holds 1 other entry" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["pack", "--model", str(tmp_path / "m"), "--out", str(out), "--overwrite"]) == 2  # not ours
    assert "not a model, a run or other mulfree output" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert main(["pack", "--model", str(tmp_path / "m"), "--out", str(out)]) == 0
    assert main(["pack", "--model", str(tmp_path / "m"), "--out", str(out), "--overwrite", "--format", "t1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checksums.json", "config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["format"] == "mulfree-t1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old dirs left
