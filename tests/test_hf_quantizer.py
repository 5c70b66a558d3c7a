"""transformers' quantizer for mulfree dirs: `AutoModelForCausalLM.from_pretrained(dir)` gives the logits and greedy
tokens of `load_quantized(dir)` for RTN, GPTQ (plain and incoherent) and ShiftAdd (acc; lat, incoherent) on a tiny random Llama;
`import mulfree` registers it lazily; save_pretrained round trips; bad configs and tensors are one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file

from mulfree import integrity
from mulfree.errors import CheckpointError
from mulfree.quant.config import WalkOptions
from mulfree.quant.gptq import GPTQ
from mulfree.quant.hf_quantizer import (
    QUANT_METHOD,
    MulfreeHfQuantizer,
    MulfreeQuantConfig,
    hf_quantization_config,
    register,
)
from mulfree.quant.qlinear import ShiftAddLinear, UniformLinear
from mulfree.quant.rtn import RTN
from mulfree.quant.shiftadd import ShiftAdd
from mulfree.quant.walker import load_quantized, quantize_model, save_quantized

METHODS = {
    "rtn4": lambda: RTN(4, 16),
    "gptq3": lambda: GPTQ(3, 16, blocksize=16),
    "gptq3-hadamard-io": lambda: GPTQ(3, 16, blocksize=16, incoherence="hadamard-io"),
    "shiftadd3-acc": lambda: ShiftAdd(3, 16, "acc", rounds=1),
    "shiftadd2-lat-hadamard-io": lambda: ShiftAdd(2, 16, "lat", rounds=1, incoherence="hadamard-io"),
}
FIRST = "model.layers.0.self_attn.q_proj"


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _quantized_dir(out: Path, method_id: str) -> Path:
    """A dir as the next `save_quantized` writes it: today's dir plus `quantization_config`, checksums rewritten."""
    model, method = _tiny_llama(), METHODS[method_id]()
    calib = torch.randint(0, 300, (4, 16)) if method.needs_stats else None
    metas = quantize_model(model, method, calib, WalkOptions(progress=False))
    save_quantized(model, None, out, method, metas, {"calibration": {"samples": 4, "seqlen": 16}})
    _edit_config(out, lambda cfg: cfg.update(quantization_config=hf_quantization_config(cfg)))
    return out


def _edit_config(path: Path, edit: Callable[[dict], object]) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    integrity.write_manifest(path, ["config.json"])


@pytest.fixture(scope="module")
def rtn_dir(tmp_path_factory) -> Path:
    return _quantized_dir(tmp_path_factory.mktemp("hfq") / "rtn4", "rtn4")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method_id", list(METHODS))
def test_from_pretrained_matches_load_quantized(method_id, tmp_path):
    path = _quantized_dir(tmp_path / method_id, method_id)
    ref, _ = load_quantized(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    kind = ShiftAddLinear if method_id.startswith("shiftadd") else UniformLinear
    layers = json.loads((path / "config.json").read_text())["mulfree_quant"]["layers"]
    assert all(type(model.get_submodule(name)) is kind for name in layers)
    assert model.is_quantized and isinstance(model.hf_quantizer, MulfreeHfQuantizer)
    ids = torch.randint(0, 300, (2, 11))
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids))
    prompt = ids[:1, :5]  # single-token decode steps: the LUT kernel in lat mode
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    assert torch.equal(out, ref.generate(prompt, max_new_tokens=6, do_sample=False))


def test_quantized_buffers_stay_fp32_under_bf16(rtn_dir):
    ref, _ = load_quantized(rtn_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(rtn_dir, dtype=torch.bfloat16)
    layer = model.get_submodule(FIRST)
    assert layer.scale.dtype == torch.float32 and layer.codes.dtype == torch.uint8
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 300, (1, 9))
    want = _logits(ref, ids)
    assert (_logits(model, ids).float() - want).abs().max() < 0.05 * want.abs().max()


