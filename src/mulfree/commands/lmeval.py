"""`mulfree lm-eval`: zero-shot evaluation through lm-evaluation-harness (offline tasks by default)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from mulfree.commands.flags import MODEL_HELP, add_flags, from_args
from mulfree.errors import ConfigError


@dataclass
class LMEvalConfig:
    """Which lm-eval tasks `mulfree lm-eval` runs, and how."""

    tasks: str = field(default="mulfree_shakespeare_cloze,mulfree_shakespeare_mc,mulfree_shakespeare_bpb",
                       metadata={"help": "comma-separated task names"})
    limit: int | None = field(default=None, metadata={"help": "examples per task (default: all)"})
    max_length: int = field(default=1024, metadata={"help": "longest context scored at once"})
    seed: int = field(default=0, metadata={"help": "seed for building the offline tasks"})

    def __post_init__(self) -> None:
        if self.limit is not None and not 1 <= self.limit <= 1 << 31:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}", "pass a positive number of examples")
        if not 2 <= self.max_length <= 1 << 20:
            raise ConfigError(f"--max-length {self.max_length} is out of range", "use 2..2^20 tokens")
        if not 0 <= self.seed < 1 << 63:
            raise ConfigError(f"--seed {self.seed} is out of range", "use 0..2^63-1")
        if not self.task_list():
            raise ConfigError("--tasks names no task", "e.g. --tasks mulfree_shakespeare_mc")

    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm-eval",
        help="evaluate a model with lm-evaluation-harness",
        description="Runs lm-eval tasks on a model (any `mulfree generate` takes; packed dirs on the packed "
        "engine). The mulfree_* tasks are built offline from the held-out plays of the bundled corpus; Hub tasks "
        "(arc_easy, ...) need a local datasets cache.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    add_flags(p, LMEvalConfig)
    p.add_argument("--out", default=None, help="write results JSON here")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from mulfree.atomic import atomic_write_json, make_dir, prepare_file
    from mulfree.data.text import load_corpus
    from mulfree.lmeval import build_offline_tasks, cached_requests, request_cache, run_lm_eval
    from mulfree.models.pretrained import cache_dir
    from mulfree.models.resolve import resolve

    cfg = from_args(LMEvalConfig, args)
    if args.out:
        prepare_file(args.out, "--out", kind="json")
    loaded = resolve(args.model, engine="torch", scoring=True)  # whole contexts: the torch interface
    task_dir = build_offline_tasks(cache_dir() / "lm_eval_tasks" / f"seed{cfg.seed}", load_corpus().val_text, seed=cfg.seed)
    db = request_cache(args.model, cfg.max_length, loaded.eos_token_id)
    make_dir(db.parent)
    if kept := cached_requests(db):
        print(f"continuing an interrupted run: {kept} requests scored before come from {db}", file=sys.stderr)
    try:
        results = run_lm_eval(loaded.model, loaded.tokenizer, cfg.task_list(), task_dir, cfg.limit, cfg.max_length,
                              loaded.eos_token_id, cache=db)
    except BaseException:
        if kept := cached_requests(db):
            print(f"\nthe {kept} requests scored so far are kept in {db}; the same command continues from there",
                  file=sys.stderr)
        else:
            db.unlink(missing_ok=True)  # nothing to continue from: leave no file behind
        raise
    for task, metrics in results.items():
        print(task + "  " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    if args.out:
        atomic_write_json(Path(args.out), results)
    db.unlink(missing_ok=True)  # done: nothing to continue
    return 0
