"""Quantization in bounded memory: the model is built with its parameters on the meta device, the
embeddings, final norm and head are read from the safetensors files, and each decoder block is read
when the walk reaches it, quantized by the walker's own step (`walker.quantize_block`), written out
as one shard and dropped; the embeddings and head are read only to capture the calibration inputs and
again to be written last. Peak memory is one block plus the calibration activations (those beyond
`spill.SPILL_BYTES` on disk), not the model.

The result is the quantized dir of `walker.save_quantized` with the weights sharded one block per file
(`shards.ShardWriter`; then the embeddings, final norm and head one tensor per shard, so that only one of them
is in memory at a time), the same tensors bit for bit.
The dir is built beside `out` and renamed into place (`atomic.atomic_dir`): an interrupted run leaves
`out` as it was, and its finished blocks in the temp dir, from which the same command continues (`quant.resume`).
Not for `distill_epochs` (end-to-end distillation needs every block at once).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import mulfree
from mulfree import integrity
from mulfree.atomic import atomic_dir
from mulfree.errors import CheckpointError, ConfigError, DataError
from mulfree.models import schema
from mulfree.quant import resume
from mulfree.quant.base import QuantMethod
from mulfree.quant.config import WalkOptions
from mulfree.quant.qlinear import describe
from mulfree.quant.shards import SafetensorsDir, ShardWriter
from mulfree.quant.spill import SPILL_BYTES, Spill
from mulfree.quant.stream import CalibrationStream
from mulfree.quant.walker import decoder_blocks, quant_config, quantize_block


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init work); buffers,
    such as rotary tables, are built as usual (accelerate's init_empty_weights does the same)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_config(src: Path):
    """The validated transformers config of the HF dir `src` (no whole-model memory check: one block at a time)."""
    from mulfree.models.pretrained import read_hf_config

    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} is not a Hugging Face model dir (no config.json)", "pass a dir saved with save_pretrained")
    return read_hf_config(src)


def skeleton(config) -> nn.Module:
    """The fp32 causal LM of `config` with every parameter on the meta device."""
    import transformers

    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _materialize(root: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Put each tensor of {name under `root`'s prefix: tensor} in place of the parameter or buffer of that name."""
    for key, value in tensors.items():
        owner, _, leaf = key[len(prefix):].rpartition(".")
        module = root.get_submodule(owner) if owner else root
        if leaf in module._parameters:
            old = module._parameters[leaf]
            if tuple(old.shape) != tuple(value.shape):
                raise CheckpointError(f"tensor {key} has shape {tuple(value.shape)}, the config says {tuple(old.shape)}",
                                      "the weights do not match config.json")
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        elif leaf in module._buffers:
            module._buffers[leaf] = value


def _state_names(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}{k}" for k in module.state_dict(keep_vars=True)]


def _outside_names(model: nn.Module, weights: SafetensorsDir, prefix: str) -> list[str]:
    """The names in `weights` of `model`'s tensors outside the decoder blocks `prefix`.*; CheckpointError when
    one is missing (a tied head may be: it is the input embedding)."""
    names = [k for k in _state_names(model, "") if not k.startswith(prefix + ".")]
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        tied = {f"{n}.weight" for n, m in model.named_modules() if m is head}
    left = [k for k in names if k not in weights.files and k not in tied]
    if left:
        raise CheckpointError(f"{weights.directory} has no tensor {left[0]}", "the weights do not match config.json")
    return [k for k in names if k in weights.files]


def _outside_tensors(model: nn.Module, weights: SafetensorsDir, prefix: str) -> dict[str, torch.Tensor]:
    """{name: fp32 tensor} of `_outside_names`, read from `weights`."""
    return weights.load(_outside_names(model, weights, prefix), torch.float32)


def _load_outside_blocks(model: nn.Module, weights: SafetensorsDir, prefix: str) -> None:
    """Read the embeddings, norms and head into `model` (what the calibration runs up to block 0)."""
    _materialize(model, _outside_tensors(model, weights, prefix))
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def _drop_outside_blocks(model: nn.Module, prefix: str) -> None:
    """Put the parameters outside the decoder blocks back on the meta device (freed until written)."""
    for name, param in list(model.named_parameters()):
        if not name.startswith(prefix + "."):
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = nn.Parameter(param.to("meta"), requires_grad=False)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _glibc(name: str, *args: int) -> None:
    """Call glibc's allocator tuning function `name`; a no-op where there is no glibc."""
    try:
        getattr(ctypes.CDLL("libc.so.6"), name)(*args)
    except (OSError, AttributeError):
        pass


def _map_large_buffers() -> None:
    """Have glibc mmap every buffer of 1 MiB or more (for the rest of the process), so that freeing one gives
    its memory back. Its default threshold grows to 32 MiB as big buffers are freed, and the blocks'
    [K, K] statistics and weights then land on the heap, which creeps up block by block (1.1B Llama, GPTQ:
    1.37 GiB at 2 blocks, 1.62 at 6, 1.81 at 22; 1.25 at 6 with this); a no-op elsewhere."""
    _glibc("mallopt", M_MMAP_THRESHOLD, 1 << 20)


def _return_freed_heap() -> None:
    """Hand the heap pages freed with a block back to the OS (glibc keeps them otherwise, and the next
    block's allocations land around them: the peak would creep up block by block); a no-op elsewhere."""
    _glibc("malloc_trim", 0)


