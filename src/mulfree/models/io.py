"""Model directories: `config.json` (with `model_type`), `model.safetensors`, optional `tokenizer.json`, and
`checksums.json` (xxh3-64 of each, `mulfree.integrity`).

Every file is written to a temporary name and renamed into place, so an interrupted save never leaves
a half-written model; loading validates the config (`models/schema.py`: types, ranges, the memory it needs),
verifies the checksums, checks the tensor names, shapes and dtypes and the tokenizer's ids, and says which
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

from mulfree import integrity
from mulfree.atomic import atomic_write, atomic_write_text
from mulfree.data.text import TOKENIZER_CONFIG_FILE, load_tokenizer, save_tokenizer
from mulfree.errors import CheckpointError
from mulfree.models import registry, schema

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


def build_model(config_dict: dict[str, Any], source: str = CONFIG_NAME) -> nn.Module:
    """Instantiate the model class named by `config_dict["model_type"]`, after validating the config and
    checking that the memory it needs is available."""
    config = schema.model_config(config_dict, source)
    schema.check_memory(schema.estimate_model_bytes(config), source)
    return registry.find(config).model_cls(config)


def save_model(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> None:
    """Write config, weights (safetensors, contiguous fp32/bf16 as trained), the tokenizer and their checksums."""
    out = Path(out_dir)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    names = [WEIGHTS_NAME, CONFIG_NAME]
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
        names += [TOKENIZER_NAME, TOKENIZER_CONFIG_FILE]
    atomic_write_text(out / CONFIG_NAME, json.dumps(model.config.to_dict(), indent=2) + "\n")
    integrity.write_manifest(out, names)


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """The JSON object of `model_dir/config.json`; a config of one of our families is validated too."""
    path = Path(model_dir) / CONFIG_NAME
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model dir {model_dir} does not exist", "pass a dir written by `mulfree train`")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing", "pass a dir written by `mulfree train` or `save_model`")
    config = schema.require_object(schema.read_json(path), str(path))
    if "format" not in config and registry.find(config) is not None:  # packed: validate_packed_config
        schema.model_config(config, str(path))
    return config


def read_weights(weights: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """Read a safetensors file (checked against its dir's checksums.json unless `verify` is False, i.e. done
    already), turning any reader failure into a CheckpointError."""
    if verify:
        integrity.verify(weights.parent, [weights.name])
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {weights} ({schema.first_line(exc)})", "the checkpoint is corrupt or truncated; re-save it") from None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, naming missing, unexpected, mis-shaped or non-finite tensors of `source`."""
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
        if expected[name].is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(f"{source}: {name} has dtype {tensor.dtype}, not a floating-point type",
                                  "re-save the model")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: {name} holds NaN or infinite values", "the checkpoint is corrupt; re-save it")
    model.load_state_dict(state)


def load_model(model_dir: str | Path) -> tuple[nn.Module, Any]:
    """Load `(model, tokenizer or None)` from a dir written by `save_model`; the model is in eval mode."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)  # validated before the checksums: a clear message for an invalid config
    weights = model_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing", "pass a complete model dir")
    has_tokenizer = (model_dir / TOKENIZER_NAME).is_file()
    integrity.verify(model_dir, [CONFIG_NAME, WEIGHTS_NAME] + [TOKENIZER_NAME] * has_tokenizer)
    return model_from(config, weights, model_dir, str(model_dir / CONFIG_NAME))


def model_from(config: dict[str, Any], weights: Path, tokenizer_dir: Path, source: str) -> tuple[nn.Module, Any]:
    """`(model in eval mode, tokenizer or None)` from a model config dict (named `source` in errors), a weights
    file whose checksum is verified already, and the `tokenizer.json` of `tokenizer_dir` if it has one (checked
    against the vocabulary). The memory for the model and the tensors read from disk is checked first."""
    need = schema.estimate_model_bytes(schema.model_config(config, source)) + weights.stat().st_size
    schema.check_memory(need, source)
    model = build_model(config, source)
    load_state(model, read_weights(weights, verify=False), str(weights))
    model.eval()
    tokenizer = None
    if (tokenizer_dir / TOKENIZER_NAME).is_file():
        tokenizer = load_tokenizer(tokenizer_dir)
        schema.check_tokenizer(tokenizer, model.config.vocab_size, str(tokenizer_dir / TOKENIZER_NAME))
    return model, tokenizer
