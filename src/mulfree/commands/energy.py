"""`mulfree energy`: arithmetic energy per token of a model under each arithmetic (45 nm op figures)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mulfree.commands.flags import add_flags, from_args
from mulfree.energy import ARITHS
from mulfree.errors import ConfigError

MAX_CONTEXT = 1 << 30


@dataclass
class EnergyConfig:
    """What `mulfree energy` counts, besides the model."""

    arith: str | None = field(default=None, metadata={"help": "one arithmetic (default: all of them)",
                                                      "choices": ARITHS})
    context: int = field(default=2048, metadata={"help": "position of the counted token (attention length)"})
    shiftadd_bits: int = field(default=3, metadata={"help": "binary planes per weight for shiftadd"})

    def __post_init__(self) -> None:
        if not 1 <= self.context <= MAX_CONTEXT:
            raise ConfigError(f"--context {self.context} is out of range", f"use 1..{MAX_CONTEXT}")
        if not 1 <= self.shiftadd_bits <= 8:
            raise ConfigError(f"--shiftadd-bits {self.shiftadd_bits} is out of range", "use 1..8")


def resolve_config(spec: str) -> dict[str, Any]:
    """`FAMILY:PRESET` (mmfree:370m, transformerpp:1.3b), a model dir with config.json, or a config .json."""
    from mulfree.models import registry, schema

    if ":" in spec and not Path(spec).exists():
        family, preset = spec.split(":", 1)
        return registry.get(family).config_cls.from_preset(preset).to_dict()
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no model config at {spec!r}", "pass FAMILY:PRESET (e.g. mmfree:370m), a model dir or a config .json")
    cfg = schema.require_object(schema.read_json(path, "the config"), str(path))
    if registry.find(cfg) is not None:
        return schema.model_config(cfg, str(path)).to_dict()  # validated, with derived fields filled in
    schema.check_hf_config(cfg, str(path))  # a Hugging Face config: only counted, never allocated
    return cfg


def run(args: argparse.Namespace) -> int:
    from mulfree.energy import count_ops

    opts = from_args(EnergyConfig, args)
    if args.json:
        from mulfree.atomic import prepare_file

        prepare_file(args.json, "--json", kind="json")
    cfg = resolve_config(args.model)
    ariths = [opts.arith] if opts.arith else list(ARITHS)
    try:
        rows = [count_ops(cfg, a, context=opts.context, shiftadd_bits=opts.shiftadd_bits) for a in ariths]
    except ValueError as exc:
        raise ConfigError(str(exc), "pass a config with the standard Hugging Face shape fields") from exc
    base = count_ops(cfg, "fp32", context=opts.context)["energy_pj"]["total"]
    print(f"{args.model} ({rows[0]['family']}), per token at context {opts.context}; arithmetic only, 45 nm (Horowitz 2014)")
    print(f"{'arith':<9} {'weight MACs':>12} {'attn MACs':>11} {'weights µJ':>11} {'other µJ':>9} {'total µJ':>9} {'vs fp32':>8}")
    for r in rows:
        e = r["energy_pj"]
        print(f"{r['arith']:<9} {r['macs'].get('weights', 0):>12,} {r['macs'].get('attention', 0):>11,} "
              f"{e['weights'] / 1e6:>11.2f} {e['other'] / 1e6:>9.2f} {e['total'] / 1e6:>9.2f} {e['total'] / base:>8.3f}")
    if args.json:
        from mulfree.atomic import atomic_write_json

        atomic_write_json(Path(args.json), {"model": args.model, "rows": rows})
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("energy", help="count ops per token under an arithmetic and convert to energy (45 nm)",
                       description="Multiplies/additions per token by number format and their energy (Horowitz, ISSCC 2014).")
    p.add_argument("--model", required=True, help="FAMILY:PRESET (mmfree:370m, transformerpp:1.3b), a model dir or a config .json")
    add_flags(p, EnergyConfig)
    p.add_argument("--json", help="also write the full counts to this JSON file")
    p.set_defaults(func=run)
