"""CLI flags generated from config dataclasses (`mulfree.commands.flags`), and the commands built on them."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from mulfree.cli import build_parser, main
from mulfree.commands.flags import add_flags, from_args
from mulfree.settings import GenerationConfig, TrainConfig


@dataclass
class Example:
    count: int = field(default=3, metadata={"help": "how many"})
    scale: float | None = None
    mode: Literal["fast", "exact"] = "fast"
    verbose: bool = False
    progress: bool = field(default=True, metadata={"help": "no progress bar"})
    sizes: tuple[int, ...] = (1, 2)
    sequential: bool = field(default=True, metadata={"negatable": True})
    name: str = field(default="x", metadata={"flag": "--label"})
    files: list[str] | None = field(default=None, metadata={"nargs": "*"})


def _parser(**kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, Example, **kw)
    return parser


def test_one_flag_per_field_typed_from_the_annotation():
    cfg = from_args(Example, _parser().parse_args(
        ["--count", "5", "--scale", "0.5", "--mode", "exact", "--verbose", "--no-progress", "--sizes", "4", "5", "6",
         "--no-sequential", "--label", "y", "--files"]))
    assert cfg == Example(5, 0.5, "exact", True, False, (4, 5, 6), False, "y", [])
    assert from_args(Example, _parser().parse_args([])) == Example()
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(["--mode", "slow"])
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(["--count", "many"])


def test_help_shows_the_effective_default():
    text = _parser(defaults={"count": 9}).format_help()
    assert "how many (default: 9)" in text and "default: 1 2" in text and "--sequential, --no-sequential" in text
    assert from_args(Example, _parser(defaults={"count": 9}).parse_args([])).count == 9


def test_only_skip_required_and_unknown_names():
    parser = _parser(only=("count", "mode"), skip=("mode",), required=("count",))
    assert [a.dest for a in parser._actions if a.dest != "help"] == ["count"]
    with pytest.raises(SystemExit):  # a missing required flag exits even with exit_on_error=False
        parser.parse_args([])
    with pytest.raises(ValueError, match="no fields"):
        _parser(only=("nope",))


def test_from_args_layers_flags_over_a_base_and_overrides():
    args = _parser().parse_args(["--count", "7"])
    assert from_args(Example, args, base=Example(count=1, mode="exact")) == Example(count=7, mode="exact")
    assert from_args(Example, args, base={"scale": 2.0}, verbose=True) == Example(count=7, scale=2.0, verbose=True)
    train = from_args(TrainConfig, argparse.Namespace(steps=None, lr=None), base={"steps": 5, "seed": 3})
    assert (train.steps, train.seed, train.lr) == (5, 3, TrainConfig().lr)


def test_train_exposes_every_train_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        flag = f"--no-{f.name}" if f.default is True else f"--{f.name}"
        assert flag.replace("_", "-") in text


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "m", "--prompt", "x", "--top-k", "-1"], "--top-k must be >= 0"),
    (["eval", "--model", "m", "--window", "1"], "--window must be >= 2"),
    (["serve", "--model", "m", "--port", "0"], "--port in 1..65535"),
    (["demo", "--layers", "0"], "--layers must be positive"),
    (["train", "--out", "o", "--steps", "0"], "steps must be positive"),
])
def test_settings_checks_are_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["eval", "--model", "m"], ["energy", "--model", "mmfree:tiny"],
                                     ["pack", "--model", "m", "--out", "o"]])
def test_seed_is_gone_where_it_changed_nothing(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(command + ["--seed", "1"])
    assert exc.value.code == 2 and "unrecognized arguments: --seed" in capsys.readouterr().err


def test_generation_config_defaults_match_the_cli():
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p"])
    assert from_args(GenerationConfig, args) == GenerationConfig(max_new_tokens=100, temperature=0.8, seed=0)


def test_offline_setup_keeps_a_users_choice(monkeypatch):
    import os

    from mulfree import offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    offline.setup()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "0"


def test_openmp_waits_passively_unless_the_user_chose_how():
    from mulfree.cli import set_openmp_waiting

    for given, expected in [({}, {"OMP_WAIT_POLICY": "PASSIVE"}),
                            ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),
                            ({"GOMP_SPINCOUNT": "3000"}, {"GOMP_SPINCOUNT": "3000"})]:
        env = dict(given)
        set_openmp_waiting(env)
        assert env == expected
