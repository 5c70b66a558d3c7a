"""`mulfree arith train|eval`: small LMs learning addition / multiplication in positional formats."""

from __future__ import annotations

import argparse

from mulfree.commands.flags import add_flags, from_args
from mulfree.errors import ConfigError


def _lengths(spec: str) -> list[int]:
    """'1-6' or '3,5,7' -> the operand lengths to evaluate (each in 1..MAX_DIGITS)."""
    from mulfree.settings import MAX_DIGITS

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
    if max(out) > MAX_DIGITS:
        raise ConfigError(f"operand lengths {spec!r} go beyond {MAX_DIGITS} digits", f"use lengths up to {MAX_DIGITS}")
    return sorted(set(out))


def register(sub: argparse._SubParsersAction) -> None:
    from mulfree.data.arithmetic import FORMATS, OPS
    from mulfree.models import registry
    from mulfree.settings import ArithConfig, ArithEvalConfig, TrainConfig

    p = sub.add_parser("arith", help="train/evaluate small models on arithmetic in positional formats",
                       description="Addition and multiplication with positional formats (Shen et al. 2023, Lee et al. 2024).")
    group = p.add_subparsers(dest="arith_command", metavar="ACTION")

    t = group.add_parser("train", help="train a small model on one arithmetic task and evaluate it",
                         description="Train on operands of 1..--digits digits (fresh balanced problems each "
                                     "step; the test problems are held out), then report accuracy on "
                                     "1..--digits+3 digits. Formats: docs/arithmetic.md.")
    t.add_argument("--task", choices=list(OPS), default="add", help="operation (default: add)")
    t.add_argument("--format", choices=FORMATS, default="reversed", help="data format (default: reversed)")
    add_flags(t, ArithConfig, only=("digits", "width"))
    t.add_argument("--model", type=registry.canonical, choices=(*registry.NAMES, "bitnet"), default="transformerpp",
                   help="model family; bitnet: Transformer++ with ternary BitLinear projections and head "
                        "(ternary models want ~3x the LR, e.g. --lr 3e-3)")
    t.add_argument("--preset", default="arith", help="arith (~1M params, d=128, 4 layers) or a model preset/config .json")
    t.add_argument("--out", required=True, help="output directory")
    add_flags(t, TrainConfig, only=("steps", "batch_size", "lr", "warmup", "seed"),
              defaults={"steps": 2000, "batch_size": 128, "lr": 1e-3, "warmup": 100, "seed": 0})
    t.add_argument("--eval-lengths", default=None, help="operand lengths to test, e.g. 1-6 (default: 1..digits+3)")
    add_flags(t, ArithConfig, only=("test_per_length",))
    t.add_argument("--overwrite", action="store_true", help="replace what --out holds (the old contents stay until "
                   "the new run is complete)")
    t.set_defaults(func=_train)

    e = group.add_parser("eval", help="exact-match and per-digit accuracy per operand length",
                         description="Evaluate one or more `arith train` directories on the same held-out "
                                     "problems; prints a table and writes a lengths x runs heatmap PNG.")
    e.add_argument("--model", nargs="+", required=True, help="one or more directories from `mulfree arith train`")
    e.add_argument("--lengths", default=None, help="operand lengths, e.g. 1-6 (default: 1..digits+3)")
    add_flags(e, ArithEvalConfig, only=("per_length",))
    e.add_argument("--png", default="arith_eval.png", help="heatmap output path (default: arith_eval.png)")
    add_flags(e, ArithEvalConfig, only=("seed",))
    e.add_argument("--saved", action="store_true", help="use the results stored at training time (no decoding)")
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from mulfree.atomic import prepare_output
    from mulfree.data.arithmetic import ArithTask, check_digits
    from mulfree.settings import ArithConfig, TrainConfig

    prepare_output(args.out, "arithmetic run", args.overwrite)  # before any work
    sizes = from_args(ArithConfig, args)
    check_digits(sizes.digits)
    task = ArithTask(args.task, args.format, sizes.digits, sizes.width)
    lengths = _lengths(args.eval_lengths) if args.eval_lengths else None
    cfg = from_args(TrainConfig, args, seq_len=64, min_lr=args.lr / 10, warmup=min(args.warmup, args.steps),
                    eval_every=max(1, args.steps // 10), eval_batches=2, save_every=max(1, args.steps // 10))
    from mulfree.arith import format_table, train_arith

    _, results, metrics = train_arith(task, args.model, args.out, cfg, args.preset, lengths,
                                      sizes.test_per_length, overwrite=args.overwrite)
    print(f"trained {args.model} on {args.task} {args.format} <= {args.digits} digits: "
          f"{metrics['step']} steps, loss {metrics['loss']:.4f}, {metrics['wall_s']:.0f} s")
    print(format_table({f"{args.model}/{args.format}": results}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mulfree.arith import evaluate_task, format_table, load_run, plot_heatmap, read_results
    from mulfree.atomic import prepare_file
    from mulfree.data.arithmetic import make_test_set
    from mulfree.settings import ArithEvalConfig

    opts = from_args(ArithEvalConfig, args)
    prepare_file(args.png, "--png", kind="png")
    given_lengths = _lengths(args.lengths) if args.lengths else None
    rows = {}
    for model_dir in args.model:
        model, tok, task, meta = load_run(model_dir)
        label = f"{meta.get('model', '?')}/{task.op}/{task.fmt}"
        if label in rows:
            label = f"{label} ({model_dir})"
        if args.saved:
            rows[label] = read_results(model_dir)
            continue
        lengths = given_lengths or list(range(1, task.digits + 4))
        per_length = opts.per_length or meta.get("test_per_length", 200)
        seed = meta.get("test_seed", 1234) if opts.seed is None else opts.seed
        rows[label] = evaluate_task(model, tok, task, make_test_set(task.op, lengths, per_length, seed=seed))
    print(format_table(rows))
    print(f"heatmap: {plot_heatmap(rows, args.png)}")
    return 0
