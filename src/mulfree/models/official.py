"""Import of official matmulfreellm checkpoints (`model_type: hgrn_bit`, e.g. ridger/MMfreeLM-2.7B).

Our parameter names are the official ones, so conversion maps the config, casts the bf16 latent
weights to fp32 and checks that every tensor is accounted for. The converted config reproduces the
official forward: BitLinear norms at eps 1e-6 (the fused kernel's fixed value) while the block norms and
g_norm use the config's `rms_norm_eps`, the official padding rule (mask on the input gate only), and any
`num_heads` (heads only reshape the element-wise recurrence). Settings the official code asserts against
or never trained with (short conv, state expansion, tied embeddings) are rejected with a clear error.
Sizes are checked against the tensors before a model is built, so a config that lies allocates nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from mulfree.atomic import atomic_dir, check_not_inside, prepare_output
from mulfree.errors import CheckpointError, ConfigError
from mulfree.models.io import load_state, save_model
from mulfree.models.mmfree import OFFICIAL_BITLINEAR_EPS, MMFreeConfig, MMFreeForCausalLM
from mulfree.models.schema import read_json

OFFICIAL_MODEL_TYPE = "hgrn_bit"
# Tokenizer files of the official repos (Mistral's sentencepiece model and its HF forms).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def _positive_int(cfg: dict[str, Any], key: str, default: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"official config field {key} must be a positive integer, got {value!r}",
                              "fix config.json or re-download the checkpoint")
    return value


def config_from_official(cfg: dict[str, Any]) -> MMFreeConfig:
    """Map an official `HGRNBitConfig` dict to ours (field names are mostly shared)."""
    if not isinstance(cfg, dict) or cfg.get("model_type") != OFFICIAL_MODEL_TYPE:
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise CheckpointError(
            f"config model_type is {got!r}, not {OFFICIAL_MODEL_TYPE!r}",
            "pass the directory of an official matmulfreellm (HGRNBit) checkpoint",
        )
    unsupported = {
        "attn_mode": ("fused_recurrent", "attention mode"),
        "use_short_conv": (False, "short convolutions"),
        "expand_ratio": (1, "state expansion"),
        "tie_word_embeddings": (False, "tied embeddings"),
    }
    for key, (want, what) in unsupported.items():
        if cfg.get(key, want) != want:
            raise CheckpointError(f"official config uses {what} ({key}={cfg[key]!r})", "only the released HGRNBit settings are supported")
    eps = cfg.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise CheckpointError(f"official config field rms_norm_eps must be a number in (0, 1), got {eps!r}",
                              "fix config.json (the official default is 1e-6)")
    hidden = _positive_int(cfg, "hidden_size", 2048)
    heads = _positive_int(cfg, "num_heads", 1)
    if hidden % heads:
        raise CheckpointError(f"official config: hidden_size {hidden} is not divisible by num_heads {heads}",
                              "fix config.json (the official layer asserts this)")
    try:
        return MMFreeConfig(
            vocab_size=cfg.get("vocab_size", 32000),
            hidden_size=hidden,
            num_hidden_layers=cfg.get("num_hidden_layers", 24),
            intermediate_size=cfg.get("intermediate_size"),
            hidden_ratio=cfg.get("hidden_ratio", 4) or 4,
            rms_norm_eps=eps,
            bitlinear_eps=OFFICIAL_BITLINEAR_EPS,
            mask_mode="official",
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            use_lower_bound=cfg.get("use_lower_bound", True),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=cfg.get("eos_token_id", 2),
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"official config: {getattr(exc, 'what', exc)}", "fix config.json or re-download the checkpoint") from exc


def _official_weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files; with a shard index, every shard it names must be present."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{index} is not a valid shard index ({exc})", "re-download the checkpoint") from exc
            missing = [n for n in names if not (src / n).is_file()]
            if missing:
                raise CheckpointError(f"{src}: shard {missing[0]} named in {index_name} is missing", "re-download the checkpoint")
            return [src / n for n in names]
    for pattern in ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin"):
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"no weights in {src}", "expected model*.safetensors or pytorch_model*.bin files")


def read_official_state(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of an official checkpoint (sharded or not) as fp32."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _official_weight_files(src):
        try:
            with warnings.catch_warnings():  # torch.load warns about pickle protocols of files it then reads or refuses
                warnings.simplefilter("ignore")
                part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read {f} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                                  "re-download the checkpoint") from exc
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"{f} does not hold a dict of tensors", "re-download the checkpoint")
        state.update(part)
    return {k: v.float() for k, v in state.items()}


def check_sizes(config: MMFreeConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Compare the config's sizes with the tensors before anything of the config's size is allocated."""
    hint = "check that config.json belongs to these weights"
    emb = state.get("model.embeddings.weight")
    if emb is None:
        raise CheckpointError(f"{source} has no model.embeddings.weight", hint)
    if tuple(emb.shape) != (config.vocab_size, config.hidden_size):
        raise CheckpointError(f"{source}: model.embeddings.weight has shape {tuple(emb.shape)}, the config says "
                              f"vocab_size {config.vocab_size} x hidden_size {config.hidden_size}", hint)
    layers = {int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))}
    if layers != set(range(config.num_hidden_layers)):
        raise CheckpointError(f"{source} holds {len(layers)} layers, the config says num_hidden_layers "
                              f"{config.num_hidden_layers}", hint)
    gate = state.get("model.layers.0.mlp.gate_proj.weight")
    if gate is not None and tuple(gate.shape) != (2 * config.intermediate_size, config.hidden_size):
        raise CheckpointError(f"{source}: model.layers.0.mlp.gate_proj.weight has shape {tuple(gate.shape)}, the config "
                              f"expects {(2 * config.intermediate_size, config.hidden_size)}", hint)


def load_official(src: str | Path) -> MMFreeForCausalLM:
    """The mulfree model of an official HGRNBit checkpoint dir (eval mode)."""
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing", "pass the directory of an official checkpoint")
    raw = read_json(cfg_path, hint="re-download the checkpoint")
    config = config_from_official(raw)
    state = read_official_state(src)
    check_sizes(config, state, str(src))
    with torch.device("meta"):
        model = MMFreeForCausalLM(config)
    model = model.to_empty(device="cpu")
    load_state(model, state, str(src))
    return model.eval()


def convert_official(src: str | Path, out: str | Path, overwrite: bool = False) -> MMFreeForCausalLM:
    """Convert an official HGRNBit checkpoint dir into a mulfree model dir; returns the model.

    `out` must be absent or empty unless `overwrite`; it is written whole or not at all.
    """
    src = Path(src)
    check_not_inside(src, out, "the --src it reads")
    prepare_output(out, "model", overwrite)
    model = load_official(src)
    with atomic_dir(out, overwrite, "model") as tmp:
        save_model(model, tmp)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    return model
