"""One layer walker for every PTQ method (`base.QuantMethod`): a `CalibrationStream` captures the
calibration inputs at the first decoder block; per block, hooks fill each linear's `HessianStats`
(`quant.staged` computes the same statistics in one pass per stream for the block types it knows), the method
quantizes the block's linears, and the stream moves on through the quantized block.
Also saves a quantized HF model dir and loads it back (`load_quantized`); `quant.blockwise` drives the same
per-block step (`quantize_block`) one block in memory at a time and writes the dir sharded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from mulfree import integrity
from mulfree.atomic import atomic_dir
from mulfree.errors import CheckpointError, ConfigError, DataError
from mulfree.models.schema import first_line, read_json
from mulfree.quant import staged
from mulfree.quant.base import (
    QuantMethod,
    asymmetric_rhs,
    asymmetric_solve,
    asymmetric_target,
    is_linear,
    linear_weight,
)
from mulfree.quant.config import WalkOptions
from mulfree.quant.distill import distill, head_inputs, training_only
from mulfree.quant.qlinear import build_qlinear, describe
from mulfree.quant.schema import check_layer_target, check_values, validate_quant_config
from mulfree.quant.shards import INDEX, weight_map
from mulfree.quant.stream import CalibrationStream, run_block

__all__ = ["BLOCK_PATHS", "WalkOptions", "asymmetric_target", "calibration_ids", "decoder_blocks", "load_quantized",
           "quant_config", "quantize_block", "quantize_model", "save_quantized"]

# model_type -> dotted path of the decoder block list (one entry per architecture family).
BLOCK_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
}


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The (path, list) of decoder blocks of a supported HF causal LM; ConfigError otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if model_type not in BLOCK_PATHS:
        raise ConfigError(
            f"architecture {model_type!r} is not supported for quantization",
            f"use a model of type {', '.join(sorted(BLOCK_PATHS))}",
        )
    path = BLOCK_PATHS[model_type]
    return path, model.get_submodule(path)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def calibration_ids(tokenizer, text: str, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`n_samples` random windows of `seqlen` tokens from `text`: LongTensor [n, seqlen]. A fast tokenizer encodes
    the text in pieces (`data.text.encode`: the same ids; the bundled corpus took 0.8 GB more in one call)."""
    from mulfree.data.text import encode

    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids = (encode(backend, text) if backend is not None
           else torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long).flatten())
    if ids.numel() < seqlen + 1:
        raise DataError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}",
            "pass a longer --calib-data file or a smaller --calib-seqlen",
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


@torch.no_grad()
def quantize_model(
    model: nn.Module, method: QuantMethod, calib: torch.Tensor | None = None, options: WalkOptions | None = None,
    **overrides,
) -> dict[str, dict]:
    """Quantize every linear of every decoder block in place; returns {module path: layer meta}.

    `calib` [n, T] calibration token ids (required when `method.needs_stats`); `options` the walk
    (`WalkOptions` defaults when None); `overrides` replace fields of `options` by keyword, as in
    `quantize_model(model, method, calib, progress=False, tune_epochs=2)`.

    Embeddings and the LM head stay in full precision (as in GPTQ and ShiftAddLLM). With
    `true_sequential` (GPTQ's option of that name) the linears of a block are quantized in stages
    of those that read the same input (q/k/v, o, gate/up, down), each stage's Hessians taken
    from a forward pass through the stages already quantized; otherwise all from the FP block.
    With `asymmetric` (asymmetric calibration, as in GPTAQ) each layer is fitted to the FP model's
    output ‖X_fp Wᵀ − X_q Ŵᵀ‖ instead of ‖X_q (W − Ŵ)ᵀ‖: the stream carries the FP model's hidden
    states beside the quantized ones, and the method quantizes the least-squares target `asymmetric_target`.
    `tune_epochs` fits each block's float parameters to the FP block's outputs (norm tweaking);
    `distill_epochs` then fits all of them end to end to the FP model's next-token distribution
    (`distill.distill`).
    """
    opts = dataclasses.replace(options or WalkOptions(), **overrides)
    model.eval()
    prefix, blocks = decoder_blocks(model)
    if method.needs_stats and calib is None:
        raise DataError(f"{method.name} needs calibration data", "pass calibration token ids")
    stream = None
    if method.needs_stats:
        stream = CalibrationStream(model, blocks[0], calib, opts.batch_size, opts.asymmetric)
    teacher = head_inputs(model, calib) if opts.distill_epochs and stream is not None else []
    metas: dict[str, dict] = {}
    for bi, block in enumerate(tqdm(blocks, desc=f"{method.name} blocks", disable=not opts.progress)):
        for name, layer in quantize_block(block, method, stream, opts).items():
            metas[f"{prefix}.{bi}.{name}"] = describe(layer)
    if teacher:
        distill(model, blocks, calib, teacher, opts.distill_epochs, opts.distill_lr, opts.progress)
    return metas


