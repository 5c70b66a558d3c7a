"""Block-by-block quantization (`quant.blockwise`) against the whole-model walk (`walker.quantize_model`):
identical quantized tensors, configs and logits for RTN, GPTQ and ShiftAdd on a tiny random Llama (tied and
untied head, sharded source), with and without activations spilled to disk; the sharded dir loads and its
checksums hold; an interrupted run leaves the target as it was and nothing half-written beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from mulfree.cli import main as cli_main  # noqa: E402
from mulfree.errors import CheckpointError, ConfigError  # noqa: E402
from mulfree.integrity import read_manifest  # noqa: E402
from mulfree.quant import blockwise, resume  # noqa: E402
from mulfree.quant.config import WalkOptions  # noqa: E402
from mulfree.quant.gptq import GPTQ  # noqa: E402
from mulfree.quant.rtn import RTN  # noqa: E402
from mulfree.quant.shards import INDEX, SafetensorsDir, ShardWriter, shard_name  # noqa: E402
from mulfree.quant.shiftadd import ShiftAdd  # noqa: E402
from mulfree.quant.spill import Sink, Spill, TensorFile  # noqa: E402
from mulfree.quant.walker import load_quantized, quantize_model, save_quantized  # noqa: E402

QUIET = WalkOptions(progress=False, batch_size=2)
METHODS = {
    "rtn": lambda: RTN(4, 16),
    "gptq": lambda: GPTQ(3, 16),
    "shiftadd": lambda: ShiftAdd(2, 8, "acc", 1, 2, incoherence="hadamard-io"),
}


def _llama_dir(path, tied: bool, shard: str | None = None):
    """A tiny random Llama saved with save_pretrained (sharded when `shard` is a size such as "20KB")."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def _calib(n: int = 5, t: int = 12) -> torch.Tensor:
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(1))


def _whole(src, out, method, calib, opts):
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    metas = quantize_model(model, method, calib, opts)
    save_quantized(model, None, out, method, metas, {})
    return metas


def _assert_same_dir(a, b):
    """Same config.json and, loaded with load_quantized, the same tensors and logits bit for bit."""
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    ma, mb = load_quantized(a)[0], load_quantized(b)[0]
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ids = _calib(2, 10)
    assert torch.equal(ma(ids).logits, mb(ids).logits)


@pytest.mark.parametrize("name,tied,shard", [("rtn", True, None), ("gptq", False, "20KB"), ("shiftadd", True, None)])
def test_blockwise_equals_whole_model(tmp_path, name, tied, shard):
    src = _llama_dir(tmp_path / "hf", tied, shard)
    calib = None if name == "rtn" else _calib()
    whole = _whole(src, tmp_path / "whole", METHODS[name](), calib, QUIET)
    metas = blockwise.quantize_blockwise(src, tmp_path / "block", METHODS[name](), calib, QUIET)
    assert metas == whole
    _assert_same_dir(tmp_path / "whole", tmp_path / "block")
    out = tmp_path / "block"
    n = 3 + (2 if tied else 3)  # a shard per block, then one per tensor outside the blocks
    shards = [shard_name(k, n) for k in range(1, n + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "checksums.json", INDEX, *shards])
    assert set(read_manifest(out)) == {"config.json", INDEX, *shards}
    assert all(k.startswith("model.layers.2.") for k in load_file(str(out / shards[2])))


@pytest.mark.parametrize("asymmetric,tune", [(True, 0), (False, 1), (True, 1)])
def test_spilled_activations_change_nothing(tmp_path, asymmetric, tune):
    src = _llama_dir(tmp_path / "hf", tied=True)
    opts = WalkOptions(progress=False, batch_size=2, asymmetric=asymmetric, tune_epochs=tune)
    blockwise.quantize_blockwise(src, tmp_path / "mem", GPTQ(3, 16), _calib(), opts)
    blockwise.quantize_blockwise(src, tmp_path / "disk", GPTQ(3, 16), _calib(), opts, spill_bytes=0)
    _assert_same_dir(tmp_path / "mem", tmp_path / "disk")
    _whole(src, tmp_path / "whole", GPTQ(3, 16), _calib(), opts)
    _assert_same_dir(tmp_path / "whole", tmp_path / "disk")


def test_tensor_file_round_trip_and_threshold(tmp_path):
    tensors = [torch.randn(2, 3, 5), torch.arange(7), torch.randn(1, 4).half()]
    kept = Spill(tmp_path, threshold=10).keep(iter(tensors))
    assert isinstance(kept, TensorFile) and len(kept) == 3 and not os.listdir(tmp_path)  # unlinked scratch
    for a, b in zip(kept, tensors):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(kept[-1], tensors[-1])
    assert isinstance(Spill(tmp_path, threshold=1 << 20).keep(iter(tensors)), list)


