"""`mulfree demo` on an idle machine and while another process keeps one core busy, in one run.

The busy process is a pure-Python spin loop (one core's worth of work, like a second user's job). Each demo
runs in a fresh subprocess into a temp dir; wall times, their ratio, the load averages and one JSON line are
printed. `--steps` shortens both demos alike (the issue's target is the full demo: `make demo`).

    python benchmarks/demo_load.py                 # the full demo, idle then loaded
    python benchmarks/demo_load.py --steps 40      # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


@contextlib.contextmanager
def one_core_busy(seconds: float, settle: float):
    """A pure-Python spin loop in a child process for the `with` block (at most `seconds`), after `settle`
    seconds for the scheduler to place it."""
    spinner = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)])
    try:
        time.sleep(settle)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def run_demo(steps: int | None, env: dict) -> tuple[float, dict]:
    """(wall seconds, the demo's own summary line) of one `mulfree demo` into a fresh temp dir."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "mulfree", "demo", "--out", str(Path(out) / "demo")]
        if steps:
            cmd += ["--steps", str(steps)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"mulfree demo failed:\n{proc.stderr[-3000:]}")
        return time.perf_counter() - t0, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: the demo's own)")
    p.add_argument("--rounds", type=int, default=1, help="idle/loaded pairs to run")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    rows = []
    for _ in range(args.rounds):
        load_idle = os.getloadavg()[0]
        idle, summary = run_demo(args.steps, env)
        with one_core_busy(3 * idle + 600, settle=2):
            load_busy = os.getloadavg()[0]
            busy, _ = run_demo(args.steps, env)
        rows.append({"idle_s": idle, "busy_s": busy, "ratio": busy / idle, "load_idle": load_idle,
                     "load_busy": load_busy, "demo": summary})
    print(f"mulfree demo{f' --steps {args.steps}' if args.steps else ''}: {os.cpu_count()} CPUs")
    print(f"{'idle s':>8} {'1 core busy s':>14} {'ratio':>6} {'load idle':>10} {'load busy':>10}")
    for r in rows:
        print(f"{r['idle_s']:8.1f} {r['busy_s']:14.1f} {r['ratio']:6.2f} {r['load_idle']:10.1f} {r['load_busy']:10.1f}")
    print(json.dumps({"bench": "demo_load", "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
