"""FSDP2 (`--fsdp`) under torchrun on CPU (gloo), two processes: the same training as one process with the
two ranks' micro-batches accumulated, collective checkpoints in the single-process format, exact resume
after a SIGKILL of the whole process tree."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mulfree.cli import main
from mulfree.models.io import load_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# FSDP vs one process: the same math on the same batches, but the gradients are summed in another order
# (reduce-scatter of the ranks' micro-batches vs accumulation in one process), so weights and optimizer
# state differ by float32 rounding (measured: weights 6e-8 apart, gradient norms 1.1e-7 relative, losses
# and logits equal; DDP is bit-identical). The tolerances leave room for other CPUs' summation order.
RTOL = 1e-4


def _tiny_run(tmp_path: Path) -> list[str]:
    """`mulfree train` arguments of a tiny MMfree run on a short repeated text (as tests/test_ddp.py)."""
    data = tmp_path / "data.txt"
    data.write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 400)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_type": "mmfree", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2}))
    return ["train", "--config", str(cfg), "--data", str(data), "--seq-len", "16", "--warmup", "0", "--eval-every", "0",
            "--no-progress"]


def _torchrun(argv: list[str], timeout: float = 120) -> None:
    proc = subprocess.run([*TORCHRUN, "-m", "mulfree", *argv], env=ENV, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _records(run: Path) -> list[dict]:
    """The training records (step, loss, grad_norm, lr) of a run's metrics.jsonl."""
    keys = ("step", "loss", "grad_norm", "lr")
    return [{k: r[k] for k in keys} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def _logits(run: Path) -> torch.Tensor:
    model, _ = load_model(run)
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))[0]


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_processes_train_as_one_with_their_micro_batches_accumulated(tmp_path, mode):
    """2 ranks x --grad-accum 1 see the batches of 1 process x --grad-accum 2 (global micro-step keys), report
    the mean loss over the global batch and take the same steps; FSDP checkpoints are single-process files."""
    flags = ["--fsdp"] if mode == "fsdp" else []  # in the single process a no-op, kept for the resume below
    base = [*_tiny_run(tmp_path), "--steps", "4", "--batch-size", "2", "--save-every", "2", *flags]
    single, multi = tmp_path / "single", tmp_path / mode
    assert main([*base, "--grad-accum", "2", "--out", str(single)]) == 0
    _torchrun([*base, "--grad-accum", "1", "--out", str(multi)])

    one, two = _records(single), _records(multi)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert a["lr"] == b["lr"]
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=RTOL), (a, b)  # the global norm, not a shard's
    assert torch.allclose(_logits(multi), _logits(single), rtol=1e-4, atol=1e-4)

    # The last checkpoint holds the same tensors and state (bar the run's own settings) in either run.
    ckpt_one, ckpt_two = single / "ckpt-4", multi / "ckpt-4"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(ckpt_one / name)), load_file(str(ckpt_two / name))
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
            if key != "torch_rng":  # relative to the tensor's largest entry: exp_avg_sq holds values near 0
                assert (a[key] - b[key]).abs().max() <= RTOL * a[key].abs().max(), key
    state_one, state_two = (json.loads((c / "state.json").read_text()) for c in (ckpt_one, ckpt_two))
    assert state_one["param_groups"] == state_two["param_groups"]
    assert state_one["model_config"] == state_two["model_config"]
    assert state_two["train_config"]["fsdp"] == (mode == "fsdp")
    if mode == "fsdp":  # one process resumes the FSDP run's checkpoint, and FSDP the single process's
        assert main(["train", "--out", str(multi), "--resume", "--steps", "5", "--no-progress"]) == 0
        _torchrun(["train", "--out", str(single), "--resume", "--steps", "5", "--no-progress"])
        for run, before in ((multi, two), (single, one)):
            records = _records(run)
            assert records[:4] == before and records[4]["step"] == 5 and math.isfinite(records[4]["loss"])


def _process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc; torchrun starts each worker in its own session)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    return tree


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's process group and each worker's (every process of the run dies at once)."""
    groups = set()
    for pid in _process_tree(proc.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


# `mulfree train` whose rank 0 pauses after logging step 3 (rank 1 then waits in step 4's collectives), so
# that the poll below catches the run between its step-2 checkpoint and the next one on a busy machine;
# the training itself is the CLI's.
PAUSING_TRAIN = """
import sys, time
import mulfree.train
from mulfree.cli import main
append = mulfree.train.append_metrics
def append_and_pause(path, record):
    append(path, record)
    if record.get("step") == 3 and "loss" in record:
        time.sleep(60)
mulfree.train.append_metrics = append_and_pause
sys.exit(main(sys.argv[1:]))
"""


def _logged_steps(run: Path) -> list[int]:
    try:
        return [r["step"] for r in _records(run)]
    except (OSError, ValueError):  # not written yet, or a line being written
        return []


def test_fsdp_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path):
    """SIGKILL every process of a 2-process FSDP run after step 3 (checkpoint: step 2); `--resume` under FSDP
    drops step 3's record, redoes it and finishes with the losses and weights of a run never killed. That run
    (2 ranks x --grad-accum 2, gradients reduced on the last micro-step only) equals 1 process x 4."""
    run = [*_tiny_run(tmp_path), "--steps", "6", "--batch-size", "2", "--save-every", "2"]
    args = [*run, "--grad-accum", "2", "--fsdp"]
    straight, killed, single = tmp_path / "straight", tmp_path / "killed", tmp_path / "single"
    _torchrun([*args, "--out", str(straight)])
    assert main([*run, "--grad-accum", "4", "--out", str(single)]) == 0
    for a, b in zip(_records(single), _records(straight), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                 rel=RTOL), (a, b)

    script = tmp_path / "pausing_train.py"
    script.write_text(PAUSING_TRAIN)
    proc = subprocess.Popen([*TORCHRUN, str(script), *args, "--out", str(killed)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while 3 not in _logged_steps(killed) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert json.loads((killed / "checkpoint.json").read_text())["step"] == 2
    assert _logged_steps(killed) == [1, 2, 3] and not (killed / "model.safetensors").exists()

    _torchrun([*args, "--out", str(killed), "--resume"])
    assert _records(killed) == _records(straight)  # exact: the same reductions on the same restored shards
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