def quantize_block(
    block: nn.Module, method: QuantMethod, stream: CalibrationStream | None, opts: WalkOptions
) -> dict[str, nn.Module]:
    """Replace every linear of `block` by the method's quantized layer, in call order; then tune the
    block and advance the stream through it. Returns {name in block: quantized layer}.

    The statistics come stage by stage: for the block types `staged` knows (Llama family, OPT, GPT-2) walked
    true-sequentially from `staged.StagedWalk` (one pass per stream), otherwise from `_traced_stages` (the
    stream's collects, any architecture)."""
    linears = {name: mod for name, mod in block.named_modules() if name and is_linear(mod)}
    targets, walk = [], None
    if stream is not None:
        stream.enter(block)
        if opts.tune_epochs:
            targets = stream.fp_targets(block)
        layout = staged.layout_of(block, linears)
        if opts.true_sequential and not method.needs_block_stats and layout is not None:
            walk = staged.StagedWalk(block, layout, stream, method)
    stages = walk.stages() if walk is not None else _traced_stages(block, linears, method, stream, opts)
    bits, done = None, {}
    while True:
        with calibration_precision(opts.calib_precision):  # the forwards and sums only, not the solves
            item = next(stages, None)
        if item is None:
            break
        stage, stats = item
        hess = {name: s.hessian() for name, s in stats.items()}
        if bits is None:  # the first stage's statistics cover every linear when the method needs them
            bits = method.assign_bits({name: (linear_weight(mod).float(), hess.get(name))
                                       for name, mod in linears.items()})
        for layer in done.values():
            layer.drop_dense()  # the collect's dense copies: rebuilt when the next one runs
        weights = {name: linear_weight(linears[name]).float() for name in stage}
        if stream is not None and stream.asymmetric:
            rhs = {name: asymmetric_rhs(w, hess[name], stats[name].cross()) for name, w in weights.items()}
            for s in stats.values():
                s.drop_cross()  # used up (freed before the [K, K] factorizations): the solves need H only
            weights = {name: asymmetric_solve(w, hess[name], rhs.pop(name), method.percdamp)
                       for name, w in weights.items()}
        for name in stage:
            mod = linears[name]
            bias = None if mod.bias is None else mod.bias.detach().float()
            done[name] = method.quantize(weights.pop(name), hess.get(name), bias, bits=bits.get(name))
            _set_module(block, name, done[name])
        stats = hess = None  # the stage's [K, K] sums are freed before the next are made
    if stream is not None:
        if opts.tune_epochs:
            _tune_block(block, stream.inputs, targets, opts.tune_epochs, opts.tune_lr)
        with calibration_precision(opts.calib_precision):
            if walk is not None and not opts.tune_epochs:
                stream.advance_to(walk.outputs(), block)
            else:
                stream.advance(block)
        for layer in done.values():
            layer.drop_dense()
    return done


@contextlib.contextmanager
def calibration_precision(precision: str) -> Iterator[None]:
    """With `precision` "bf16", fp32 matmuls inside run on bf16-rounded inputs with fp32 accumulation (oneDNN);
    the caller's mode is restored after. "fp32" leaves the mode as the caller set it."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    if precision == "bf16":
        matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _traced_stages(
    block: nn.Module, linears: dict[str, nn.Module], method: QuantMethod, stream: CalibrationStream | None,
    opts: WalkOptions,
) -> Iterator[tuple[list[str], dict]]:
    """(linear names, {name: stats}) per stage, for any architecture: the first collect runs the whole block and
    covers every linear; with `true_sequential` each later stage collects again through the stages the caller
    has quantized meanwhile. Without a stream, one stage of every linear and no statistics."""
    if stream is None:
        yield list(linears), {}
        return
    stats, found = stream.collect(block, linears, method)
    stages = found if opts.true_sequential else [list(linears)]
    for si, stage in enumerate(stages):
        if si > 0:
            stats = None  # the previous stage's [K, K] sums are freed before the next are made
            stats, _ = stream.collect(block, {name: linears[name] for name in stage}, method)
        if si == len(stages) - 1:
            stream.drop_fp_block()  # no collect follows: the FP copy's weights are not needed any more
        yield stage, stats


def _tune_block(block: nn.Module, records: list, targets: list, epochs: int, lr: float) -> None:
    """Adam on the block's float parameters (the quantized weights are buffers) against the MSE
    between its outputs and the FP block's `targets` on the same calibration inputs."""
    params = [p for p in block.parameters() if p.is_floating_point()]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad(), training_only(params, params):
        for _ in range(epochs):
            for record, target in zip(records, targets):
                loss = torch.nn.functional.mse_loss(run_block(block, *record), target)
                opt.zero_grad()
                loss.backward()
                opt.step()


