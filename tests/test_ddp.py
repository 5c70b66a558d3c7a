"""Distributed training through PyTorch's own torchrun + DDP (gloo on CPU), two processes."""

import json
import os
import subprocess
import sys

import torch

from mulfree.cli import main
from mulfree.models.io import load_model


def test_torchrun_two_processes_train_one_model(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 400)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_type": "mmfree", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2}))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "--config", str(cfg), "--data", str(data), "--steps", "3", "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "0", "--save-every", "0", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mulfree",
           *args, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    model, tok = load_model(out)
    assert tok is not None
    # Rank 1's batches reached the shared update: one process on rank 0's data ends elsewhere.
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    solo, _ = load_model(single)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ddp_logits, solo_logits = model(ids)[0], solo(ids)[0]
    assert torch.isfinite(ddp_logits).all()
    assert not torch.equal(ddp_logits, solo_logits)
