"""The one table of mulfree model families: name -> config class, model class, HF model type.

A family's name is its CLI name (`--model mmfree`, `energy --model transformerpp:1.3b`), the
`model_type` stored in `config.json` and its Hugging Face model type. Classes are imported on first
use, so the CLI can list the names without importing torch. Old names stay accepted through
`ALIASES`, with a one-line notice on stderr.

Example:
    family = get("transformerpp")
    model = family.model_cls(family.config_cls.from_preset("tiny"))
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mulfree.errors import ConfigError


@dataclass(frozen=True)
class ModelFamily:
    """One model family; `name` is also its `model_type` in config.json and for Hugging Face."""

    name: str
    label: str  # for tables and plots
    module: str  # defines the config and model classes
    config_class: str
    model_class: str
    recurrent: bool  # O(1) state per token (MLGRU) rather than a KV cache

    @property
    def config_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_class)

    @property
    def model_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.model_class)


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("mmfree", "MMfree", "mulfree.models.mmfree", "MMFreeConfig", "MMFreeForCausalLM",
                    recurrent=True),
        ModelFamily("transformerpp", "Transformer++", "mulfree.models.transformer", "TransformerConfig",
                    "TransformerForCausalLM", recurrent=False),
    )
}
# Old name -> family name; accepted everywhere with a notice.
ALIASES: dict[str, str] = {"transformer": "transformerpp"}
NAMES: tuple[str, ...] = tuple(FAMILIES)


def canonical(name: str) -> str:
    """The family name for `name`, printing a notice for an old alias; other strings pass unchanged
    (so argparse `type=canonical, choices=NAMES` reports unknown names as invalid choices)."""
    if name in ALIASES:
        new = ALIASES[name]
        print(f"note: model family '{name}' is now '{new}'", file=sys.stderr)
        return new
    return name


def get(name: str) -> ModelFamily:
    """The family called `name` (or an old alias of it); ConfigError for an unknown name."""
    family = FAMILIES.get(canonical(name))
    if family is None:
        raise ConfigError(f"unknown model family {name!r}", f"use {' or '.join(NAMES)}")
    return family


def find(config: Any) -> ModelFamily | None:
    """The family of a config (dict, config object, or model with `.config`), None for other models
    (e.g. a Hugging Face Llama)."""
    config = getattr(config, "config", config)
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if not isinstance(model_type, str) or (model_type not in FAMILIES and model_type not in ALIASES):
        return None
    return FAMILIES[canonical(model_type)]
