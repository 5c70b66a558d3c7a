"""`mulfree train / generate / eval` end to end on tiny data, and their one-line errors (exit code 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mulfree.cli import main

LINES = "ROMEO. But soft, what light through yonder window breaks?\nJULIET. Ay me.\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    data.mkdir()
    for k in range(3):
        (data / f"play{k}.txt").write_text(f"PLAY {k}\n" + LINES * 30)
    cfg = root / "cfg.json"
    cfg.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 300,
                               "max_position_embeddings": 64, "train": {"eval_batches": 1, "warmup": 1}}))
    out = root / "model"
    rc = main(["train", "--config", str(cfg), "--data", str(data), "--out", str(out), "--steps", "3",
               "--batch-size", "2", "--seq-len", "16", "--save-every", "2", "--no-progress"])
    assert rc == 0
    return root, data, cfg, out


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_train_writes_a_complete_run(run_dir):
    _, _, _, out = run_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "checkpoint.json"):
        assert (out / name).is_file(), name
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3


def test_generate_and_eval(run_dir, capsys):
    root, data, _, out = run_dir
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "ROMEO.", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("ROMEO.")
    assert main(["generate", "--model", str(out), "--prompt", "ROMEO.", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy
    (root / "prompt.txt").write_text("ROMEO.")
    for source, stdin in ((str(root / "prompt.txt"), None), ("-", "ROMEO.")):  # a file, then standard input
        run = subprocess.run([sys.executable, "-m", "mulfree", "generate", "--model", str(out), "--prompt-file",
                              source, "--max-new-tokens", "5", "--temperature", "0"],
                             check=False, input=stdin, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and run.stdout == greedy, run.stderr
    assert main(["eval", "--model", str(out), "--data", str(data / "play0.txt"), "--window", "32"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 1.0 < result["perplexity"] < 300 and result["window"] == 32


def test_a_run_without_its_final_model_is_sampled_scored_and_packed_from_its_checkpoint(run_dir, tmp_path, capsys):
    _, data, _, out = run_dir
    run = tmp_path / "run"  # as a run looks before its end: checkpoints, no config.json / model.safetensors
    shutil.copytree(out, run)
    (run / "config.json").unlink()
    (run / "model.safetensors").unlink()
    ckpt = run / json.loads((run / "checkpoint.json").read_text())["checkpoint"]
    assert ckpt.name == "ckpt-3"  # the final step's checkpoint: the final model's weights
    greedy = ["generate", "--prompt", "ROMEO.", "--max-new-tokens", "5", "--temperature", "0"]
    capsys.readouterr()
    assert main([*greedy, "--model", str(out)]) == 0
    want = capsys.readouterr().out
    for ref in (run, ckpt):
        assert main([*greedy, "--model", str(ref)]) == 0
        got = capsys.readouterr()
        assert got.out == want and f"note: loading the training checkpoint {ckpt}" in got.err
    assert main(["eval", "--model", str(out), "--data", str(data), "--window", "32"]) == 0
    score = capsys.readouterr().out.splitlines()[-1]
    assert main(["eval", "--model", str(run), "--data", str(data), "--window", "32"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == score
    assert main(["pack", "--model", str(run), "--out", str(tmp_path / "packed")]) == 0
    capsys.readouterr()
    assert main([*greedy, "--model", str(tmp_path / "packed")]) == 0
    assert capsys.readouterr().out == want
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    assert main([*greedy, "--model", str(run)]) == 2
    assert "model.safetensors" in _err(capsys)
    shutil.rmtree(ckpt)  # a checkpoint.json naming a checkpoint that is gone
    assert main([*greedy, "--model", str(run)]) == 2
    assert "ckpt-3" in _err(capsys)


def test_resume_extends_a_finished_run(run_dir, capsys):
    root, data, cfg, _ = run_dir
    resumed = root / "resumed"
    assert main(["train", "--config", str(cfg), "--data", str(data), "--out", str(resumed), "--steps", "3",
                 "--batch-size", "2", "--seq-len", "16", "--no-progress"]) == 0
    assert main(["train", "--out", str(resumed), "--resume", "--steps", "4", "--no-progress"]) == 0
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4


@pytest.mark.parametrize("case", ["missing_data", "empty_data", "unknown_preset", "bad_json"])
def test_train_input_errors(run_dir, tmp_path, capsys, case):
    _, data, cfg, _ = run_dir
    args = ["train", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"]
    if case == "missing_data":
        args[args.index("--data") + 1] = str(tmp_path / "nope.txt")
    elif case == "empty_data":
        (tmp_path / "empty.txt").write_text("")
        args[args.index("--data") + 1] = str(tmp_path / "empty.txt")
    elif case == "unknown_preset":
        args[args.index("--config") + 1] = "huge"
    else:
        (tmp_path / "bad.json").write_text("{oops")
        args[args.index("--config") + 1] = str(tmp_path / "bad.json")
    assert main(args) == 2
    err = _err(capsys)
    assert err.startswith("error: ") and "; " in err
    assert not (tmp_path / "o").exists()


def test_train_refuses_to_overwrite_a_run(run_dir, capsys):
    _, data, cfg, out = run_dir
    before = (out / "model.safetensors").read_bytes()
    assert main(["train", "--config", str(cfg), "--data", str(data), "--out", str(out), "--no-progress"]) == 2
    assert "already holds a training run" in _err(capsys)
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["train", "--out", str(out.parent / "fresh"), "--resume"]) == 2
    assert "no checkpoint to resume" in _err(capsys)


@pytest.mark.parametrize("case", ["corrupt_weights", "wrong_model", "missing_dir"])
def test_bad_checkpoints(run_dir, tmp_path, capsys, case):
    import shutil

    _, _, _, out = run_dir
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    if case == "corrupt_weights":
        (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    elif case == "wrong_model":
        config = json.loads((bad / "config.json").read_text())
        config["model_type"] = "transformerpp"
        (bad / "config.json").write_text(json.dumps(config))
    else:
        bad = tmp_path / "missing"
    before = {p.name: p.read_bytes() for p in bad.iterdir() if p.is_file()} if bad.exists() else {}
    for args in (["generate", "--model", str(bad), "--prompt", "x"], ["eval", "--model", str(bad)]):
        assert main(args) == 2
        assert _err(capsys).startswith("error: ")
    after = {p.name: p.read_bytes() for p in bad.iterdir() if p.is_file()} if bad.exists() else {}
    assert before == after


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "-1"], ">= 0"),
    (["--max-new-tokens", str(2**40)], "<="),
    (["--temperature", "-0.5"], "temperature"),
    (["--top-p", "1.5"], "top-p"),
])
def test_generate_argument_errors(run_dir, capsys, flags, message):
    _, _, _, out = run_dir
    args = ["generate", "--model", str(out), "--prompt", "ROMEO."] + flags
    assert main(args) == 2
    err = _err(capsys)
    assert err.startswith("error: ") and message in err


def test_generate_with_packed_engine(run_dir, capsys):
    _, _, _, out = run_dir
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "ROMEO.", "--engine", "packed",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    packed = capsys.readouterr().out
    assert packed.startswith("ROMEO.")
    assert main(["generate", "--model", str(out), "--prompt", "ROMEO.",  # auto: an MMfree dir runs packed
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == packed
    from mulfree.errors import CheckpointError
    from mulfree.models.resolve import resolve

    assert (resolve(str(out), "auto").kind, resolve(str(out), "torch").kind) == ("packed", "mmfree")
    assert main(["pack", "--model", str(out), "--out", str(out.parent / "packed-cli")]) == 0
    with pytest.raises(CheckpointError, match="packed dir"):
        resolve(str(out.parent / "packed-cli"), "torch")
    assert main(["generate", "--model", str(out), "--prompt", "ROMEO.", "--engine", "packed",
                 "--max-new-tokens", "-2"]) == 2
    assert ">= 0" in _err(capsys)


def test_a_reader_that_leaves_stops_generate_quietly(run_dir):
    """`mulfree generate ... | head -c 8`: exit 141 (SIGPIPE's status) and nothing on stderr, not a traceback."""
    import subprocess
    import sys

    _, _, _, out = run_dir
    proc = subprocess.Popen([sys.executable, "-m", "mulfree", "generate", "--model", str(out), "--prompt",
                             "ROMEO.", "--max-new-tokens", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(8)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == b""


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["model", "nonempty"])
def test_train_over_a_model_or_users_dir_writes_nothing(run_dir, tmp_path, capsys, target):
    import shutil

    _, data, cfg, out = run_dir
    dest = tmp_path / target
    dest.mkdir()
    if target == "model":
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            shutil.copy(out / name, dest / name)
    else:
        (dest / "notes.txt").write_text("mine")
    before = _snapshot(dest)
    assert main(["train", "--config", str(cfg), "--data", str(data), "--out", str(dest), "--no-progress"]) == 2
    err = _err(capsys)
    assert err.startswith("error: ") and "--overwrite" in err
    assert _snapshot(dest) == before and sorted(p.name for p in tmp_path.iterdir()) == [target]


def test_train_out_cwd_is_refused(run_dir, tmp_path, capsys, monkeypatch):
    _, data, cfg, _ = run_dir
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    assert main(["train", "--config", str(cfg), "--data", str(data), "--out", ".", "--overwrite"]) == 2
    assert "current directory" in _err(capsys) and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_resume_refuses_a_changed_corpus_and_changed_settings(run_dir, tmp_path, capsys):
    import shutil

    _, data, cfg, _ = run_dir
    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    run = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--data", str(mine), "--out", str(run), "--steps", "1",
            "--batch-size", "2", "--seq-len", "16", "--no-progress"]
    assert main(args) == 0
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--lr", "0.5"]) == 2
    assert "differs from the resumed run" in _err(capsys)
    (mine / "play1.txt").write_text((mine / "play1.txt").read_text() + "an added line\n")
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--no-progress"]) == 2
    assert "play1.txt' changed since the run" in _err(capsys)
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 1


def test_train_overwrite_replaces_a_run(run_dir, tmp_path, capsys):
    import shutil

    _, data, cfg, out = run_dir
    dest = tmp_path / "run"
    shutil.copytree(out, dest)
    assert main(["train", "--config", str(cfg), "--data", str(data), "--out", str(dest), "--steps", "1",
                 "--batch-size", "2", "--seq-len", "16", "--no-progress", "--overwrite"]) == 0
    assert json.loads((dest / "checkpoint.json").read_text())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--top-p", "nan"], "--top-p must be a finite number"),
    (["--seed", str(2**70)], "--seed must be <="),
])
def test_generate_non_finite_and_huge_values(run_dir, capsys, flags, message):
    _, _, _, out = run_dir
    assert main(["generate", "--model", str(out), "--prompt", "ROMEO."] + flags) == 2
    err = _err(capsys)
    assert err.startswith("error: ") and message in err