def test_save_pretrained_round_trip(rtn_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(rtn_dir)
    model.save_pretrained(tmp_path / "resaved")
    ids = torch.randint(0, 300, (1, 9))
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids))
    torch.testing.assert_close(_logits(load_quantized(tmp_path / "resaved")[0], ids), _logits(model, ids))


def test_config_round_trip_and_register_is_idempotent(rtn_dir):
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    entry = json.loads((rtn_dir / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == QUANT_METHOD and entry["method"] == "rtn"
    assert entry["settings"] == {"bits": 4, "group_size": 16, "calibration": {"samples": 4, "seqlen": 16}}
    assert MulfreeQuantConfig.from_dict(entry).to_dict() == entry
    register()
    register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is MulfreeQuantConfig
    assert AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is MulfreeHfQuantizer


def test_import_mulfree_registers_lazily(rtn_dir):
    """A fresh interpreter: `import mulfree` leaves transformers unimported, and from_pretrained still finds the
    quantizer (registered when transformers imports its quantizer registry)."""
    code = ("import sys, mulfree; assert 'transformers' not in sys.modules; import transformers; "
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(rtn_dir)!r}); "
            f"print(type(m.get_submodule({FIRST!r})).__name__)")
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "UniformLinear"


def _del(key: str) -> Callable[[dict], object]:
    return lambda qc: qc.pop(key)


def _set_layer(field: str, value) -> Callable[[dict], object]:
    return lambda qc: qc["layers"][FIRST].__setitem__(field, value)


def _rename_first(qc: dict) -> None:
    qc["layers"]["model.layers.7.mlp.up_proj"] = qc["layers"].pop(FIRST)


BAD_CONFIGS = {
    "unknown-kind": (_set_layer("kind", "ternary"), "field 'kind' must be one of 'uniform', 'shiftadd', got 'ternary'"),
    "missing-layer-field": (lambda qc: qc["layers"][FIRST].pop("bits"), f"(layer '{FIRST}'): field 'bits'"),
    "missing-layers": (_del("layers"), "field 'layers' must be a JSON object of layer descriptions, got None"),
    "missing-method": (_del("method"), "field 'method' must be one of 'rtn', 'gptq', 'shiftadd'"),
    "bad-setting": (lambda qc: qc["settings"].__setitem__("bits", 9), "(settings): field 'bits' must be an integer"),
    "wrong-shape": (_set_layer("in_features", 16), "is described as 32x16, the model's linear is 32x32"),
    "no-such-module": (_rename_first, "layer 'model.layers.7.mlp.up_proj' is not a module of the model"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_corrupt_quantization_config_is_one_line_error(case, rtn_dir, tmp_path):
    edit, message = BAD_CONFIGS[case]
    path = Path(shutil.copytree(rtn_dir, tmp_path / "q"))
    _edit_config(path, lambda cfg: edit(cfg["quantization_config"]))
    with pytest.raises(CheckpointError, match="^quantization_config") as err:
        transformers.AutoModelForCausalLM.from_pretrained(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def _drop_codes(tensors: dict) -> None:
    del tensors[f"{FIRST}.codes"]


def _codes_out_of_range(tensors: dict) -> None:
    tensors[f"{FIRST}.codes"][0, 0] = 200


@pytest.mark.parametrize("edit,message", [
    (_drop_codes, f"has no {FIRST}.codes; re-run"),
    (_codes_out_of_range, f"{FIRST}.codes holds 200, beyond 4-bit codes"),
], ids=["missing-tensor", "codes-out-of-range"])
def test_bad_weights_are_one_line_errors(edit, message, rtn_dir, tmp_path):
    path = Path(shutil.copytree(rtn_dir, tmp_path / "q"))
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="checksum"):  # the manifest still records the good file
        transformers.AutoModelForCausalLM.from_pretrained(path)
    integrity.write_manifest(path, ["model.safetensors"])
    with pytest.raises(CheckpointError, match=message):
        transformers.AutoModelForCausalLM.from_pretrained(path)
