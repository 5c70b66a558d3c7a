"""Import of official matmulfreellm checkpoints (`model_type: hgrn_bit`, e.g. ridger/MMfreeLM-2.7B).

Our parameter names are the official ones, so conversion maps the config, casts the bf16 latent
weights to fp32 and checks that every tensor is accounted for. Settings the official code asserts
or never trained with (short conv, several heads, state expansion) are rejected with a clear error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mulfree.errors import CheckpointError
from mulfree.atomic import atomic_write
from mulfree.models.io import load_state, save_model
from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM

OFFICIAL_MODEL_TYPE = "hgrn_bit"
# Tokenizer files of the official repos (Mistral's sentencepiece model and its HF forms).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def config_from_official(cfg: dict[str, Any]) -> MMFreeConfig:
    """Map an official `HGRNBitConfig` dict to ours (field names are mostly shared)."""
    if cfg.get("model_type") != OFFICIAL_MODEL_TYPE:
        raise CheckpointError(
            f"config model_type is {cfg.get('model_type')!r}, not {OFFICIAL_MODEL_TYPE!r}",
            "pass the directory of an official matmulfreellm (HGRNBit) checkpoint",
        )
    unsupported = {
        "use_short_conv": (False, "short convolutions"),
        "num_heads": (1, "multi-head state"),
        "expand_ratio": (1, "state expansion"),
        "tie_word_embeddings": (False, "tied embeddings"),
    }
    for key, (want, what) in unsupported.items():
        if cfg.get(key, want) != want:
            raise CheckpointError(f"official config uses {what} ({key}={cfg[key]!r})", "only the released HGRNBit settings are supported")
    return MMFreeConfig(
        vocab_size=cfg.get("vocab_size", 32000),
        hidden_size=cfg.get("hidden_size", 2048),
        num_hidden_layers=cfg.get("num_hidden_layers", 24),
        intermediate_size=cfg.get("intermediate_size"),
        hidden_ratio=cfg.get("hidden_ratio", 4) or 4,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        use_lower_bound=cfg.get("use_lower_bound", True),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
    )


def _official_weight_files(src: Path) -> list[Path]:
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
            part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any reader failure means a corrupt file
            raise CheckpointError(f"cannot read {f} ({exc})", "re-download the checkpoint") from exc
        state.update(part)
    return {k: v.float() for k, v in state.items()}


def convert_official(src: str | Path, out: str | Path) -> MMFreeForCausalLM:
    """Convert an official HGRNBit checkpoint dir into a mulfree model dir; returns the model."""
    src, out = Path(src), Path(out)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing", "pass the directory of an official checkpoint")
    config = config_from_official(json.loads(cfg_path.read_text()))
    with torch.device("meta"):
        model = MMFreeForCausalLM(config)
    model = model.to_empty(device="cpu")
    load_state(model, read_official_state(src), str(src))
    save_model(model, out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            atomic_write(out / name, lambda p, name=name: shutil.copyfile(src / name, p))
    return model.eval()
