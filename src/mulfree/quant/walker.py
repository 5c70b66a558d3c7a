"""One layer walker for every PTQ method: capture calibration inputs at the first decoder block,
then per block collect H = Σ xᵀx for each linear with forward hooks, quantize the block's linears
with the method, and feed the block's outputs (through the already-quantized block) to the next.
Also saves a quantized HF model dir and loads it back (`load_quantized`).

A method has `name`, `needs_hessian`, `config() -> dict` and `quantize(w [N, K], h [K, K] | None,
bias) -> quantized layer`; optionally `assign_bits({name: (w, h)}) -> {name: bits}` per block.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from mulfree.atomic import atomic_dir
from mulfree.errors import CheckpointError, ConfigError, DataError
from mulfree.quant.distill import distill, head_inputs, training_only
from mulfree.quant.qlinear import build_qlinear, describe

# model_type -> dotted path of the decoder block list (one entry per architecture family).
BLOCK_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
}


class _Stop(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


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


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _weight(module: nn.Module) -> torch.Tensor:
    """W [out, in] of nn.Linear or GPT-2 Conv1D (stored [in, out])."""
    w = module.weight.detach()
    return w.T if type(module).__name__ == "Conv1D" else w


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def calibration_ids(tokenizer, text: str, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`n_samples` random windows of `seqlen` tokens from `text`: LongTensor [n, seqlen]."""
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long).flatten()
    if ids.numel() < seqlen + 1:
        raise DataError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}",
            "pass a longer --calib-data file or a smaller --calib-seqlen",
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _capture(model: nn.Module, block: nn.Module, calib: torch.Tensor, batch_size: int) -> list:
    """Inputs of `block` for every calibration batch: list of (hidden, args_tail, kwargs)."""
    records = []

    def hook(_module, args, kwargs):
        if args:
            records.append((args[0], args[1:], kwargs))
        else:  # hidden states passed by keyword: args None marks it
            kw = dict(kwargs)
            records.append((kw.pop("hidden_states"), None, kw))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(calib[i : i + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return records


def _run_block(block: nn.Module, hidden, args, kwargs):
    if args is None:
        return _block_output(block(hidden_states=hidden, **kwargs))
    return _block_output(block(hidden, *args, **kwargs))


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method,
    calib: torch.Tensor | None = None,
    batch_size: int = 4,
    progress: bool = True,
    true_sequential: bool = True,
    tune_epochs: int = 0,
    tune_lr: float = 1e-3,
    asymmetric: bool = True,
    distill_epochs: int = 0,
    distill_lr: float = 1e-4,
) -> dict[str, dict]:
    """Quantize every linear of every decoder block in place; returns {module path: layer meta}.

    Embeddings and the LM head stay in full precision (as in GPTQ and ShiftAddLLM). With
    `true_sequential` (GPTQ's option of that name) the linears of a block are quantized in stages
    of those that read the same input (q/k/v, o, gate/up, down), each stage's Hessians taken
    from a forward pass through the stages already quantized; otherwise all from the FP block.
    With `asymmetric` (asymmetric calibration, as in GPTAQ) each layer is fitted to the FP model's
    output ‖X_fp Wᵀ − X_q Ŵᵀ‖ instead of ‖X_q (W − Ŵ)ᵀ‖: an FP copy of the calibration stream runs
    beside the quantized one, and the method quantizes the least-squares target `asymmetric_target`.
    `tune_epochs` fits each block's float parameters to the FP block's outputs (norm tweaking);
    `distill_epochs` then fits all of them end to end to the FP model's next-token distribution
    (`distill.distill`).
    """
    model.eval()
    prefix, blocks = decoder_blocks(model)
    if method.needs_hessian and calib is None:
        raise DataError(f"{method.name} needs calibration data", "pass calibration token ids")
    records = _capture(model, blocks[0], calib, batch_size) if method.needs_hessian else []
    teacher = head_inputs(model, calib) if distill_epochs and method.needs_hessian else []
    asymmetric = asymmetric and method.needs_hessian
    fp_records = list(records) if asymmetric else []  # the FP model's stream
    percdamp = getattr(method, "percdamp", 0.01)
    metas: dict[str, dict] = {}
    for bi, block in enumerate(tqdm(blocks, desc=f"{method.name} blocks", disable=not progress)):
        linears = {name: mod for name, mod in block.named_modules() if name and _is_linear(mod)}
        stages = [list(linears)]
        hess: dict[str, torch.Tensor | None] = {name: None for name in linears}
        fp, fp_outputs = None, []
        if asymmetric:  # the FP block and its outputs on the FP stream, taken before any linear is replaced
            fp = (copy.deepcopy(block), fp_records)
            fp_outputs = [_run_block(fp[0], hid, args, kw) for hid, args, kw in fp_records]
        if method.needs_hessian:
            targets = []  # what --tune-epochs fits the quantized block's outputs to
            if tune_epochs:
                targets = fp_outputs if asymmetric else [_run_block(block, hid, args, kw) for hid, args, kw in records]
            hess, stages, cross = _collect_hessians(block, linears, records, fp)
            if not true_sequential:
                stages = [list(linears)]
        layers = {name: (_weight(mod).float(), hess[name]) for name, mod in linears.items()}
        assign = getattr(method, "assign_bits", None)
        bits = assign(layers) if assign is not None else {}
        for si, stage in enumerate(stages):
            if si > 0:
                hess, _, cross = _collect_hessians(block, {name: linears[name] for name in stage}, records, fp)
            for name in stage:
                mod = linears[name]
                bias = None if mod.bias is None else mod.bias.detach().float()
                extra = {"bits": bits[name]} if name in bits else {}
                w = _weight(mod).float()
                if asymmetric:
                    w = asymmetric_target(w, hess[name], cross[name], percdamp)
                qlayer = method.quantize(w, hess[name], bias, **extra)
                _set_module(block, name, qlayer)
                metas[f"{prefix}.{bi}.{name}"] = describe(qlayer)
        if tune_epochs and method.needs_hessian:
            _tune_block(block, records, targets, tune_epochs, tune_lr)
        if method.needs_hessian:
            records = [(_run_block(block, hid, args, kw), args, kw) for hid, args, kw in records]
        fp_records = [(out, args, kw) for out, (_, args, kw) in zip(fp_outputs, fp_records)] if asymmetric else []
    if teacher:
        distill(model, blocks, calib, teacher, distill_epochs, distill_lr, progress)
    return metas


def asymmetric_target(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, percdamp: float) -> torch.Tensor:
    """W' = argmin ‖X_fp Wᵀ − X_q W'ᵀ‖ = W Cᵀ H⁻¹ with H = X_qᵀX_q, C = X_qᵀX_fp (both per token), written
    W + W (C − H)ᵀ H_d⁻¹ with H dampened as the solver does, so that W' = W where the two streams agree.
    Quantizing W' against H then minimizes the asymmetric objective (up to a constant)."""
    h = h.double()
    hd = h + (percdamp * torch.diag(h).mean() + 1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
    return (w.double() + w.double() @ torch.linalg.solve(hd, cross.double() - h).T).float()


def _tune_block(block: nn.Module, records: list, targets: list, epochs: int, lr: float) -> None:
    """Adam on the block's float parameters (the quantized weights are buffers) against the MSE
    between its outputs and the FP block's `targets` on the same calibration inputs."""
    params = [p for p in block.parameters() if p.is_floating_point()]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad(), training_only(params, params):
        for _ in range(epochs):
            for (hid, args, kw), target in zip(records, targets):
                loss = torch.nn.functional.mse_loss(_run_block(block, hid, args, kw), target)
                opt.zero_grad()
                loss.backward()
                opt.step()


def _collect_hessians(
    block: nn.Module, linears: dict[str, nn.Module], records: list, fp: tuple[nn.Module, list] | None = None
) -> tuple[dict[str, torch.Tensor], list[list[str]], dict[str, torch.Tensor]]:
    """H = mean over calibration tokens of x xᵀ for each linear's input, via forward hooks, and the
    linears in call order grouped by shared input (the true-sequential stages). Linears fed the same
    tensor (q/k/v, gate/up) share one product per batch. With `fp` = (FP copy of the block, FP
    stream records) also C = mean x x_fpᵀ, x_fp the same linear's input in the FP model."""
    hess = {name: torch.zeros(_weight(m).shape[1], _weight(m).shape[1]) for name, m in linears.items()}
    cross = {name: torch.zeros_like(h) for name, h in hess.items()} if fp is not None else {}
    count = {"rows": 0}
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    fp_inputs: dict[str, torch.Tensor] = {}
    stages: list[list[str]] = []
    stage_of: dict[str, tuple] = {}

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).float()

    def make_hook(name):
        def hook(_module, args, _out):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if key not in cache:  # x stays referenced, so no later input of the pass can reuse its address
                xf = flat(x)
                cache[key] = (x, xf.T @ xf, xf.T @ fp_inputs[name] if fp is not None else None)
            hess[name] += cache[key][1]
            if fp is not None:
                cross[name] += cache[key][2]
            if name not in stage_of:
                if not stages or stage_of[stages[-1][-1]] != key:
                    stages.append([])
                stages[-1].append(name)
                stage_of[name] = key

        return hook

    def make_fp_hook(name):
        def hook(_module, args, _out):
            fp_inputs[name] = flat(args[0])

        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in linears.items()]
    if fp is not None:
        handles += [fp[0].get_submodule(name).register_forward_hook(make_fp_hook(name)) for name in linears]
    try:
        for i, (hid, args, kw) in enumerate(records):
            cache.clear()
            if fp is not None:
                fp_hid, fp_args, fp_kw = fp[1][i]
                _run_block(fp[0], fp_hid, fp_args, fp_kw)
            _run_block(block, hid, args, kw)
            count["rows"] += hid.shape[0] * hid.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    cache.clear()
    missing = [name for name in linears if name not in stage_of]
    if missing:
        stages.append(missing)
    rows = max(count["rows"], 1)
    return {n: h / rows for n, h in hess.items()}, stages, {n: c / rows for n, c in cross.items()}


def save_quantized(model: nn.Module, tokenizer, out: str | Path, method, metas: dict, extra: dict) -> Path:
    """Write a quantized model dir atomically: config.json (HF config + `quant_method` and
    `mulfree_quant` with the method settings and per-layer metas), model.safetensors, tokenizer."""
    from safetensors.torch import save_model

    out = Path(out)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["quant_method"] = method.name
    cfg["mulfree_quant"] = {**method.config(), **extra, "layers": metas}
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def load_quantized(path: str | Path):
    """Load a dir written by `mulfree quantize`: returns (model with quantized layers, tokenizer or None)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from safetensors.torch import load_model

    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json", "pass a dir written by `mulfree quantize`")
    raw = json.loads(cfg_path.read_text())
    if "quant_method" not in raw or "mulfree_quant" not in raw:
        raise CheckpointError(f"{path} is not a quantized model dir", "quantize it with `mulfree quantize`")
    config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, meta in raw["mulfree_quant"]["layers"].items():
        _set_module(model, name, build_qlinear(meta))
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if unexpected or [k for k in missing if not k.startswith("lm_head")]:
        raise CheckpointError(f"{path}/model.safetensors does not match its config ({missing[:3]}{unexpected[:3]})", "re-run `mulfree quantize`")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer
