"""Training-run directories: checkpoints (`ckpt-<step>/` with model, optimizer and state, checksummed in
`checksums.json`, pointed to by `checkpoint.json`), the metrics log and the rules of which directory a
run may start or resume in. Every damaged file is reported as one CheckpointError line naming it.

A run dir holds `train_config.json`, `tokenizer.json`, `metrics.jsonl`, `checkpoint.json`, one `ckpt-<step>/`
and, once finished, the model (`config.json`, `model.safetensors`).

For a model sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`), saving and loading are collective:
every rank calls them; the full (unsharded) weights and optimizer state are gathered to rank 0's CPU memory,
which writes the same files a single process would, and on load rank 0 reads them and the shards are
broadcast from it. So a run may resume sharded, with DDP or in one process from any of these checkpoints.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch

from mulfree.atomic import (
    atomic_dir,
    atomic_write_text,
    check_not_in_use,
    dumps_strict,
    is_temp_name,
    prepare_output,
    remove_entry,
)
from mulfree.data.text import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from mulfree.errors import CheckpointError, ConfigError, MulfreeError
from mulfree.integrity import MANIFEST, verify, write_manifest
from mulfree.models.schema import read_json
from mulfree.settings import TrainConfig

CHECKPOINT_POINTER = "checkpoint.json"
METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.json"
CKPT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
_CKPT = re.compile(r"^ckpt-(\d+)$")
# What a run writes before its first checkpoint: such a dir may be started again without --overwrite.
_EARLY_FILES = {TRAIN_CONFIG_FILE, METRICS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, MANIFEST}
_FIX = "restore the run directory or start a new run with a fresh --out"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model whose root was sharded with FSDP2's `fully_shard` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the order of the checkpoint's integer indices."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def gather_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None = None):
    """(model tensors, optimizer tensors `<index>.<name>`, param_groups) of a sharded model, unsharded into
    rank 0's CPU memory; the other ranks get empty ones. Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {k: v.contiguous() for k, v in get_model_state_dict(model, options=options).items()}
    if opt is None:
        return weights, {}, []
    full = get_optimizer_state_dict(model, opt, options=options)
    if not full:  # not rank 0
        return weights, {}, []
    index = {name: i for i, name in enumerate(_param_names(model, opt))}
    tensors = {f"{index[name]}.{k}": v.detach().contiguous() for name, st in full["state"].items()
               for k, v in st.items()}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in full["param_groups"]]
    return weights, tensors, groups


def save_checkpoint(out_dir: Path, step: int, model, opt, cfg: TrainConfig, extra: dict | None = None) -> Path:
    """Write `ckpt-<step>/` (model, optimizer, state, checksums) via a temp dir + rename, point to it
    atomically, then remove older checkpoints. For a sharded model every rank calls it (the state is
    gathered collectively) and rank 0 alone writes."""
    from safetensors.torch import save_file, save_model

    final = Path(out_dir) / f"ckpt-{step}"
    if is_sharded(model):
        import torch.distributed as dist

        weights, tensors, groups = gather_full_state(model, opt)
        if dist.get_rank() != 0:
            return final
    else:
        weights, (tensors, groups) = None, _optimizer_tensors(opt)
    with atomic_dir(final, overwrite=True, kind="checkpoint") as tmp:  # a ckpt-<step> left by a killed run is ours
        if weights is None:
            save_model(model, str(tmp / "model.safetensors"))
        else:  # what save_model writes for a model without shared tensors (ours have none)
            save_file(weights, str(tmp / "model.safetensors"))
        tensors["torch_rng"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "param_groups": groups, "train_config": cfg.to_dict()}
        if extra:
            state["extra"] = extra
        if hasattr(model, "config") and hasattr(model.config, "to_dict"):
            state["model_config"] = model.config.to_dict()
        (tmp / "state.json").write_text(dumps_strict(state))
        write_manifest(tmp, CKPT_FILES)
    atomic_write_text(Path(out_dir) / CHECKPOINT_POINTER, json.dumps({"checkpoint": final.name, "step": step}))
    remove_other_checkpoints(Path(out_dir), final.name)
    return final


