"""`mulfree arith train|eval`: small LMs learning addition / multiplication in positional formats."""

from __future__ import annotations

import argparse

from mulfree.commands.flags import add_flags, from_args
from mulfree.errors import ConfigError


def _lengths(spec: str) -> list[int]:
    """'1-6' or '3,5,7' -> the operand lengths to evaluate."""
    try:
        if "-" in spec:
            lo, hi = (int(v) for v in spec.split("-", 1))
            out = list(range(lo, hi + 1))
        else:
            out = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ConfigError(f"cannot read operand lengths {spec!r}", "write them as 1-6 or 2,4,6") from None
    if not out or min(out) < 1:
        raise ConfigError(f"operand lengths {spec!r} must be >= 1", "write them as 1-6 or 2,4,6")
    return out


def register(sub: argparse._SubParsersAction) -> None:
    from mulfree.data.arithmetic import FORMATS, OPS
    from mulfree.models import registry
    from mulfree.settings import TrainConfig

    p = sub.add_parser("arith", help="train/evaluate small models on arithmetic in positional formats",
                       description="Addition and multiplication with positional formats (Shen et al. 2023, Lee et al. 2024).")
    group = p.add_subparsers(dest="arith_command", metavar="ACTION")

    t = group.add_parser("train", help="train a small model on one arithmetic task and evaluate it",
                         description="Train on operands of 1..--digits digits (fresh balanced problems each "
                                     "step; the test problems are held out), then report accuracy on "
                                     "1..--digits+3 digits.")
    t.add_argument("--task", choices=list(OPS), default="add", help="operation (default: add)")
    t.add_argument("--format", choices=FORMATS, default="reversed", help="data format (default: reversed)")
    t.add_argument("--digits", type=int, default=3, help="longest training operand (default: 3)")
    t.add_argument("--width", type=int, default=None, help="padding width of the padded formats (default: --digits)")
    t.add_argument("--model", type=registry.canonical, choices=registry.NAMES, default="transformerpp",
                   help="model family")
    t.add_argument("--preset", default="arith", help="arith (~1M params, d=128, 4 layers) or a model preset/config .json")
    t.add_argument("--out", required=True, help="output directory")
    add_flags(t, TrainConfig, only=("steps", "batch_size", "lr", "warmup", "seed"),
              defaults={"steps": 2000, "batch_size": 128, "lr": 1e-3, "warmup": 100, "seed": 0})
    t.add_argument("--eval-lengths", default=None, help="operand lengths to test, e.g. 1-6 (default: 1..digits+3)")
    t.add_argument("--test-per-length", type=int, default=200, help="test problems per length (default: 200)")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.set_defaults(func=_train)

    e = group.add_parser("eval", help="exact-match and per-digit accuracy per operand length",
                         description="Evaluate one or more `arith train` directories on the same held-out "
                                     "problems; prints a table and writes a lengths x runs heatmap PNG.")
    e.add_argument("--model", nargs="+", required=True, help="one or more directories from `mulfree arith train`")
    e.add_argument("--lengths", default=None, help="operand lengths, e.g. 1-6 (default: 1..digits+3)")
    e.add_argument("--per-length", type=int, default=None, help="test problems per length (default: as in training)")
    e.add_argument("--png", default="arith_eval.png", help="heatmap output path (default: arith_eval.png)")
    e.add_argument("--seed", type=int, default=None, help="seed of the test problems (default: the training one)")
    e.add_argument("--saved", action="store_true", help="use the results stored at training time (no decoding)")
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from mulfree.arith import format_table, train_arith
    from mulfree.data.arithmetic import ArithTask, check_digits
    from mulfree.train import TrainConfig

    check_digits(args.digits)
    if args.test_per_length < 1:
        raise ConfigError("--test-per-length must be >= 1", "pass a positive count")
    task = ArithTask(args.task, args.format, args.digits, args.width)
    lengths = _lengths(args.eval_lengths) if args.eval_lengths else None
    cfg = from_args(TrainConfig, args, seq_len=64, min_lr=args.lr / 10, warmup=min(args.warmup, args.steps),
                    eval_every=max(1, args.steps // 10), eval_batches=2, save_every=0)
    _, results, metrics = train_arith(task, args.model, args.out, cfg, args.preset, lengths,
                                      args.test_per_length, overwrite=args.overwrite)
    print(f"trained {args.model} on {args.task} {args.format} <= {args.digits} digits: "
          f"{metrics['step']} steps, loss {metrics['loss']:.4f}, {metrics['wall_s']:.0f} s")
    print(format_table({f"{args.model}/{args.format}": results}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mulfree.arith import evaluate_task, format_table, load_run, plot_heatmap, read_results
    from mulfree.data.arithmetic import make_test_set

    if args.per_length is not None and args.per_length < 1:
        raise ConfigError("--per-length must be >= 1", "pass a positive count")
    rows = {}
    for model_dir in args.model:
        model, tok, task, meta = load_run(model_dir)
        label = f"{meta.get('model', '?')}/{task.op}/{task.fmt}"
        if label in rows:
            label = f"{label} ({model_dir})"
        if args.saved:
            rows[label] = read_results(model_dir)
            continue
        lengths = _lengths(args.lengths) if args.lengths else list(range(1, task.digits + 4))
        per_length = args.per_length or meta.get("test_per_length", 200)
        seed = meta.get("test_seed", 1234) if args.seed is None else args.seed
        rows[label] = evaluate_task(model, tok, task, make_test_set(task.op, lengths, per_length, seed=seed))
    print(format_table(rows))
    print(f"heatmap: {plot_heatmap(rows, args.png)}")
    return 0
