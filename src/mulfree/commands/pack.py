"""`mulfree pack`: MMfree model dir -> packed 2-bit ternary dir for the CPU engine (format mulfree-t2)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="pack an MMfree model into 2-bit ternary weights for the CPU engine",
        description="Ternarize every BitLinear of an MMfree model dir (keeping each weight's trained scale), "
        "pack the trits 4 per byte (format mulfree-t2, see docs/packed.md) and write config.json, "
        "model.safetensors and the tokenizer to --out. Run it with `mulfree generate --engine packed`.",
    )
    p.add_argument("--model", required=True, help="MMfree model dir (config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="output dir for the packed model")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out dir (kept until the new one is complete)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mulfree.atomic import atomic_dir, prepare_output
    from mulfree.errors import CheckpointError
    from mulfree.infer.engine import PackedModel

    if Path(args.out).resolve() == Path(args.model).resolve():
        raise CheckpointError("--out is the same dir as --model", "write the packed model to a new dir")
    prepare_output(args.out, "packed model", args.overwrite)  # before any work
    packed = PackedModel.load(args.model, backend="reference")
    with atomic_dir(args.out, args.overwrite, "packed model") as tmp:
        packed.save(tmp)
    size = (Path(args.out) / "model.safetensors").stat().st_size
    print(f"packed {args.model} -> {args.out} ({size / 2**20:.1f} MiB, format mulfree-t2)")
    return 0
