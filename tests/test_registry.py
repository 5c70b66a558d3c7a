"""The one table of model families: names, classes, the old `transformer` alias (with a notice) everywhere."""

from __future__ import annotations

import json

import pytest

from mulfree.cli import build_parser, main
from mulfree.errors import ConfigError
from mulfree.models import registry
from mulfree.models.io import build_model

NOTICE = "note: model family 'transformer' is now 'transformerpp'"
TINY = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64}


@pytest.mark.parametrize("name", registry.NAMES)
def test_each_family_builds_and_names_itself(name):
    family = registry.get(name)
    assert family.config_cls.model_type == family.name
    model = family.model_cls(family.config_cls.from_preset("tiny", **TINY))
    assert registry.find(model) is family and registry.find(model.config.to_dict()) is family
    assert type(build_model(model.config.to_dict())) is family.model_cls


def test_alias_is_accepted_with_a_one_line_notice(capsys):
    assert registry.get("transformer") is registry.get("transformerpp")
    assert capsys.readouterr().err.strip() == NOTICE
    assert registry.canonical("mmfree") == "mmfree" and capsys.readouterr().err == ""
    cfg = registry.get("transformerpp").config_cls.from_dict({"model_type": "transformer", **TINY})
    assert cfg.model_type == "transformerpp" and NOTICE in capsys.readouterr().err
    assert registry.find({"model_type": "llama"}) is None


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model family 'gpt'; use mmfree or transformerpp"):
        registry.get("gpt")


def test_cli_accepts_the_alias(tmp_path, capsys):
    args = build_parser().parse_args(["train", "--model", "transformer", "--out", str(tmp_path)])
    assert args.model == "transformerpp" and NOTICE in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model", "gpt", "--out", str(tmp_path)])
    assert "invalid choice: 'gpt'" in capsys.readouterr().err
    assert main(["energy", "--model", "transformer:370m", "--arith", "fp32", "--json", str(tmp_path / "e.json")]) == 0
    assert NOTICE in capsys.readouterr().err
    assert json.loads((tmp_path / "e.json").read_text())["rows"][0]["family"] == "transformerpp"
