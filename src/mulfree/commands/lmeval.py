"""`mulfree lm-eval`: zero-shot evaluation through lm-evaluation-harness (offline tasks by default)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm-eval",
        help="evaluate a model with lm-evaluation-harness",
        description="Runs lm-eval tasks on a mulfree model dir. The mulfree_* tasks are built offline from the "
        "held-out plays of the bundled corpus; Hub tasks (arc_easy, ...) need a local datasets cache.",
    )
    p.add_argument("--model", required=True, help="model dir written by `mulfree train`")
    p.add_argument("--tasks", default="mulfree_shakespeare_cloze,mulfree_shakespeare_mc,mulfree_shakespeare_bpb",
                   help="comma-separated task names")
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument("--max-length", type=int, default=1024, help="longest context scored at once")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--seed", type=int, default=0, help="seed for building the offline tasks")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from mulfree.data.text import load_corpus
    from mulfree.errors import CheckpointError, MulfreeError
    from mulfree.lmeval import build_offline_tasks, run_lm_eval
    from mulfree.atomic import atomic_write_text
    from mulfree.models.io import load_model
    from mulfree.models.pretrained import cache_dir

    if args.limit is not None and args.limit < 1:
        raise MulfreeError(f"--limit must be >= 1, got {args.limit}", "pass a positive number of examples")
    model, tok = load_model(args.model)
    if tok is None:
        raise CheckpointError(f"{args.model} has no tokenizer.json", "evaluate a dir written by `mulfree train`")
    task_dir = build_offline_tasks(cache_dir() / "lm_eval_tasks" / f"seed{args.seed}", load_corpus().val_text, seed=args.seed)
    results = run_lm_eval(model, tok, [t.strip() for t in args.tasks.split(",") if t.strip()], task_dir, args.limit, args.max_length)
    for task, metrics in results.items():
        print(task + "  " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(results, indent=2) + "\n")
    return 0