def remove_other_checkpoints(out_dir: Path, keep: str | None) -> None:
    """Remove every `ckpt-<step>/` of the run but `keep` (older ones, or one a killed save left unpointed)."""
    for old in out_dir.glob("ckpt-*"):
        if old.name != keep and _CKPT.match(old.name) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def is_unstarted_run(out_dir: Path) -> bool:
    """True for a run dir killed before its first checkpoint: no pointer, `train_config.json` (or only temp
    files of our writers), and nothing but what a run writes first."""
    if not out_dir.is_dir() or (out_dir / CHECKPOINT_POINTER).exists():
        return False
    entries = list(out_dir.iterdir())
    if not entries or not ((out_dir / TRAIN_CONFIG_FILE).is_file() or all(is_temp_name(p.name) for p in entries)):
        return False
    return all(p.name in _EARLY_FILES or _CKPT.match(p.name) or is_temp_name(p.name) for p in entries)


def clear_unstarted_run(out_dir: Path) -> None:
    """Remove what a run killed before its first checkpoint left (its own files only)."""
    for p in list(out_dir.iterdir()):
        remove_entry(p)


def check_run_dir(out_dir: Path, resume: bool, overwrite: bool = False) -> Path:
    """The checkpoint pointer of `out_dir`. To resume it must exist; a new run needs an absent or empty
    dir, one a run left before its first checkpoint, or `overwrite` (CheckpointError otherwise); no other process
    may be training in it (ConfigError)."""
    out_dir = Path(out_dir)
    check_not_in_use(out_dir, "training run")
    pointer = out_dir / CHECKPOINT_POINTER
    if resume:
        if overwrite:
            raise ConfigError("--resume and --overwrite were both given", "pass --resume to continue the run "
                              "or --overwrite to replace it")
        return _resume_pointer(out_dir)
    if pointer.exists() and not overwrite:
        raise CheckpointError(f"'{out_dir}' already holds a training run",
                              "pass --resume to continue it, --overwrite to replace it, or choose a new --out")
    if overwrite or not is_unstarted_run(out_dir):
        prepare_output(out_dir, "training run", overwrite)
    return pointer


def _resume_pointer(out_dir: Path) -> Path:
    """The checkpoint pointer of the run in `out_dir` (CheckpointError when it has none)."""
    pointer = out_dir / CHECKPOINT_POINTER
    if not pointer.is_file():
        if is_unstarted_run(out_dir):
            raise CheckpointError(f"the run in '{out_dir}' stopped before its first checkpoint",
                                  "run the same command without --resume to start it again")
        raise CheckpointError(f"no checkpoint to resume in '{out_dir}'", "run without --resume first")
    return pointer


def _checkpoint_dir(out_dir: Path) -> Path:
    """The `ckpt-<step>/` that `checkpoint.json` names, checked (read by every rank while rank 0 holds the run)."""
    pointer = _resume_pointer(Path(out_dir))
    data = read_json(pointer, hint=_FIX)
    name = data.get("checkpoint") if isinstance(data, dict) else None
    if not isinstance(name, str) or not _CKPT.match(name):
        raise CheckpointError(f"{pointer} must be a JSON object with \"checkpoint\": \"ckpt-<step>\"", _FIX)
    ckpt = Path(out_dir) / name
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} (named by {pointer.name}) is missing", _FIX)
    return ckpt