def test_sigterm_stops_a_command_as_ctrl_c_does(tmp_path):
    """A long `arith train` told to stop: exit 143, one line, and its temporary output removed (a killed process
    would leave it)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "mulfree", "arith", "train", "--steps", "100000", "--out",
                             str(tmp_path / "run")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(tmp_path.iterdir()) and time.monotonic() < deadline:  # its temporary sibling appears
            time.sleep(0.05)
        time.sleep(1.0)  # into the training loop
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert proc.stderr.read().decode().splitlines()[-1] == "terminated"
        assert list(tmp_path.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_a_full_disk_is_one_line_and_leaves_no_temp(run_dir, tmp_path, capsys, monkeypatch):
    import errno

    from safetensors import SafetensorError

    from mulfree.cli import storage_error
    from mulfree.infer.engine import PackedModel

    _, _, _, out = run_dir
    for exc in (OSError(errno.ENOSPC, "No space left on device", "a/model.safetensors"),
                SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")):
        def full(self, directory, exc=exc):
            (Path(directory) / "half").write_bytes(b"x")
            raise exc

        monkeypatch.setattr(PackedModel, "save", full)
        assert main(["pack", "--model", str(out), "--out", str(tmp_path / "p")]) == 2
        assert _err(capsys).startswith("error: no space left on the device")
        assert os.listdir(tmp_path) == []  # the half-written temp dir is removed
    assert "writing 'a/model.safetensors'" in storage_error(OSError(errno.ENOSPC, "full", "a/model.safetensors"))
    assert storage_error(OSError(errno.EDQUOT, "quota")).startswith("the disk quota is exhausted")
    assert storage_error(OSError(errno.ENOENT, "gone")) is None and storage_error(ValueError("os error 28")) is None


def test_a_bad_backend_variable_is_one_line(run_dir, capsys, monkeypatch):
    _, _, _, out = run_dir
    monkeypatch.setenv("MULFREE_BACKEND", "avx1024")  # was a ValueError traceback
    assert main(["generate", "--model", str(out), "--prompt", "x", "--engine", "packed", "--max-new-tokens", "2"]) == 2
    assert _err(capsys) == "error: MULFREE_BACKEND='avx1024' is unknown; use one of reference, scalar, avx2, avxvnni, avx512"


def test_a_cache_variable_naming_a_file_is_one_line(run_dir, tmp_path, capsys, monkeypatch):
    _, _, _, out = run_dir
    (tmp_path / "f").write_text("x")
    for cache, why in ((tmp_path / "f", "a file, not a directory"), (tmp_path / "f" / "sub", "Not a directory")):
        monkeypatch.setenv("MULFREE_CACHE", str(cache))  # lm-eval builds its task files there: a traceback before
        assert main(["lm-eval", "--model", str(out), "--limit", "1"]) == 2
        assert _err(capsys) == (f"error: the cache dir '{cache}' cannot be used ({why}); set MULFREE_CACHE to a "
                                "writable directory, or unset it (~/.cache/mulfree)")
