"""`mulfree pack`: MMfree model dir (or a packed dir) -> packed ternary dir for the CPU engine, format mulfree-t2
(2 bits per weight) or mulfree-t1 (1.6 bits per weight)."""

from __future__ import annotations

import argparse

FORMAT_CHOICES = ("t2", "t1", "t1.6")  # t1.6 is another name of t1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="pack an MMfree model into 2-bit or 1.6-bit ternary weights for the CPU engine",
        description="Ternarize every BitLinear of an MMfree model dir (keeping each weight's trained scale), "
        "pack the trits 4 per byte (--format t2: mulfree-t2) or 5 per byte (--format t1: mulfree-t1), see "
        "docs/packed.md, and write config.json, model.safetensors and the tokenizer to --out. A packed dir is "
        "repacked into --format (the same trits and scales). Run it with `mulfree generate --engine packed`.",
    )
    p.add_argument("--model", required=True, help="MMfree model dir (config.json + model.safetensors), packed "
                   "dir, or a training run (its latest checkpoint while it has no final model) or one of its "
                   "ckpt-<step> dirs")
    p.add_argument("--out", required=True, help="output dir for the packed model")
    p.add_argument("--format", default="t2", choices=FORMAT_CHOICES,
                   help="t2: 2 bits per weight (default); t1 (or t1.6): 1.6 bits per weight, five trits per byte")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out dir (kept until the new one is complete)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from mulfree.atomic import atomic_dir, check_not_inside, prepare_output
    from mulfree.checkpoint import checkpoint_model
    from mulfree.infer.engine import PackedModel
    from mulfree.ops.pack import packed_format

    check_not_inside(args.model, args.out)
    fmt = packed_format(args.format)
    prepare_output(args.out, "packed model", args.overwrite)  # before any work
    found = checkpoint_model(Path(args.model))
    if found is not None:  # a training run that has not finished, or one of its checkpoints
        print(f"note: packing the training checkpoint {found[2]}", file=sys.stderr)
        packed = PackedModel.from_model(found[0], found[1], backend="reference", fmt=fmt.name)
    else:
        packed = PackedModel.load(args.model, backend="reference", fmt=fmt.name)
    with atomic_dir(args.out, args.overwrite, "packed model") as tmp:
        packed.save(tmp)
    size = (Path(args.out) / "model.safetensors").stat().st_size
    print(f"packed {args.model} -> {args.out} ({size / 2**20:.1f} MiB, format {fmt.name})")
    return 0