def _check_state(state: object, path: Path, step: int) -> dict:
    """`state.json` must be an object with step, param_groups, train_config (and optional dicts)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(state).__name__}", _FIX)
    problems = []
    if state.get("step") != step:
        problems.append(f"step {state.get('step')!r} is not the checkpoint's step {step}")
    groups = state.get("param_groups")
    if not (isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups)):
        problems.append("param_groups is not a list of objects")
    else:
        for g in groups:
            numbers = [g.get(k) for k in ("lr", "eps", "weight_decay")] + list(g.get("betas") or [None])
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
                problems.append("param_groups hold a missing or non-finite lr/eps/weight_decay/betas")
                break
    for key, required in (("train_config", True), ("model_config", False), ("extra", False)):
        if (required or key in state) and not isinstance(state.get(key), dict):
            problems.append(f"{key} is not an object")
    if problems:
        raise CheckpointError(f"{path}: {problems[0]}", _FIX)
    return state


def _ckpt_state(ckpt: Path) -> dict:
    """The checked `state.json` of checkpoint dir `ckpt` (its checksum verified before)."""
    path = ckpt / "state.json"
    return _check_state(read_json(path, hint=_FIX), path, int(_CKPT.match(ckpt.name)[1]))


def checkpoint_state(out_dir: Path) -> dict:
    """The checked `state.json` of the latest checkpoint (step, train_config, model_config, param_groups)."""
    ckpt = _checkpoint_dir(Path(out_dir))
    verify(ckpt, ["state.json"])
    return _ckpt_state(ckpt)


def checkpoint_model(path: Path) -> tuple[torch.nn.Module, object, Path] | None:
    """(model in eval mode, tokenizer or None, checkpoint dir) of a training run that has no final model yet (the
    latest checkpoint its `checkpoint.json` names) or of one of its `ckpt-<step>` dirs, checksums verified; None for
    any other dir (a finished run's final model is loaded as any model dir). So a run can be sampled while it trains."""
    from mulfree.models.io import model_from

    path = Path(path)
    if (path / CHECKPOINT_POINTER).is_file() and not (path / "config.json").is_file():
        run, ckpt = path, _checkpoint_dir(path)
    elif _CKPT.match(path.name) and (path / "state.json").is_file():
        run, ckpt = path.parent, path
    else:
        return None
    verify(ckpt, ["state.json", "model.safetensors"])
    state = _ckpt_state(ckpt)
    if "model_config" not in state:
        raise CheckpointError(f"{ckpt / 'state.json'} has no model_config", "load the run's final model once it ends")
    model, tokenizer = model_from(state["model_config"], ckpt / "model.safetensors", run, str(ckpt / "state.json"))
    return model, tokenizer, ckpt


def _checked_optimizer_state(tensors: dict, shapes: list[torch.Size], path: Path) -> tuple[torch.Tensor, dict]:
    """(RNG state, per-parameter AdamW tensors by index) of `optimizer.safetensors`, each checked against the
    shapes of the optimizer's parameters."""
    rng = tensors.pop("torch_rng", None)
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise CheckpointError(f"{path} has no valid torch_rng tensor", _FIX)
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(shapes) or name not in ("step", "exp_avg", "exp_avg_sq"):
            raise CheckpointError(f"{path}: unexpected tensor {key!r} for a model with {len(shapes)} parameters",
                                  _FIX)
        per_param.setdefault(int(index), {})[name] = value
    for i, st in per_param.items():
        if set(st) != {"step", "exp_avg", "exp_avg_sq"}:
            raise CheckpointError(f"{path}: parameter {i} lacks {sorted({'step', 'exp_avg', 'exp_avg_sq'} - set(st))}",
                                  _FIX)
        for name in ("exp_avg", "exp_avg_sq"):
            if st[name].shape != shapes[i]:
                raise CheckpointError(f"{path}: {i}.{name} has shape {tuple(st[name].shape)}, the model's "
                                      f"parameter {tuple(shapes[i])}", "resume with the model of this run")
    return rng, per_param


_IMPL_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def _with_live_impl(groups: list[dict], opt: torch.optim.Optimizer) -> list[dict]:
    """The saved groups with this process's implementation flags: how the optimizer runs (fused, foreach, ...)
    is the resuming process's choice, not the checkpoint's (runs saved before `train` fused AdamW resume fused)."""
    return [{**g, **{k: live[k] for k in _IMPL_FLAGS if k in live}} for g, live in zip(groups, opt.param_groups)]


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups: list, path: Path) -> None:
    """Load the per-parameter AdamW tensors and RNG state of `optimizer.safetensors`, each checked."""
    params = [p for g in opt.param_groups for p in g["params"]]
    rng, per_param = _checked_optimizer_state(tensors, [p.shape for p in params], path)
    device = params[0].device if params else torch.device("cpu")
    for st in per_param.values():
        for name in ("exp_avg", "exp_avg_sq"):
            st[name] = st[name].to(device)
    groups = _with_live_impl(groups, opt)
    try:
        torch.set_rng_state(rng)
        opt.load_state_dict({"state": per_param, "param_groups": groups})
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} does not fit this model's optimizer ({exc})", _FIX) from None


