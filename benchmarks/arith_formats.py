"""Train the same small model on several arithmetic formats with the same budget and print the
accuracies per operand length side by side (plus a heatmap PNG and one JSON line).

    python benchmarks/arith_formats.py --task add --digits 3 --formats plain,reversed,random-space \
        --models transformerpp --steps 1500 --out runs/arith
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mulfree.arith import format_table, plot_heatmap, train_arith
from mulfree.data.arithmetic import ArithTask
from mulfree.models import registry
from mulfree.train import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="add", choices=["add", "mul"])
    p.add_argument("--digits", type=int, default=3, help="longest training operand")
    p.add_argument("--formats", default="plain,reversed,random-space")
    p.add_argument("--models", default="transformerpp", help="comma list of model families (transformerpp, mmfree)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak LR of the transformer")
    p.add_argument("--lr-mmfree", type=float, default=3e-3, help="peak LR of the ternary model (wants ~3x)")
    p.add_argument("--eval-lengths", default=None, help="e.g. 1-6 (default 1..digits+3)")
    p.add_argument("--per-length", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="runs/arith_formats")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    lengths = None
    if args.eval_lengths:
        lo, hi = (int(v) for v in args.eval_lengths.split("-"))
        lengths = list(range(lo, hi + 1))
    rows, record = {}, {"task": args.task, "digits": args.digits, "steps": args.steps,
                        "batch_size": args.batch_size, "runs": {}}
    for kind in map(registry.canonical, args.models.split(",")):
        for fmt in args.formats.split(","):
            lr = args.lr_mmfree if kind == "mmfree" else args.lr
            cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=64, lr=lr, min_lr=lr / 10,
                              warmup=min(100, args.steps), eval_every=0, eval_batches=1, save_every=0,
                              seed=args.seed, progress=False)
            label = f"{kind}/{fmt}"
            cpu0, wall0 = time.process_time(), time.perf_counter()
            model, results, metrics = train_arith(ArithTask(args.task, fmt, args.digits), kind,
                                                  Path(args.out) / f"{args.task}{args.digits}-{kind}-{fmt}", cfg,
                                                  eval_lengths=lengths, test_per_length=args.per_length,
                                                  overwrite=True)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            rows[label] = results
            record["runs"][label] = {"params": sum(q.numel() for q in model.parameters()), "lr": lr,
                                     "final_loss": metrics["loss"], "cpu_s": round(cpu, 1),
                                     "wall_s": round(wall, 1), "results": [asdict(r) for r in results]}
            print(f"{label}: loss {metrics['loss']:.4f}, cpu {cpu:.0f} s, wall {wall:.0f} s, "
                  f"exact@{args.digits} {100 * next(r.exact for r in results if r.digits == args.digits):.1f} %",
                  flush=True)
    print(format_table(rows))
    png = plot_heatmap(rows, Path(args.out) / f"{args.task}{args.digits}_heatmap.png",
                       title=f"{args.task}, trained on <= {args.digits} digits: exact match %")
    print(f"heatmap: {png}")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