@torch.no_grad()
def quantize_blockwise(
    src: str | Path, out: str | Path, method: QuantMethod, calib: torch.Tensor | None = None,
    options: WalkOptions | None = None, *, tokenizer=None, extra: dict | None = None, overwrite: bool = False,
    spill_bytes: int = SPILL_BYTES, **overrides,
) -> dict[str, dict]:
    """Quantize the HF safetensors dir `src` into the quantized dir `out`, one decoder block in memory at
    a time; returns {module path: layer meta} as `walker.quantize_model` does.

    `calib` [n, T] calibration token ids (required when `method.needs_stats`), `options` / `overrides`
    the walk as in `quantize_model` (not `distill_epochs`); `tokenizer` saved beside the weights when
    given; `extra` recorded in config.json; activations over `spill_bytes` go to a scratch file.
    Example:
        quantize_blockwise("llama-1b", "llama-1b-rtn4", RTN(4, 128))
    """
    opts = dataclasses.replace(options or WalkOptions(), **overrides)
    if opts.distill_epochs:
        raise ConfigError("block-by-block quantization cannot distill end to end",
                          "use walker.quantize_model on the whole model for --distill-epochs")
    if method.needs_stats and calib is None:
        raise DataError(f"{method.name} needs calibration data", "pass calibration token ids")
    src = Path(src)
    config = load_config(src)
    from mulfree.models.pretrained import verify_manifest

    verify_manifest(src)
    _map_large_buffers()
    weights = SafetensorsDir(src)
    model = skeleton(config)
    prefix, blocks = decoder_blocks(model)
    per_block = 4 * sum(t.numel() for t in blocks[0].state_dict(keep_vars=True).values())
    outside = 4 * sum(t.numel() for k, t in model.state_dict(keep_vars=True).items() if not k.startswith(prefix + "."))
    schema.check_memory(outside + 3 * per_block, str(src), "block-by-block quantization")
    outside_names = _outside_names(model, weights, prefix)  # fail before any work when one is missing
    key = resume.run_key(_source_identity(src, weights), method.name, method.config(), calib, extra,
                         {k: v for k, v in dataclasses.asdict(opts).items() if k != "progress"},
                         mulfree.__version__, torch.__version__)
    with atomic_dir(out, overwrite, "quantized model", resume_key=key[:8]) as tmp:
        progress = resume.load(tmp, key) or resume.Progress(key, 0, {}, {}, {})
        stream = None
        if method.needs_stats:  # the embeddings are needed only to capture block 0's inputs
            _load_outside_blocks(model, weights, prefix)
            stream = CalibrationStream(model, blocks[0], calib, opts.batch_size, opts.asymmetric,
                                       spill=Spill(tmp, spill_bytes))
            _drop_outside_blocks(model, prefix)
        writer = ShardWriter(tmp, len(blocks) + len(outside_names), progress.shards or None)
        if progress.blocks:
            resume.restore(tmp, progress, stream)
            method.resume_after(len(progress.metas))
        saved_at, save_cost = time.monotonic(), 0.0
        try:
            for bi in tqdm(range(progress.blocks, len(blocks)), desc=f"{method.name} blocks", initial=progress.blocks,
                           total=len(blocks), disable=not opts.progress):
                _quantize_one(blocks, bi, prefix, weights, method, stream, opts, writer, progress.metas)
                now = time.monotonic()
                if now - saved_at >= resume.SAVE_RATIO * save_cost:  # saving takes at most 1/SAVE_RATIO of the time
                    progress.blocks, progress.shards = bi + 1, writer.state()
                    resume.save(tmp, progress, stream)
                    saved_at = time.monotonic()
                    save_cost = saved_at - now
        except BaseException:
            if progress.blocks:
                print(f"\n{progress.blocks} of {len(blocks)} blocks are kept in {tmp}; the same command continues "
                      "from there", file=sys.stderr)
            raise
        for name in outside_names:  # embeddings, final norm, head: as read
            writer.write(weights.load([name], torch.float32))
            _return_freed_heap()
        names = writer.finish()
        resume.finish(tmp, progress)
        metas = progress.metas
        (tmp / "config.json").write_text(json.dumps(quant_config(config, method, metas, extra or {}), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        integrity.write_manifest(tmp, sorted({*names, *(p.name for p in tmp.iterdir() if p.is_file())}))
    return metas


def _source_identity(src: Path, weights: SafetensorsDir) -> list:
    """What identifies the source model for `resume.run_key`: its path, config and weight files (size, mtime)."""
    files = []
    for name in sorted(set(weights.files.values())):
        stat = (src / name).stat()
        files.append([name, stat.st_size, stat.st_mtime_ns])
    return [str(src.resolve()), (src / "config.json").read_text(), files]


def _quantize_one(blocks: nn.ModuleList, bi: int, prefix: str, weights: SafetensorsDir, method: QuantMethod,
                  stream: CalibrationStream | None, opts: WalkOptions, writer: ShardWriter, metas: dict) -> None:
    """Read block `bi`, quantize it (the stream moves past it), write its shard and drop it."""
    block = blocks[bi]
    at = f"{prefix}.{bi}."
    _materialize(block, weights.load([k for k in _state_names(block, at) if k in weights.files], torch.float32), at)
    left = [k for k, t in block.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise CheckpointError(f"{weights.directory} has no tensor {at}{left[0]}", "the weights do not match config.json")
    for name, layer in quantize_block(block, method, stream, opts).items():
        metas[at + name] = describe(layer)
    writer.write({at + k: t for k, t in block.state_dict().items()})
    blocks[bi] = nn.Identity()  # drop the block (and its cached dense weights)
    del block
    _return_freed_heap()