def _read_checkpoint(out_dir: Path) -> tuple[Path, dict]:
    """The latest checkpoint dir of `out_dir` and its state, after verifying the checksums of all its files."""
    state = checkpoint_state(out_dir)
    ckpt = _checkpoint_dir(Path(out_dir))
    verify(ckpt, CKPT_FILES)
    for name in CKPT_FILES:
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt / name} is missing", _FIX)
    return ckpt, state


def _corrupt(ckpt: Path, exc: Exception) -> CheckpointError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CheckpointError(f"checkpoint {ckpt} is corrupt or for another model ({first})", _FIX)


def load_checkpoint(out_dir: Path, model, opt) -> tuple[int, dict]:
    """Restore model, optimizer and RNG from the latest checkpoint in `out_dir` after verifying its
    checksums; returns (step, state). Collective for a sharded model (see `load_sharded_checkpoint`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    if is_sharded(model):
        return load_sharded_checkpoint(out_dir, model, opt)
    ckpt, state = _read_checkpoint(out_dir)
    try:
        load_model(model, str(ckpt / "model.safetensors"), strict=True, device=str(next(model.parameters()).device))
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise _corrupt(ckpt, exc) from None
    _restore_optimizer(opt, tensors, state["param_groups"], ckpt / "optimizer.safetensors")
    return int(state["step"]), state


def _read_full_state(out_dir: Path, model, opt) -> tuple[dict, dict, dict, torch.Tensor]:
    """(state, model tensors, optimizer state dict keyed by parameter name, RNG state) of the latest checkpoint,
    checked against the (sharded) model's names and global shapes before any collective starts."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt, state = _read_checkpoint(out_dir)
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise _corrupt(ckpt, exc) from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    wrong = sorted(set(expected) ^ set(weights)) or [k for k in expected if weights[k].shape != expected[k]]
    if wrong:
        raise _corrupt(ckpt, ValueError(f"tensor {wrong[0]!r} is missing, unexpected or of another shape"))
    names = _param_names(model, opt)
    path = ckpt / "optimizer.safetensors"
    rng, per_param = _checked_optimizer_state(tensors, [expected[n] for n in names], path)
    try:
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    except (KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(f"{path} does not fit this model's optimizer ({exc!r})", _FIX) from None
    if len(groups) != len(opt.param_groups) or sum(len(g["params"]) for g in groups) != len(names):
        raise CheckpointError(f"{path} does not fit this model's optimizer (other parameter groups)", _FIX)
    optim = {"state": {names[i]: st for i, st in per_param.items()}, "param_groups": _with_live_impl(groups, opt)}
    return state, weights, optim, rng


def load_sharded_checkpoint(out_dir: Path, model, opt) -> tuple[int, dict]:
    """`load_checkpoint` for an FSDP2-sharded model; collective (every rank calls it). Rank 0 reads and checks
    the files; its verdict, the state and the RNG state reach every rank before the tensors are broadcast
    and sharded (`torch.distributed.checkpoint.state_dict`, `broadcast_from_rank0`)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    weights: dict = {}
    optim: dict = {}
    message: dict = {}
    if dist.get_rank() == 0:
        try:
            state, weights, optim, rng = _read_full_state(out_dir, model, opt)
            message = {"state": state, "rng": rng}
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait in the broadcast
            error = exc
            message = {"error": (exc.what, exc.hint) if isinstance(exc, MulfreeError) else
                       (f"rank 0 could not read the checkpoint in '{out_dir}' ({exc!r})", _FIX)}
    box = [message]
    dist.broadcast_object_list(box, src=0)
    message = box[0]
    if "error" in message:
        raise error if dist.get_rank() == 0 else CheckpointError(*message["error"])
    state = message["state"]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, opt, optim, options=options)
    torch.set_rng_state(message["rng"])
    return int(state["step"]), state


def append_metrics(path: Path, record: dict) -> None:
    """Append one strict-JSON record (non-finite values as null) to the metrics log, in one write."""
    with path.open("a") as f:
        f.write(dumps_strict(record) + "\n")


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the metric records up to `step` (a resumed run rewrites later ones) and drop unreadable
    lines (a torn last line of a killed write); returns how many lines were unreadable."""
    if not path.is_file():
        return 0
    keep, torn = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            torn += bool(line.strip())
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            torn += 1
        elif record["step"] <= step:
            keep.append(dumps_strict(record))
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    return torn
