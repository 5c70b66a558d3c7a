"""One model resolver behind every command: `resolve("out/run")` turns any model reference into a runnable
model, its tokenizer and its limits.

A reference is one of:
  - a mulfree MMfree or Transformer++ dir (`mulfree train`) -> our torch model, or the packed engine;
  - a packed dir (`mulfree pack`) -> the packed engine (`infer.engine.PackedModel`);
  - a training run that has no final model yet, or one of its `ckpt-<step>` dirs -> its latest (that) checkpoint;
  - a quantized dir (`mulfree quantize`, config with "quant_method") -> `quant.walker.load_quantized`;
  - any other Hugging Face causal LM dir, a .gguf file, or the name 'smollm2' -> `models.pretrained`.
Hugging Face models are wrapped in `LlamaLM` (Llama architecture: our lean forward, and the native decode
step for Latency-mode ShiftAdd models) or `HFCausalLM` (any other), so every torch model answers
`model(ids, state, positions, key_mask)`; every tokenizer is a `tokenizers.Tokenizer` (an HF fast
tokenizer's backend).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mulfree.errors import CheckpointError, ConfigError

ENGINES = ("auto", "torch", "packed")
EOT = "<|endoftext|>"  # the document separator of tokenizers trained by mulfree
REF_HINT = "pass a mulfree, packed, quantized or Hugging Face model dir, a .gguf file or 'smollm2'"


@dataclass
class Resolved:
    """A loaded model reference.

    model: our torch model, an `LlamaLM` / `HFCausalLM`, or a `PackedModel` (kind "packed").
    tokenizer: a `tokenizers.Tokenizer` (encode(...).ids, decode, encode_batch, token_to_id, ...).
    kind: "mmfree", "transformerpp", "packed", "hf:<model_type>" or "<quant_method>:<model_type>".
    context_limit: longest prompt + generation in tokens; None for recurrent models.
    eos_token_id: the end-of-text id generation stops at (None: none known).
    files_dir: the dir of the model's tokenizer files (chat template); for a GGUF file, its converted copy.
    """

    model: Any
    tokenizer: Any
    kind: str
    context_limit: int | None
    eos_token_id: int | None
    files_dir: Path

    @property
    def packed(self) -> bool:
        return self.kind == "packed"

    def encode(self, text: str, limit: int | None = None) -> torch.Tensor:
        """Token ids of `text` as a 1-D LongTensor, with the special tokens the tokenizer adds (e.g. BOS); a long
        text in pieces, up to `limit` tokens (`data.text.encode`)."""
        from mulfree.data.text import encode

        return encode(self.tokenizer, text, limit)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text of token ids, special tokens included."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def resolve(model_ref: str, engine: str = "auto", threads: int = 0, scoring: bool = False) -> Resolved:
    """Load `model_ref` for `engine` ("auto": the packed engine for MMfree and packed dirs, torch otherwise;
    "packed" only for those; "torch" for anything but packed dirs). `threads`: packed engine threads (0: its
    default). `scoring` (eval, lm-eval): a packed dir comes as an `infer.engine.PackedLM`, the torch
    interface over the packed engine. Every failure is a one-line CheckpointError / ConfigError."""
    from mulfree.infer.engine import pick_engine
    from mulfree.models import registry
    from mulfree.models.io import read_config
    from mulfree.models.pretrained import SMOLLM2_NAME, load_hf_causal_lm

    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}", f"use one of {', '.join(ENGINES)}")
    path = Path(model_ref)
    if model_ref == SMOLLM2_NAME or path.suffix == ".gguf":
        pick_engine({}, engine, model_ref)  # --engine packed: one line
        model, tokenizer = load_hf_causal_lm(model_ref)
        return _wrap_hf(model, tokenizer, model_ref, "hf", Path(model.name_or_path))  # the converted dir
    if not path.exists():
        raise CheckpointError(f"model {model_ref} does not exist", REF_HINT)
    if not path.is_dir():
        raise CheckpointError(f"{model_ref} is neither a model dir nor a .gguf file", REF_HINT)
    found = _training_run(path, engine, threads, scoring, model_ref)
    if found is not None:
        return found
    config = read_config(path)
    # scoring: a packed dir runs on the packed engine behind the torch interface (PackedLM)
    if (scoring and "format" in config) or pick_engine(config, engine, model_ref) == "packed":
        from mulfree.infer.engine import PackedLM, PackedModel

        packed = PackedModel.load(path, threads=threads)
        return _ours(PackedLM(packed) if scoring else packed, packed.tokenizer, "packed", None, model_ref)
    family = registry.find(config)
    if family is not None:
        from mulfree.generation import context_limit
        from mulfree.models.io import load_model

        model, tokenizer = load_model(path)
        return _ours(model, tokenizer, family.name, context_limit(model), model_ref)
    if "quant_method" in config:
        from mulfree.quant.walker import load_quantized

        model, tokenizer = load_quantized(path)
        return _wrap_hf(model, tokenizer, model_ref, str(config["quant_method"]), path)
    return _wrap_hf(*load_hf_causal_lm(path), model_ref, "hf", path)


def _training_run(path: Path, engine: str, threads: int, scoring: bool, model_ref: str) -> Resolved | None:
    """The latest checkpoint of a training run that has not written its final model (or a `ckpt-<step>` dir),
    on the engine `resolve` would pick for the final model; None when `path` is not such a dir."""
    from mulfree.checkpoint import checkpoint_model
    from mulfree.generation import context_limit
    from mulfree.infer.engine import PackedModel, pick_engine
    from mulfree.models import registry

    found = checkpoint_model(path)
    if found is None:
        return None
    model, tokenizer, ckpt = found
    print(f"note: loading the training checkpoint {ckpt}", file=sys.stderr)
    config = model.config.to_dict()
    if not scoring and pick_engine(config, engine, model_ref) == "packed":
        packed = PackedModel.from_model(model, tokenizer, threads=threads)
        return _ours(packed, tokenizer, "packed", None, model_ref)
    return _ours(model, tokenizer, registry.find(config).name, context_limit(model), model_ref)


def _ours(model: Any, tokenizer: Any, kind: str, limit: int | None, model_ref: str) -> Resolved:
    """A mulfree dir's model: its tokenizer.json is required; end of text is `<|endoftext|>`."""
    if tokenizer is None:
        raise CheckpointError(f"model dir '{model_ref}' has no tokenizer.json",
                              "use a dir written by `mulfree train` (or packed from one)")
    return Resolved(model, tokenizer, kind, limit, tokenizer.token_to_id(EOT), Path(model_ref))


def _wrap_hf(model: nn.Module, tokenizer: Any, model_ref: str, prefix: str, files_dir: Path) -> Resolved:
    """An HF causal LM behind `LlamaLM` or `HFCausalLM`, with its fast tokenizer's `tokenizers.Tokenizer`."""
    from mulfree.generation import context_limit
    from mulfree.models.hf_adapter import HFCausalLM
    from mulfree.models.llama import LlamaLM, supports

    if tokenizer is None:
        raise CheckpointError(f"'{model_ref}' has no tokenizer", "save the tokenizer with the model")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError(f"the tokenizer of '{model_ref}' is not a fast (tokenizer.json) tokenizer",
                              "save the model with a fast tokenizer")
    wrapped = LlamaLM(model) if supports(model) else HFCausalLM(model)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    return Resolved(wrapped, backend, f"{prefix}:{model.config.model_type}", context_limit(wrapped),
                    eos if isinstance(eos, int) else None, files_dir)
