"""Kill-anywhere: a tiny training run killed with SIGKILL twice at random moments and resumed ends
identical to an uninterrupted one (benchmarks/crash_resume.py, small)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crash_resume.py"


@pytest.mark.slow  # four short training processes (about 20 s on 2 idle cores)
def test_kills_resume_to_the_uninterrupted_run():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--kills", "2", "--steps", "6", "--seed", "3"],
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["kills"] == 2 and summary["problems"] == 0 and summary["failed_restarts"] == 0