def test_sink_moves_to_disk_at_the_threshold_and_keeps_order(tmp_path):
    tensors = [torch.full((4,), float(i)) for i in range(6)]  # 16 bytes each
    sink = Sink(Spill(tmp_path, threshold=40))
    for t in tensors[:2]:
        sink.append(t)
    assert isinstance(sink.kept(), list)  # 32 bytes: still in memory
    sink.append(tensors[2])  # 48 > 40: the three move to one unlinked scratch file
    kept = sink.kept()
    assert isinstance(kept, TensorFile) and not os.listdir(tmp_path)
    assert torch.equal(kept[1], tensors[1])  # a read between appends does not disturb the next write
    for t in tensors[3:]:
        sink.append(t)
    assert len(kept) == 6 and all(torch.equal(a, b) for a, b in zip(kept, tensors))
    unbounded = Sink(None)
    for t in tensors:
        unbounded.append(t)
    assert isinstance(unbounded.kept(), list) and len(unbounded.kept()) == 6


def test_shard_writer_and_reader(tmp_path):
    w = torch.randn(4, 3)
    writer = ShardWriter(tmp_path, 2)
    writer.write({"a.weight": w, "b.weight": w, "c": torch.ones(2)})  # b ties a: written once
    writer.write({"d": torch.zeros(3, dtype=torch.int8)})
    names = writer.finish()
    assert names == [shard_name(1, 2), shard_name(2, 2), INDEX]
    src = SafetensorsDir(tmp_path)
    assert src.names == ["a.weight", "c", "d"]
    got = src.load(["d", "a.weight"], torch.float32)
    assert torch.equal(got["a.weight"], w) and got["d"].dtype == torch.float32
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == 4 * 12 + 4 * 2 + 3
    index["weight_map"]["d"] = "../elsewhere.safetensors"
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        SafetensorsDir(tmp_path)


def _failing_at(monkeypatch, call: int, error: BaseException) -> list:
    """Make `blockwise.quantize_block` raise `error` on its `call`-th call (from 1; 0: never); returns the calls."""
    real, calls = blockwise.quantize_block, []

    def wrapped(block, *args):
        calls.append(1)
        if len(calls) == call:
            raise error
        return real(block, *args)

    monkeypatch.setattr(blockwise, "quantize_block", wrapped)
    return calls


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_interrupted_run_leaves_target_untouched(tmp_path, monkeypatch):
    src = _llama_dir(tmp_path / "hf", tied=True)
    out = tmp_path / "out"
    blockwise.quantize_blockwise(src, out, RTN(4, 16), None, QUIET)
    before = _files(out)
    _failing_at(monkeypatch, 1, RuntimeError("killed in block 0"))
    with pytest.raises(RuntimeError, match="killed in block 0"):
        blockwise.quantize_blockwise(src, out, GPTQ(3, 16), _calib(), QUIET, overwrite=True, spill_bytes=0)
    assert _files(out) == before
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]  # no block finished: no temp dir, no scratch file


@pytest.mark.parametrize("name,opts", [
    ("gptq", WalkOptions(progress=False, batch_size=2, asymmetric=True, tune_epochs=1)),
    ("shiftadd", QUIET),  # Hadamard signs drawn per layer index: the resumed walk goes on counting
    ("rtn", QUIET),
])
def test_interrupted_run_continues_to_the_same_bytes(tmp_path, monkeypatch, capsys, name, opts):
    src = _llama_dir(tmp_path / "hf", tied=True)
    calib = None if name == "rtn" else _calib()
    blockwise.quantize_blockwise(src, tmp_path / "whole", METHODS[name](), calib, opts, spill_bytes=0)
    out = tmp_path / "out"
    monkeypatch.setattr(resume, "SAVE_RATIO", 0)  # progress saved after every block, however long saving takes
    _failing_at(monkeypatch, 3, KeyboardInterrupt())  # Ctrl-C in the last of 3 blocks
    with pytest.raises(KeyboardInterrupt):
        blockwise.quantize_blockwise(src, out, METHODS[name](), calib, opts, spill_bytes=0)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert not out.exists() and len(kept) == 1
    assert f"2 of 3 blocks are kept in {kept[0]}; the same command continues" in capsys.readouterr().err
    (kept[0] / "stream-9-inputs.bin").write_bytes(b"left by a kill")  # not in the record: removed
    calls = _failing_at(monkeypatch, 0, RuntimeError())
    metas = blockwise.quantize_blockwise(src, out, METHODS[name](), calib, opts)  # not spilled this time
    assert len(calls) == 1  # only the last block was quantized again
    assert _files(out) == _files(tmp_path / "whole")
    assert metas == json.loads((out / "config.json").read_text())["mulfree_quant"]["layers"]
    assert sorted(os.listdir(tmp_path)) == ["hf", "out", "whole"]


