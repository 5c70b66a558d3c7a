"""`mulfree convert-official`: official matmulfreellm checkpoint dir → mulfree model dir."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-official",
        help="convert an official matmulfreellm (hgrn_bit) checkpoint into a mulfree model dir",
        description="Read config.json + weights of an official HGRNBit checkpoint (e.g. a local copy of "
        "ridger/MMfreeLM-2.7B) and write config.json, model.safetensors and the tokenizer files to --out. "
        "The result computes what the official code computes (BitLinear norms at eps 1e-6, official padding rule).",
    )
    p.add_argument("--src", required=True, help="official checkpoint directory")
    p.add_argument("--out", required=True, help="output model directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out (kept until the new one is complete)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mulfree.models.official import convert_official

    model = convert_official(args.src, args.out, overwrite=args.overwrite)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.src} -> {args.out} ({n / 1e6:.1f}M parameters, {model.config.num_hidden_layers} layers)")
    return 0
