"""Batched decode of a KV-cache model at growing context: rows' own caches grown in place against the padded batch.

    python benchmarks/kv_decode.py                          # SmolLM2-135M, 8 sequences, 16..1,300 tokens of context
    python benchmarks/kv_decode.py --model out/tpp --batch 4 --lengths 128 2048

`infer.kv_batch.decode_kv_batch` steps B sequences of different lengths in one forward. Our forwards (Transformer++,
`LlamaLM`) take the rows' caches as they are and append each row's new key and value in place (`rows`); any other
model gets the caches left-padded into one batch with a key mask (`padded`: every row's cache copied twice a step).
Per context length: B caches prefilled from the bundled text (row b is 7 b tokens shorter), two warm-up steps, then
--steps timed steps on each path, the paths alternating for --rounds rounds. Prints ms per step and tokens/s (ranges
over the rounds), the ratio, the load average and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from decode import cpu_model

from mulfree.data.text import bundled_text_files
from mulfree.infer.kv_batch import decode_kv_batch
from mulfree.models.resolve import resolve


def time_path(model, prompts: list[list[int]], rows: bool, steps: int) -> float:
    """Seconds per decode step of the B sequences after their prompts, on one path."""
    model.rows_kv = rows
    with torch.no_grad():
        caches = [model(torch.tensor([p]))[1] for p in prompts]
        tokens = [p[-1] for p in prompts]
        for _ in range(2):
            _, caches = decode_kv_batch(model, tokens, caches)
        t0 = time.perf_counter()
        for _ in range(steps):
            _, caches = decode_kv_batch(model, tokens, caches)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a Transformer++ or Llama-family model reference")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 512, 1300])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not (1 <= args.batch <= 64 and 1 <= args.steps <= 1000 and 1 <= args.rounds <= 10):
        raise SystemExit("error: --batch in 1..64, --steps in 1..1000, --rounds in 1..10")
    torch.set_num_threads(args.threads)
    loaded = resolve(args.model, "torch")
    model = loaded.model
    if not getattr(type(model), "rows_kv", False):
        raise SystemExit(f"error: {args.model} is run by a forward without rows' own caches: nothing to compare")
    ids = loaded.tokenizer.encode(bundled_text_files()[0].read_text(encoding="utf-8")[:200_000]).ids
    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.2f}; {args.model}, {args.batch} sequences")
    res: dict = {"benchmark": "kv_decode", "model": args.model, "host": cpu_model(), "threads": args.threads,
                 "batch": args.batch, "loadavg_1m_before": os.getloadavg()[0], "lengths": {}}
    print(f"{'context':>8} {'padded ms/step':>16} {'rows ms/step':>14} {'rows tok/s':>12} {'padded / rows':>14}")
    for length in args.lengths:
        prompts = [ids[b * 1000 : b * 1000 + max(1, length - 7 * b)] for b in range(args.batch)]
        runs: dict[str, list[float]] = {"padded": [], "rows": []}
        for _ in range(args.rounds):
            for path in ("padded", "rows"):
                runs[path].append(time_path(model, prompts, path == "rows", args.steps))
        ratios = [a / b for a, b in zip(runs["padded"], runs["rows"])]
        res["lengths"][length] = {**{f"{k}_ms": [1e3 * t for t in v] for k, v in runs.items()}, "ratio": ratios}

        def span(xs: list[float]) -> str:
            return f"{min(xs):.0f}-{max(xs):.0f}"

        print(f"{length:>8} {span([1e3 * t for t in runs['padded']]):>16} {span([1e3 * t for t in runs['rows']]):>14} "
              f"{span([args.batch / t for t in runs['rows']]):>12} {min(ratios):>7.2f}-{max(ratios):.2f}x", flush=True)
    res["loadavg_1m_after"] = os.getloadavg()[0]
    print(f"load average (1 min): {res['loadavg_1m_after']:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
