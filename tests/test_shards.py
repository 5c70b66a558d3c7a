"""`mulfree tokenize` and `mulfree train --shards`: shards hold exactly the tokenizer's ids of every document
(text pieces, JSON lines, a `datasets` dir) with end-of-text marks; a run killed after some shards resumes to the
same bytes; training streams windows from them and resumes; bad inputs are one-line errors (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mulfree.cli import main
from mulfree.data import shards as shards_mod
from mulfree.data.shards import ShardWindows, read_index, tokenize_corpus
from mulfree.data.text import bundled_text_files, eos_token_id, train_tokenizer
from mulfree.errors import ConfigError, DataError

TEXT = bundled_text_files()[0].read_text()[:60_000]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, 400)


def _corpus(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT[:30_000])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ("first doc", "second, longer doc")))
    return [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]


def _tokens(out):
    index = read_index(out)
    return np.concatenate([np.fromfile(out / s["file"], dtype=index["dtype"]) for s in index["shards"]]), index


def test_shards_hold_every_document_with_end_marks(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(shards_mod, "PIECE_BYTES", 4096)  # several pieces per text file
    paths = _corpus(tmp_path)
    index = tokenize_corpus(paths, tok, tmp_path / "out", shard_tokens=1500, progress=False)
    got, _ = _tokens(tmp_path / "out")
    eot = eos_token_id(tok)
    pieces = [u.text for u in shards_mod.units(shards_mod.sources(paths[:1]))]
    assert len(pieces) > 3 and "".join(pieces) == TEXT[:30_000]
    want = [i for p in pieces for i in tok.encode(p).ids] + [eot]
    want += tok.encode("first doc").ids + [eot] + tok.encode("second, longer doc").ids + [eot]
    assert got.tolist() == want and index["tokens"] == len(want)
    assert len(index["shards"]) > 2 and index["dtype"] == "uint16"
    assert all(s["tokens"] >= 1500 for s in index["shards"][:-1])
    assert not (tmp_path / "out" / "progress.json").exists() and not (tmp_path / ".out.partial").exists()


def test_a_killed_run_resumes_to_the_same_shards(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(shards_mod, "PIECE_BYTES", 4096)
    paths = _corpus(tmp_path)
    tokenize_corpus(paths, tok, tmp_path / "whole", shard_tokens=1500, progress=False)
    real, written = shards_mod._write_shard, []

    def dies_after_two(*args):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(1)
        real(*args)

    monkeypatch.setattr(shards_mod, "_write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(paths, tok, tmp_path / "out", shard_tokens=1500, progress=False)
    assert (tmp_path / ".out.partial" / "shard-00001.bin").is_file() and not (tmp_path / "out").exists()
    monkeypatch.setattr(shards_mod, "_write_shard", real)
    tokenize_corpus(paths, tok, tmp_path / "out", shard_tokens=1500, progress=False)
    assert _tokens(tmp_path / "out")[0].tolist() == _tokens(tmp_path / "whole")[0].tolist()


def test_datasets_dir_is_a_source(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one row", "two rows here"]}).save_to_disk(str(tmp_path / "ds"))
    tokenize_corpus([str(tmp_path / "ds")], tok, tmp_path / "out", progress=False)
    eot = eos_token_id(tok)
    assert _tokens(tmp_path / "out")[0].tolist() == tok.encode("one row").ids + [eot] + tok.encode("two rows here").ids + [eot]


def test_windows_come_from_the_shards(tmp_path, tok):
    import torch

    tokenize_corpus(_corpus(tmp_path), tok, tmp_path / "out", shard_tokens=2000, progress=False)
    stream, _ = _tokens(tmp_path / "out")
    windows = ShardWindows(tmp_path / "out", 4, 32)
    x, y = windows(0, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    text = " ".join(map(str, stream.tolist()))
    assert all(" ".join(map(str, row.tolist())) in text for row in x)


def test_cli_tokenize_train_and_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shards_mod, "PIECE_BYTES", 8192)
    (tmp_path / "a.txt").write_text(TEXT)
    assert main(["tokenize", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "sh"), "--vocab-size", "300",
                 "--shard-tokens", "4000", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["shards"] >= 2 and report["vocab_size"] == 300
    run = ["train", "--config", "tiny", "--shards", str(tmp_path / "sh"), "--out", str(tmp_path / "run"),
           "--seq-len", "32", "--batch-size", "2", "--no-progress", "--eval-every", "0", "--save-every", "2"]
    assert main(run + ["--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "4", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
    (tmp_path / "a.txt").write_text("some text\n")
    cases = [
        (["tokenize", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o1")], "bad.jsonl:2"),
        (["tokenize", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")], "does not exist"),
        (["tokenize", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o3"), "--shard-tokens", "0"],
         "--shard-tokens"),
        (["train", "--shards", str(tmp_path), "--out", str(tmp_path / "r")], "not a token shard dir"),
        (["train", "--shards", str(tmp_path), "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "r2")],
         "not both"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_a_bad_byte_past_the_first_piece_is_named_at_its_file_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "PIECE_BYTES", 16)
    path = tmp_path / "c.txt"
    path.write_bytes(b"line one\n" * 10 + b"bad \xff here\n")  # the bad byte at 94, in the sixth piece
    with pytest.raises(DataError, match=r"invalid start byte at byte 94\)"):
        list(shards_mod._text_pieces(path))


def test_a_second_run_while_one_writes_is_refused(tmp_path, tok, held_by_another_process):
    data = tmp_path / "a.txt"
    data.write_text("to be or not to be\n" * 50)
    held_by_another_process(tmp_path / ".shards.partial")  # the same command, still running elsewhere
    with pytest.raises(ConfigError, match="another process is writing the token shards"):
        tokenize_corpus([str(data)], tok, tmp_path / "shards", shard_tokens=64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shards.partial", "a.txt"]
