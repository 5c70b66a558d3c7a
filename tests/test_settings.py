"""The one field checker of settings dataclasses (`mulfree.settings.check_fields`) and its use by every
generated flag (`commands.flags.from_args`): types, finiteness, bounds from metadata, int64 and seeds."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from mulfree.commands.flags import add_flags, from_args
from mulfree.errors import ConfigError
from mulfree.settings import ArithConfig, GenerationConfig, PerplexityConfig, check_fields


@dataclass
class Knobs:  # no __post_init__: from_args alone must check it
    rate: float = field(default=0.5, metadata={"gt": 0, "max": 1})
    count: int = field(default=2, metadata={"min": 1})
    raw: float = field(default=0.0, metadata={"finite": False})
    seed: int = 0
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = field(default=(1,), metadata={"min": 1})
    name: str | None = None


def _parse(*argv: str) -> Knobs:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, Knobs)
    return from_args(Knobs, parser.parse_args(list(argv)))


@pytest.mark.parametrize("argv, message", [
    (("--rate", "nan"), "--rate must be a finite number, got nan; pass a finite --rate"),
    (("--rate", "0"), "--rate must be > 0, got 0.0; pass a value in (0, 1]"),
    (("--rate", "1.5"), "--rate must be <= 1, got 1.5; pass a value in (0, 1]"),
    (("--count", "0"), "--count must be positive, got 0; pass a positive --count"),
    (("--count", str(2**63)), "--count must be <= 9223372036854775807"),
    (("--seed", "-1"), "--seed must be >= 0, got -1; pass a seed in [0, 2**63 - 1]"),
    (("--seed", str(2**64)), "--seed must be <= 9223372036854775807"),
    (("--sizes", "3", "0"), "--sizes must be positive, got 0"),
])
def test_generated_flags_are_checked_in_one_place(argv, message):
    with pytest.raises(ConfigError) as exc:
        _parse(*argv)
    assert str(exc.value) == message or str(exc.value).startswith(message)


def test_valid_values_and_opt_outs_pass():
    assert _parse("--raw", "inf", "--rate", "1", "--seed", str(2**63 - 1)).raw == float("inf")
    assert _parse().name is None


@pytest.mark.parametrize("values, message", [
    ({"rate": "fast"}, "--rate must be a number, got 'fast'"),
    ({"rate": 10**400}, "--rate must be a finite number"),
    ({"count": 2.0}, "--count must be an integer, got 2.0"),
    ({"count": True}, "--count must be an integer, got True"),
    ({"mode": "c"}, "--mode must be one of ['a', 'b']"),
    ({"sizes": 3}, "--sizes must be a list"),
    ({"name": 5}, "--name must be a string"),
])
def test_values_from_json_are_type_checked(values, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_fields(Knobs(**values))


def test_settings_classes_check_themselves():
    with pytest.raises(ConfigError, match="--top-p must be a finite number"):
        GenerationConfig(top_p=float("nan"))
    with pytest.raises(ConfigError, match="--window must be >= 2"):
        PerplexityConfig(window=1)
    with pytest.raises(ConfigError, match="--width must be positive"):
        ArithConfig(width=-1)
