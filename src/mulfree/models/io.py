"""Model directories: `config.json` (with `model_type`), `model.safetensors`, optional `tokenizer.json`.

Every file is written to a temporary name and renamed into place, so an interrupted save never leaves
a half-written model; loading checks the model type, the tensor names and the shapes and says which
one is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mulfree.atomic import atomic_write, atomic_write_text
from mulfree.data.text import load_tokenizer
from mulfree.errors import CheckpointError, ConfigError
from mulfree.models import registry

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


def build_model(config_dict: dict[str, Any]) -> nn.Module:
    """Instantiate the model class named by `config_dict["model_type"]`."""
    family = registry.find(config_dict)
    if family is None:
        raise CheckpointError(f"unknown model_type {config_dict.get('model_type')!r} in config",
                              f"mulfree models are {', '.join(registry.NAMES)}")
    return family.model_cls(family.config_cls.from_dict(config_dict))


def save_model(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> None:
    """Write config, weights (safetensors, contiguous fp32/bf16 as trained) and the tokenizer."""
    out = Path(out_dir)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    if tokenizer is not None:
        atomic_write(out / TOKENIZER_NAME, lambda tmp: tokenizer.save(str(tmp)))
    atomic_write_text(out / CONFIG_NAME, json.dumps(model.config.to_dict(), indent=2) + "\n")


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_NAME
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model dir {model_dir} does not exist", "pass a dir written by `mulfree train`")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing", "pass a dir written by `mulfree train` or `save_model`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})", "the checkpoint is corrupt; re-save it") from exc


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning any reader failure into a CheckpointError."""
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights} ({exc})", "the checkpoint is corrupt or truncated; re-save it") from exc


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, naming missing, unexpected or mis-shaped tensors of `source`."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the {model.config.model_type} model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})",
            "check that config.json belongs to these weights",
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the config expects {tuple(expected[name].shape)}",
                "check that config.json belongs to these weights",
            )
    model.load_state_dict(state)


def load_model(model_dir: str | Path) -> tuple[nn.Module, Any]:
    """Load `(model, tokenizer or None)` from a dir written by `save_model`; the model is in eval mode."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    try:
        model = build_model(config)
    except ConfigError as exc:
        raise CheckpointError(f"{model_dir / CONFIG_NAME}: {exc.what}", exc.hint) from exc
    weights = model_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing", "pass a complete model dir")
    load_state(model, read_weights(weights), str(weights))
    model.eval()
    tokenizer = load_tokenizer(model_dir) if (model_dir / TOKENIZER_NAME).is_file() else None
    return model, tokenizer
