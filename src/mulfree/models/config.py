"""Config machinery shared by our model families: dataclass ↔ dict/JSON, size presets, validation.

Field names follow Hugging Face (`vocab_size`, `hidden_size`, `num_hidden_layers`, ...). The paper sizes
(370m, 1.3b, 2.7b) are the MatMul-free LM's; `tiny` and `small` are CPU-scale members of the same family.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from mulfree.errors import ConfigError

# name -> (hidden_size, num_hidden_layers, vocab_size)
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (256, 4, 4096),
    "small": (512, 8, 8192),
    "370m": (1024, 24, 32000),
    "1.3b": (2048, 24, 32000),
    "2.7b": (2560, 32, 32000),
}

C = TypeVar("C", bound="LMConfig")


@dataclasses.dataclass
class LMConfig:
    """Fields every mulfree language model has; subclasses add their own and set `model_type`."""

    model_type = "base"
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    intermediate_size: int | None = None  # None: the official GLU rule from hidden_size
    hidden_ratio: int = 4
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048  # longest prompt + generation accepted (MMfree has no positions)
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        from mulfree.models.schema import check_model_fields
        from mulfree.nn.glu import glu_intermediate_size

        check_model_fields(self)  # types, ranges, cross-field rules: before anything is derived from them
        if self.intermediate_size is None:
            self.intermediate_size = glu_intermediate_size(self.hidden_size, self.hidden_ratio)
            check_model_fields(self)

    @classmethod
    def from_preset(cls: type[C], name: str, **overrides: Any) -> C:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}", f"use one of {', '.join(PRESETS)} or a config .json file")
        d, layers, vocab = PRESETS[name]
        fields = {"hidden_size": d, "num_hidden_layers": layers, "vocab_size": vocab, **cls.preset_extras(d)}
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def preset_extras(cls, hidden_size: int) -> dict[str, Any]:
        """Family-specific fields derived from a preset's width."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        from mulfree.models.registry import canonical

        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, not {type(data).__name__}", "fix the config")
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)
        if not isinstance(model_type, str):
            raise ConfigError(f"config field 'model_type' must be a string, got {model_type!r:.40}", "fix the config")
        model_type = canonical(model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"config is for model_type {model_type!r}, not {cls.model_type!r}", "load it with the matching model class")
        names = {f.name for f in dataclasses.fields(cls)}
        if "transformers_version" in data:  # written by save_pretrained: drop transformers' bookkeeping
            data = {k: v for k, v in data.items() if k in names}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}", f"valid fields: {', '.join(sorted(names))}")
        return cls(**data)

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist", "pass a preset name or an existing .json file") from exc
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ConfigError(f"config file {path} is not valid JSON ({str(exc)[:80]})", "fix the file") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc.what}", exc.hint) from None

    @classmethod
    def from_name_or_file(cls: type[C], spec: str, **overrides: Any) -> C:
        """A preset name (`tiny`, `370m`, ...) or the path of a config .json; overrides apply on top."""
        if spec.endswith(".json"):
            cfg = cls.from_json(spec)
            return dataclasses.replace(cfg, **overrides) if overrides else cfg
        return cls.from_preset(spec, **overrides)
