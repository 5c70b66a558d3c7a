"""Kill-anywhere check of training: `kill -9` a tiny `mulfree train` run at random moments, resume it each
time, and compare the finished run with an uninterrupted one.

Each round trains a fresh run dir in a subprocess (`python -m mulfree train ... --save-every 1`), kills it
after a random delay, and starts it again (`--resume` once a checkpoint exists, else the same command)
until it finishes; rounds repeat until `--kills` kills have landed. A round passes when every restart
that was not killed exited 0, the loss records of `metrics.jsonl` (step, loss, lr, grad_norm, val_loss)
and the final `model.safetensors` tensors equal the uninterrupted run's exactly, and no temporary file
(ours: `.<name>.<8>.tmp` / `.old`) or stale `ckpt-*` is left. Prints a summary and one JSON line.

    nice -n 10 python benchmarks/crash_resume.py [--kills 50 --seed 0 --steps 40 --workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOSS_KEYS = ("step", "loss", "lr", "grad_norm", "val_loss", "val_ppl")
TEXT = "ROMEO. But soft, what light through yonder window breaks?\nJULIET. Ay me. O Romeo, Romeo!\n"


def setup(root: Path, steps: int) -> list[str]:
    """Write the tiny corpus and config; return the `mulfree train` arguments (without --out)."""
    data, cfg = root / "data", root / "cfg.json"
    plays = {data / f"play{k}.txt": f"PLAY {k}\n" + TEXT * 40 for k in range(3)}
    data.mkdir()
    for path, text in plays.items():
        path.write_text(text)
    model = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300, "max_position_embeddings": 64}
    cfg.write_text(json.dumps({**model, "train": {"eval_batches": 1, "warmup": 2}}))
    return ["train", "--config", str(cfg), "--data", str(data), "--steps", str(steps), "--batch-size", "2",
            "--seq-len", "16", "--save-every", "1", "--eval-every", "10", "--no-progress"]


def launch(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mulfree", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def loss_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in LOSS_KEYS if k in r} for r in map(json.loads, lines)]


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def leftovers(root: Path, run: Path) -> list[str]:
    """Temp files/dirs of our writers in the run dir or beside it, and checkpoints other than the last."""
    from mulfree.atomic import is_temp_name

    pointed = json.loads((run / "checkpoint.json").read_text())["checkpoint"]
    found = [str(p) for p in run.rglob("*") if is_temp_name(p.name)]
    found += [str(p) for p in root.iterdir() if is_temp_name(p.name)]
    found += [str(p) for p in run.glob("ckpt-*") if p.name != pointed]
    return found


class Clock:
    """Predicts a launch's lifetime from the uninterrupted run (start-up, then training in proportion to the
    steps left), rescaled by the last launch that finished unkilled (the machine's load changes)."""

    def __init__(self, t_start: float, t_train: float, steps: int):
        self.t_start, self.t_train, self.steps, self.scale = t_start, t_train, steps, 1.0

    def lifetime(self, done: int) -> float:
        return self.t_start + (1 - done / self.steps) * self.t_train

    def window(self, done: int) -> tuple[float, float]:
        """Kill moments: from late start-up (some kills before the run dir is written) to the predicted end."""
        lo, hi = 0.8 * self.scale * self.t_start, self.scale * self.lifetime(done)
        return lo, max(hi, lo + 0.05)

    def observe(self, done: int, wall: float) -> None:
        self.scale = min(5.0, max(0.2, wall / self.lifetime(done)))


def _done(run: Path) -> int:
    pointer = run / "checkpoint.json"
    return int(json.loads(pointer.read_text())["step"]) if pointer.is_file() else 0


def one_round(root: Path, base: list[str], run: Path, rng: random.Random, clock: Clock, kills_left: int,
              log: list[str]) -> dict:
    """Train `run` to completion under random kills; returns counts and the restart failures."""
    from mulfree.atomic import is_temp_name

    kills = restarts = torn = 0
    failures: list[str] = []
    while True:
        resume = (run / "checkpoint.json").is_file()
        done = _done(run)
        argv = [*base, "--out", str(run)] + (["--resume"] if resume else [])
        restarts += resume
        t0 = time.perf_counter()
        proc = launch(argv)
        delay = rng.uniform(*clock.window(done)) if kills < kills_left else None
        try:
            proc.wait(timeout=delay)
            clock.observe(done, time.perf_counter() - t0)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            torn += run.is_dir() and any(is_temp_name(p.name) for p in [*run.iterdir(), *root.iterdir()])
            log.append(f"kill {kills} after {delay:.2f}s ({'resume' if resume else 'fresh start'})")
            continue
        err = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            listing = sorted(p.name for p in run.iterdir()) if run.is_dir() else []
            failures.append(f"exit {proc.returncode} ({'resume' if resume else 'start'}): {err.strip()[-300:]} "
                            f"[run dir: {', '.join(listing)}]")
            if len(failures) > 3:
                return {"kills": kills, "restarts": restarts, "torn": torn, "failures": failures, "finished": False}
            continue
        return {"kills": kills, "restarts": restarts, "torn": torn, "failures": failures, "finished": True}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="kill -9 to land in total (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--steps", type=int, default=40, help="training steps of the tiny run")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir, removed)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="crash_resume."))
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        base = setup(root, args.steps)
        t0 = time.perf_counter()
        ref = launch([*base, "--out", str(root / "reference")])
        t_train = None  # when train() starts writing the run dir (imports, corpus and tokenizer are done)
        while ref.poll() is None:
            if t_train is None and (root / "reference" / "train_config.json").exists():
                t_train = time.perf_counter() - t0
            time.sleep(0.01)
        err = ref.stderr.read() if ref.stderr else ""
        ref_wall = time.perf_counter() - t0
        if ref.returncode != 0:
            print(f"uninterrupted run failed: {err.strip()[-500:]}", file=sys.stderr)
            return 1
        reference = loss_records(root / "reference")
        clock = Clock(t_train or 0.0, ref_wall - (t_train or 0.0), args.steps)
        rounds, log, kills, restarts, bad = [], [], 0, 0, []
        while kills < args.kills and len(rounds) <= 2 * args.kills:
            run = root / f"run{len(rounds)}"
            r = one_round(root, base, run, rng, clock, args.kills - kills, log)
            kills, restarts = kills + r["kills"], restarts + r["restarts"]
            problems = list(r["failures"])
            if r["finished"]:
                if loss_records(run) != reference:
                    problems.append("metrics.jsonl losses differ from the uninterrupted run")
                if not same_weights(run, root / "reference"):
                    problems.append("model.safetensors differs from the uninterrupted run")
                problems += [f"left behind: {p}" for p in leftovers(root, run)]
            else:
                problems.append("the run never finished")
            rounds.append({"run": run.name, **r, "problems": problems})
            bad += [f"{run.name}: {p}" for p in problems]
            if not args.workdir and not problems:
                shutil.rmtree(run, ignore_errors=True)
        if kills < args.kills:
            bad.append(f"only {kills} of {args.kills} kills landed in {len(rounds)} runs")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - t_start
    print(f"uninterrupted run: {args.steps} steps in {ref_wall:.1f} s ({clock.t_start:.1f} s to the first write); "
          f"kills at random moments from 80 % of that start-up to the predicted end of each launch")
    torn = sum(r["torn"] for r in rounds)
    print(f"{kills} kills over {len(rounds)} runs ({torn} left a half-written temp file), {restarts} resumes; "
          f"{sum(not r['problems'] for r in rounds)}/{len(rounds)} runs identical to the uninterrupted one "
          f"(losses and weights), no temp files left: {not any('left behind' in b for b in bad)}")
    for line in bad:
        print(f"  PROBLEM {line}")
    summary = {"kills": kills, "kills_mid_write": torn, "runs": len(rounds), "resumes": restarts, "steps": args.steps, "seed": args.seed,
               "failed_restarts": sum(len(r["failures"]) for r in rounds),
               "identical_runs": sum(not r["problems"] for r in rounds), "problems": len(bad),
               "wall_s": round(wall, 1)}
    print(json.dumps(summary))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