def test_a_kept_run_of_other_settings_or_a_broken_record_starts_over(tmp_path, monkeypatch, capsys):
    src = _llama_dir(tmp_path / "hf", tied=False)
    out = tmp_path / "out"
    monkeypatch.setattr(resume, "SAVE_RATIO", 1e9)  # only the first block's progress is saved
    _failing_at(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        blockwise.quantize_blockwise(src, out, GPTQ(3, 16), _calib(), QUIET)
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert json.loads((old / "resume.json").read_text())["blocks"] == 1
    calls = _failing_at(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):  # 4 bits: other settings, so the 3-bit blocks are not used
        blockwise.quantize_blockwise(src, out, GPTQ(4, 16), _calib(), QUIET)
    assert len(calls) == 2 and not old.exists()
    (new,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    stream = next(new.glob("stream-1-inputs.bin"))
    stream.write_bytes(stream.read_bytes()[:100])  # truncated
    calls = _failing_at(monkeypatch, 0, RuntimeError())
    blockwise.quantize_blockwise(src, out, GPTQ(4, 16), _calib(), QUIET)
    assert len(calls) == 3 and "starting over" in capsys.readouterr().err
    blockwise.quantize_blockwise(src, tmp_path / "whole", GPTQ(4, 16), _calib(), QUIET)
    assert _files(out) == _files(tmp_path / "whole")


def test_bad_sources_and_options(tmp_path):
    src = _llama_dir(tmp_path / "hf", tied=False)
    with pytest.raises(ConfigError, match="cannot distill"):
        blockwise.quantize_blockwise(src, tmp_path / "q", GPTQ(3, 16), _calib(), QUIET, distill_epochs=1)
    state = load_file(str(src / "model.safetensors"))
    del state["model.norm.weight"]
    from safetensors.torch import save_file

    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "checksums.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no tensor model.norm.weight"):
        blockwise.quantize_blockwise(src, tmp_path / "q", RTN(4, 16), None, QUIET)
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        blockwise.quantize_blockwise(src, tmp_path / "q", RTN(4, 16), None, QUIET)
    assert not (tmp_path / "q").exists()


def test_cli_quantizes_a_dir_block_by_block(tmp_path, monkeypatch, capsys):
    from mulfree.data.text import train_tokenizer

    src = _llama_dir(tmp_path / "hf", tied=True)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer("to be or not to be " * 200, 300))
    tok.save_pretrained(src)
    (tmp_path / "calib.txt").write_text("the quality of mercy is not strained " * 80)
    rc = cli_main(["quantize", "gptq", "--model", str(src), "--bits", "3", "--group-size", "16", "--calib-data",
                   str(tmp_path / "calib.txt"), "--calib-samples", "3", "--calib-seqlen", "12", "--out",
                   str(tmp_path / "q")])
    assert rc == 0 and (tmp_path / "q" / INDEX).is_file()
    model, tok2 = load_quantized(tmp_path / "q")
    assert tok2 is not None and model.config.mulfree_quant["calibration"]["samples"] == 3
    from mulfree.models import pretrained

    monkeypatch.setattr(pretrained, "hf_dir", lambda ref: src if ref == "smollm2" else Path(ref))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    rc = cli_main(["quantize", "rtn", "--model", "smollm2", "--bits", "4", "--out", str(src), "--overwrite"])
    assert rc == 2 and "is or holds the dir smollm2 is read from" in capsys.readouterr().err  # its converted cache
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


@pytest.mark.parametrize("record", ['{"key": ', '[1, 2]', '{"key": "k", "blocks": 1}', "\x00\xff"])
def test_a_torn_or_foreign_record_is_not_resumed_and_its_files_go(tmp_path, capsys, record):
    (tmp_path / resume.RECORD).write_text(record)
    (tmp_path / "model-00001-of-00004.safetensors").write_bytes(b"half a shard")
    assert resume.load(tmp_path, "k") is None
    assert not os.listdir(tmp_path)
    assert record.startswith("[") or "starting over" in capsys.readouterr().err
