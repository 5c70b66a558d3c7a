"""CLI flags generated from config dataclasses, so a setting is declared once (the field) and every
command that exposes it gets the same name, type, choices and help.

Each field becomes `--kebab-name` (`dest` is the field name):
- `int`, `float`, `str` (and `T | None`): `type=T`; `Literal["a", "b"]`: `choices`;
  `tuple[T, ...]` / `list[T]`: `nargs="+"`, converted back to the field's container type.
- `bool`: default False gives `--name` (store_true); default True gives `--no-name` (store_false);
  `metadata={"negatable": True}` gives both (`--name/--no-name`).
- `metadata` keys: `help` (the help text; for a `--no-name` flag it describes turning the setting
  off), `flag` (another flag name), `choices`, `metavar`, `nargs` (e.g. "*" for a list that may be
  given empty), and the bounds `min` / `max` (inclusive), `gt` / `lt` (exclusive), `finite` (floats
  default True), `hint` (what to do when out of range).
- Every value `from_args` builds is checked by `mulfree.settings.check_fields`: its type, finiteness,
  bounds, int64 range (a `seed` field: [0, 2**63 - 1]), as a one-line ConfigError naming the flag.

Unless a command passes its own `defaults`, a flag's parsed value is None when it was not given, so
`from_args` can layer the command line over a base (a saved run, a JSON file) and the dataclass
defaults; the help text still shows the effective default.

Example:
    @dataclass
    class SampleConfig:
        temperature: float = field(default=0.8, metadata={"help": "0 = greedy"})

    add_flags(parser, SampleConfig)              # --temperature T   0 = greedy (default: 0.8)
    cfg = from_args(SampleConfig, parser.parse_args())
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from mulfree.settings import check_fields, unwrap_optional

MODEL_HELP = ("a model dir (`mulfree train`, `pack` or `quantize`, or a Hugging Face Llama / OPT / GPT-2 dir), "
              "a .gguf file, or 'smollm2'")  # every --model: what models.resolve takes

T = TypeVar("T")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _flag_kwargs(f: dataclasses.Field, tp: Any, default: Any) -> tuple[str, dict[str, Any]]:
    """(flag name, add_argument keyword arguments) for one field."""
    meta = f.metadata
    name = meta.get("flag", "--" + f.name.replace("_", "-"))
    kw: dict[str, Any] = {"dest": f.name}
    tp = unwrap_optional(tp)[0]
    origin = typing.get_origin(tp)
    if tp is bool:
        if meta.get("negatable"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["action"] = "store_false" if default else "store_true"
            if default and "flag" not in meta:
                name = "--no-" + f.name.replace("_", "-")
        return name, kw
    if origin is typing.Literal:
        kw["choices"] = list(typing.get_args(tp))
        kw["type"] = type(kw["choices"][0])
    elif origin in (tuple, list):
        item = typing.get_args(tp)[0] if typing.get_args(tp) else str
        kw["nargs"] = "+"
        kw["type"] = unwrap_optional(item)[0]
    elif tp in (int, float, str):
        kw["type"] = tp
    else:
        raise TypeError(f"{f.name}: no command-line form for the type {tp!r}")
    for key in ("choices", "metavar", "nargs"):
        if key in meta:
            kw[key] = list(meta[key]) if key == "choices" else meta[key]
    return name, kw


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    required: Iterable[str] = (),
) -> None:
    """Add one flag per field of the dataclass `cls` to `parser`, in field order.

    Args:
        only: expose just these fields (default: all init fields).
        skip: fields not to expose.
        defaults: command-specific defaults; these flags parse to the value instead of None.
        required: fields that must be given on the command line.
    Raises:
        ValueError: a name in only / skip / defaults / required is not a field of `cls`.
    """
    hints = typing.get_type_hints(cls)
    all_fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    defaults = dict(defaults or {})
    only_set = set(all_fields) if only is None else set(only)
    skip_set, required_set = set(skip), set(required)
    unknown = (only_set | skip_set | set(defaults) | required_set) - set(all_fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
    for fname, f in all_fields.items():
        if fname not in only_set or fname in skip_set:
            continue
        shown = defaults.get(fname, _field_default(f))
        if isinstance(shown, (tuple, list)):
            shown = " ".join(map(str, shown))
        flag, kw = _flag_kwargs(f, hints[fname], defaults.get(fname, _field_default(f)))
        text = f.metadata.get("help", "")
        if kw.get("action") == argparse.BooleanOptionalAction:
            text = f"{text} (default: {'on' if shown else 'off'})"
        elif "action" not in kw and shown is not None and fname not in required_set:
            text = f"{text} (default: {shown})" if text else f"default: {shown}"
        parser.add_argument(flag, help=text or None, default=defaults.get(fname),
                            required=fname in required_set, **kw)


def from_args(cls: type[T], args: argparse.Namespace, base: Any = None, **overrides: Any) -> T:
    """Build `cls` from parsed flags: `base` (a `cls` instance or a dict; default: the field defaults),
    then every flag of `cls` whose value is not None, then `overrides`.

    A dict base goes through `cls.from_dict` when `cls` has one (so unknown keys are reported).
    """
    hints = typing.get_type_hints(cls)
    if base is None:
        values: dict[str, Any] = {}
    elif isinstance(base, Mapping):
        values = dict(base)
    else:
        values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None) if f.init else None
        if value is None:
            continue
        container = typing.get_origin(unwrap_optional(hints[f.name])[0])
        values[f.name] = container(value) if container in (tuple, list) else value
    values.update(overrides)
    from_dict = getattr(cls, "from_dict", None)
    obj = from_dict(values) if isinstance(base, Mapping) and from_dict is not None else cls(**values)
    check_fields(obj)
    return obj
