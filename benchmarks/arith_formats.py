"""Arithmetic grid: model × format × task, several seeds per cell, each run stopped at a CPU-time budget;
one JSONL row per run (finished runs are skipped, so an interrupted grid resumes), and a `--report` mode
that renders the mean ± sd table (markdown, also spliced into docs/arithmetic.md) and a heatmap PNG.

    # 3-digit addition, 15 CPU-minutes of training per run, 3 seeds per cell
    python benchmarks/arith_formats.py --task add --digits 3 --models mmfree,transformerpp,bitnet \\
        --formats interleaved,reversed --seeds 0,1,2 --cpu-minutes 15 --out runs/arith_grid
    # length generalization: train on 1-5 digits, test on 1-8
    python benchmarks/arith_formats.py --length-gen --models transformerpp --formats all --cpu-minutes 15
    python benchmarks/arith_formats.py --report --out runs/arith_grid --doc docs/arithmetic.md --png docs/arith_grid.png

Budget: `--cpu-minutes` is the training CPU time of one run (time.process_time of its process, all threads;
`mulfree.train.train(cpu_budget_s=...)` stops at the first step that reaches it). The LR schedule is planned
for the steps the budget allows: a probe of a few steps measures CPU seconds per step first (not counted in
the budget; reported as probe_cpu_s), unless `--steps` fixes the schedule. Evaluation CPU is reported apart.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path

TERNARY = ("mmfree", "bitnet")  # want ~3x the LR of the float transformer
BEGIN, END = "<!-- arith-grid:begin -->", "<!-- arith-grid:end -->"
KEY_FIELDS = ("task", "digits", "eval_lengths", "model", "format", "seed", "cpu_budget_s", "steps_spec", "lr",
              "batch_size")


def _lengths(spec: str | None, digits: int) -> list[int]:
    if not spec:
        return list(range(1, digits + 4))
    if "-" in spec:
        lo, hi = (int(v) for v in spec.split("-", 1))
        return list(range(lo, hi + 1))
    return sorted({int(v) for v in spec.split(",")})


def _key(row: dict) -> str:
    return json.dumps([row.get(k) for k in KEY_FIELDS])


def read_rows(paths: list[Path]) -> list[dict]:
    """Rows of the JSONL files (a torn last line, from a killed run, is skipped)."""
    rows = []
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                print(f"skipping an unreadable line of {path}", file=sys.stderr)
    return rows


def probe_seconds_per_step(spec: dict, steps: int = 6, warmup: int = 2) -> tuple[float, float]:
    """(CPU s per training step, CPU s the probe took) for one cell, measured on a throwaway model."""
    import torch

    from mulfree.arith import build_model, make_batch_fn, tokenizer_for
    from mulfree.data.arithmetic import ArithTask
    from mulfree.train import _generator, lm_loss

    cpu0 = time.process_time()
    tok = tokenizer_for(spec["format"])
    model = build_model(spec["model"], tok.vocab_size, seed=spec["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"])
    batch_fn = make_batch_fn(ArithTask(spec["task"], spec["format"], spec["digits"]), tok, spec["batch_size"])
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.process_time()
        x, y = batch_fn(step, _generator(spec["seed"], 99, step))
        opt.zero_grad(set_to_none=True)
        lm_loss(model, x, y).backward()
        opt.step()
    return (time.process_time() - t0) / steps, time.process_time() - cpu0


def run_cell(spec: dict) -> dict:
    """Train and evaluate one run of the grid; returns its JSONL row."""
    import torch

    from mulfree.arith import train_arith
    from mulfree.data.arithmetic import ArithTask
    from mulfree.train import TrainConfig

    torch.set_num_threads(spec["threads"])
    budget = spec["cpu_budget_s"]
    per_step, probe_cpu = (None, 0.0)
    if spec["steps_spec"] == "auto":
        per_step, probe_cpu = probe_seconds_per_step(spec)
        steps = max(1, int(0.97 * budget / per_step))
    else:
        steps = int(spec["steps_spec"])
    cfg = TrainConfig(steps=steps, batch_size=spec["batch_size"], seq_len=64, lr=spec["lr"], min_lr=spec["lr"] / 10,
                      warmup=min(100, steps), eval_every=0, eval_batches=1, save_every=0, seed=spec["seed"],
                      progress=False)
    task = ArithTask(spec["task"], spec["format"], spec["digits"])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    model, results, metrics = train_arith(task, spec["model"], spec["run_dir"], cfg, eval_lengths=spec["eval_lengths"],
                                          test_per_length=spec["per_length"], overwrite=True, cpu_budget_s=budget)
    cpu_total = time.process_time() - cpu0
    row = {k: spec[k] for k in KEY_FIELDS}
    row.update(steps_planned=steps, steps=metrics["step"], s_per_step_probe=per_step, probe_cpu_s=round(probe_cpu, 1),
               train_cpu_s=round(metrics["cpu_s"], 1), eval_cpu_s=round(cpu_total - metrics["cpu_s"], 1),
               wall_s=round(time.perf_counter() - wall0, 1), final_loss=metrics["loss"],
               params=sum(p.numel() for p in model.parameters()), threads=spec["threads"],
               results=[vars(r) for r in results], host=platform.node(), torch=torch.__version__,
               finished=datetime.now(UTC).isoformat(timespec="seconds"), run_dir=str(spec["run_dir"]))
    return row


def grid(args: argparse.Namespace) -> None:
    from mulfree.data.arithmetic import FORMATS

    formats = list(FORMATS) if args.formats == "all" else args.formats.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 3:
        print(f"note: {len(seeds)} seed(s) per cell; the tables want >= 3", file=sys.stderr)
    if args.cpu_minutes is None and args.steps is None:
        sys.exit("error: pass --cpu-minutes (a CPU budget per run) or --steps")
    lengths = _lengths(args.eval_lengths, args.digits)
    out = Path(args.out)
    jsonl = Path(args.jsonl) if args.jsonl else out / "grid.jsonl"
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in read_rows([jsonl])}
    todo = []
    for model in args.models.split(","):
        for fmt in formats:
            for seed in seeds:
                spec = {"task": args.task, "digits": args.digits, "eval_lengths": lengths, "model": model,
                        "format": fmt, "seed": seed, "lr": args.lr_ternary if model in TERNARY else args.lr,
                        "cpu_budget_s": None if args.cpu_minutes is None else 60.0 * args.cpu_minutes,
                        "steps_spec": "auto" if args.steps is None else str(args.steps),
                        "batch_size": args.batch_size, "per_length": args.per_length, "threads": args.threads}
                if args.steps is None and spec["cpu_budget_s"] is None:
                    continue
                spec["run_dir"] = str(out / f"{args.task}{args.digits}" / f"{model}-{fmt}-s{seed}")
                if _key(spec) in done:
                    print(f"done already: {model}/{fmt} seed {seed}")
                else:
                    todo.append(spec)
    print(f"{len(todo)} run(s) to do -> {jsonl}", flush=True)

    def record(row: dict) -> None:
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        exact = {r["digits"]: r["exact"] for r in row["results"]}
        print(f"{row['model']}/{row['format']} seed {row['seed']}: {row['steps']} steps, "
              f"{row['train_cpu_s']:.0f} train CPU s, loss {row['final_loss']:.4f}, exact % "
              + " ".join(f"{n}:{100 * v:.1f}" for n, v in exact.items()), flush=True)

    if args.jobs <= 1:
        for spec in todo:
            record(run_cell(spec))
        return
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        for row in pool.map(run_cell, todo):
            record(row)


def summarize(rows: list[dict]) -> dict[tuple, dict]:
    """(setup, model, format) -> {"n": seeds, "exact": {length: [per-seed %]}, "cpu_s": [...], ...}."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        lengths = r["eval_lengths"]
        setup = f"{r['task']} 1-{r['digits']} digits, test {lengths[0]}-{lengths[-1]}"
        budget = r["cpu_budget_s"] and f"{r['cpu_budget_s'] / 60:g} CPU-min"
        key = (setup, budget or f"{r['steps_spec']} steps", r["model"], r["format"])
        cell = cells.setdefault(key, {"seeds": [], "exact": {}, "cpu_s": [], "steps": [], "digits": r["digits"]})
        cell["seeds"].append(r["seed"])
        cell["cpu_s"].append(r["train_cpu_s"])
        cell["steps"].append(r["steps"])
        for res in r["results"]:
            cell["exact"].setdefault(res["digits"], []).append(100 * res["exact"])
    return cells


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def markdown(cells: dict[tuple, dict]) -> str:
    """One table per setup: rows model/format, cells mean ± sd of exact match % over seeds."""
    out = []
    for setup in sorted({k[:2] for k in cells}):
        keys = sorted(k for k in cells if k[:2] == setup)
        lengths = sorted({n for k in keys for n in cells[k]["exact"]})
        out += [f"**{setup[0]}, {setup[1]} per run** (exact match %, mean ± sd over seeds)", "",
                "| model | format | seeds | " + " | ".join(f"{n} digits" for n in lengths) + " | steps | train CPU s |",
                "|---|---|---|" + "---|" * len(lengths) + "---|---|"]
        for k in keys:
            c = cells[k]
            trained = [n for n in lengths if n <= c["digits"]]
            vals = [(f"**{_mean_sd(c['exact'][n])}**" if trained and n == trained[-1] else _mean_sd(c["exact"][n]))
                    if n in c["exact"] else "" for n in lengths]
            out.append(f"| {k[2]} | `{k[3]}` | {len(c['seeds'])} | " + " | ".join(vals)
                       + f" | {statistics.mean(c['steps']):.0f} | {statistics.mean(c['cpu_s']):.0f} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def report(args: argparse.Namespace) -> None:
    from mulfree.arith import LengthResult, plot_heatmap

    paths = [Path(p) for p in args.jsonl.split(",")] if args.jsonl else [Path(args.out) / "grid.jsonl"]
    rows = read_rows(paths)
    if not rows:
        sys.exit(f"error: no rows in {', '.join(map(str, paths))}; run the grid first")
    cells = summarize(rows)
    table = markdown(cells)
    print(table)
    heat = {f"{k[0].split(',')[0]} {k[2]}/{k[3]}": [LengthResult(n, len(v), statistics.mean(v) / 100, 0.0, 0)
                                                   for n, v in sorted(c["exact"].items())]
            for k, c in sorted(cells.items())}
    print(f"heatmap: {plot_heatmap(heat, args.png, title='exact match %, mean over seeds')}")
    if args.doc:
        doc = Path(args.doc)
        text = doc.read_text()
        if BEGIN not in text or END not in text:
            sys.exit(f"error: {doc} lacks the {BEGIN} / {END} markers around the grid table")
        head, rest = text.split(BEGIN, 1)
        doc.write_text(head + BEGIN + "\n" + table + END + rest.split(END, 1)[1])
        print(f"table written into {doc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="add", choices=["add", "mul"])
    p.add_argument("--digits", type=int, default=3, help="longest training operand")
    p.add_argument("--eval-lengths", default=None, help="e.g. 1-6 or 6,7,8 (default 1..digits+3)")
    p.add_argument("--length-gen", action="store_true", help="addition, train on 1-5 digits, test on 1-8")
    p.add_argument("--formats", default="interleaved,reversed", help="comma list, or all")
    p.add_argument("--models", default="mmfree,transformerpp,bitnet", help="comma list (mmfree, transformerpp, bitnet)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--cpu-minutes", type=float, default=None, help="training CPU budget per run")
    p.add_argument("--steps", type=int, default=None, help="fix the schedule length (default: from the budget)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak LR of the float transformer")
    p.add_argument("--lr-ternary", type=float, default=3e-3, help="peak LR of mmfree and bitnet")
    p.add_argument("--per-length", type=int, default=200, help="test problems per operand length")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    p.add_argument("--out", default="runs/arith_grid", help="run dirs and grid.jsonl")
    p.add_argument("--jsonl", default=None, help="rows file(s), comma-separated for --report (default OUT/grid.jsonl)")
    p.add_argument("--report", action="store_true", help="render the table and heatmap from the rows")
    p.add_argument("--png", default="docs/arith_grid.png")
    p.add_argument("--doc", default=None, help="markdown file whose grid table (between markers) to replace")
    args = p.parse_args()
    if args.length_gen:
        args.task, args.digits, args.eval_lengths = "add", 5, args.eval_lengths or "1-8"
    report(args) if args.report else grid(args)


if __name__ == "__main__":
    main()