def save_quantized(
    model: nn.Module, tokenizer, out: str | Path, method: QuantMethod, metas: dict, extra: dict,
    overwrite: bool = False,
) -> Path:
    """Write a quantized model dir atomically: config.json (HF config + `quant_method` and
    `mulfree_quant` with the method settings and per-layer metas), model.safetensors, tokenizer and the
    checksums of every file. A non-empty `out` is replaced only with `overwrite` (`atomic.atomic_dir`)."""
    from safetensors.torch import save_model

    out = Path(out)
    with atomic_dir(out, overwrite, "quantized model") as tmp:
        (tmp / "config.json").write_text(json.dumps(quant_config(model.config, method, metas, extra), indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        integrity.write_manifest(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file()))
    return out


def quant_config(config, method: QuantMethod, metas: dict, extra: dict) -> dict:
    """The config.json of a quantized dir: the HF `config` + `quant_method` and `mulfree_quant` (the method's
    settings, `extra` and the per-layer metas), and the same as a `quantization_config` for transformers'
    `from_pretrained` (`quant.hf_quantizer`)."""
    from mulfree.quant.hf_quantizer import hf_quantization_config

    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["quant_method"] = method.name
    cfg["mulfree_quant"] = {**method.config(), **extra, "layers": metas}
    cfg["quantization_config"] = hf_quantization_config(cfg)
    return cfg


def load_quantized(path: str | Path):
    """Load a dir written by `mulfree quantize`: returns (model with quantized layers, tokenizer or None).
    The weights are `model.safetensors` or shards listed in `model.safetensors.index.json` (`quant.shards`),
    read one file at a time. The config is validated (`quant.schema`), the checksums verified and the
    memory checked first."""
    import transformers

    from mulfree.models.pretrained import LOAD_ERRORS, load_hf_config, load_hf_tokenizer, verify_manifest

    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json", "pass a dir written by `mulfree quantize`")
    raw = read_json(cfg_path)
    if not isinstance(raw, dict) or "quant_method" not in raw or "mulfree_quant" not in raw:
        raise CheckpointError(f"{path} is not a quantized model dir", "quantize it with `mulfree quantize`")
    layers = validate_quant_config(raw, str(cfg_path))
    verify_manifest(path)
    config = load_hf_config(path)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, meta in layers.items():
        check_layer_target(model, name, meta, str(cfg_path))
        try:
            layer = build_qlinear(meta)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{cfg_path}: layer {name!r}: {exc}", "re-run `mulfree quantize`") from None
        _set_module(model, name, layer)
    files = sorted(set(weight_map(path).values()))
    state = model.state_dict()
    storage = {key: _storage_key(key, t) for key, t in state.items()}  # tied names share one key
    loaded, unexpected = set(), []
    for file in files:  # one file in memory at a time (the model itself is whole)
        weights = path / file
        try:
            tensors = load_file(str(weights))
            unexpected += model.load_state_dict(tensors, strict=False).unexpected_keys
        except LOAD_ERRORS as exc:
            raise CheckpointError(f"cannot read {weights} ({first_line(exc)})",
                                  "the file is corrupt, truncated or does not match config.json; re-run `mulfree quantize`") from None
        loaded |= {storage[k] for k in tensors if k in storage}
        del tensors
    weights = path / (files[0] if len(files) == 1 else INDEX)
    missing = sorted(k for k in state if storage[k] not in loaded and not k.startswith("lm_head"))
    if unexpected or missing:
        raise CheckpointError(f"{weights} does not match its config (missing {missing[:3]}, unexpected "
                              f"{sorted(unexpected)[:3]})", "re-run `mulfree quantize`")
    check_values(model, layers, str(weights))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file():
        tokenizer = load_hf_tokenizer(path, config.vocab_size)
    return model, tokenizer


def _storage_key(name: str, t: torch.Tensor) -> tuple:
    """Equal for state-dict entries that are one tensor under two names (tied embeddings)."""
    if not t.numel():
        return (name,)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
