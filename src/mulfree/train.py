"""Training loop for our causal LMs: AdamW, warmup + cosine LR, clipping, accumulation, optional bf16
autocast, periodic validation, atomic safetensors checkpoints and exact `resume`; single process or
torchrun DDP (gloo on CPU, nccl on GPU).

Batches are a pure function of (seed, step, rank, micro-step), so a resumed run sees exactly the data
an uninterrupted run would, and together with the restored optimizer state gives identical losses.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from mulfree.atomic import atomic_dir, atomic_write_text
from mulfree.errors import CheckpointError, ConfigError, DataError
from mulfree.evaluate import model_logits
from mulfree.settings import TrainConfig

CHECKPOINT_POINTER = "checkpoint.json"
METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.json"

BatchFn = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup` steps, then cosine decay to `min_lr` at `steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (stable across runs and processes)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def random_windows(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """`batch_size` random windows of `ids`: x [B, T] and y = x shifted by one [B, T]."""
    n = ids.numel() - seq_len - 1
    if n < 0:
        raise DataError(f"token stream has {ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}",
                        "use more data or a smaller --seq-len")
    starts = torch.randint(0, n + 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = ids[idx]
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy (targets -100 ignored), with optional bf16 autocast."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model_logits(model, x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


@torch.no_grad()
def evaluate_loss(model, batches: list[tuple[torch.Tensor, torch.Tensor]], bf16: bool = False) -> float:
    """Mean loss over fixed validation batches (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    total = sum(lm_loss(model, x, y, bf16).item() for x, y in batches)
    model.train(was_training)
    return total / len(batches)


# ---------------------------------------------------------------- checkpoints


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def save_checkpoint(out_dir: Path, step: int, model, opt, cfg: TrainConfig, extra: dict | None = None) -> Path:
    """Write `ckpt-<step>/` (model, optimizer, state) via a temp dir + rename, then point to it atomically."""
    from safetensors.torch import save_file, save_model

    final = out_dir / f"ckpt-{step}"
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, groups = _optimizer_tensors(opt)
        tensors["torch_rng"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "param_groups": groups, "train_config": cfg.to_dict()}
        if extra:
            state["extra"] = extra
        if hasattr(model, "config") and hasattr(model.config, "to_dict"):
            state["model_config"] = model.config.to_dict()
        (tmp / "state.json").write_text(json.dumps(state))
    atomic_write_text(out_dir / CHECKPOINT_POINTER, json.dumps({"checkpoint": final.name, "step": step}))
    for old in out_dir.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def check_run_dir(out_dir: Path, resume: bool, overwrite: bool = False) -> Path:
    """The checkpoint pointer of `out_dir`, which must exist to resume and, unless `overwrite`, must not
    exist for a new run (CheckpointError otherwise)."""
    pointer = Path(out_dir) / CHECKPOINT_POINTER
    if resume and not pointer.is_file():
        raise CheckpointError(f"no checkpoint to resume in '{out_dir}'", "run without --resume first")
    if not resume and not overwrite and pointer.exists():
        raise CheckpointError(f"'{out_dir}' already holds a training run",
                              "pass --resume to continue it or choose a new --out")
    return pointer


def checkpoint_state(out_dir: Path) -> dict:
    """The `state.json` of the latest checkpoint (step, train_config, model_config, param_groups)."""
    pointer = check_run_dir(out_dir, resume=True)
    try:
        return json.loads((Path(out_dir) / json.loads(pointer.read_text())["checkpoint"] / "state.json").read_text())
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint in '{out_dir}' is corrupt ({exc})", "start a new run with a fresh --out") from exc


def load_checkpoint(out_dir: Path, model, opt) -> int:
    """Restore model, optimizer and RNG from the latest checkpoint in `out_dir`; returns its step."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    pointer = check_run_dir(out_dir, resume=True)
    try:
        ckpt = out_dir / json.loads(pointer.read_text())["checkpoint"]
        state = json.loads((ckpt / "state.json").read_text())
        load_model(model, str(ckpt / "model.safetensors"), strict=True, device=str(next(model.parameters()).device))
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint in '{out_dir}' is corrupt or for another model ({exc})",
                              "start a new run with a fresh --out") from exc
    torch.set_rng_state(tensors.pop("torch_rng"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = value
    device = next(model.parameters()).device
    for st in per_param.values():
        for name, value in st.items():
            if name != "step":
                st[name] = value.to(device)
    opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    return int(state["step"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric records past `step` (written after the checkpoint a resumed run restarts from)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ---------------------------------------------------------------- distributed


def _dist_setup(device: str) -> tuple[int, int]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _window_sampler(ids: torch.Tensor, cfg: TrainConfig) -> BatchFn:
    """The default batch function: random windows of the training stream."""

    def sample(step: int, generator: torch.Generator):
        return random_windows(ids, cfg.batch_size, cfg.seq_len, generator)

    return sample


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, embeddings); none on norms, gates' bounds and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "lower_bounds" not in name and "norm" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------- loop


def train(
    model: torch.nn.Module,
    train_ids: torch.Tensor | None,
    val_ids: torch.Tensor | None,
    cfg: TrainConfig,
    out_dir: Path,
    resume: bool = False,
    tokenizer=None,
    batch_fn: BatchFn | None = None,
    val_batch_fn: BatchFn | None = None,
    overwrite: bool = False,
    extra: dict | None = None,
) -> dict:
    """Train `model` in place and save it to `out_dir` with `mulfree.models.io.save_model`.

    Args:
        train_ids: 1-D token stream sampled in random windows (unused when `batch_fn` is given).
        val_ids: 1-D token stream for validation loss (or None; `val_batch_fn` is an alternative).
        batch_fn: `(step, generator) -> (x [B, T], y [B, T])` supplying custom micro-batches; y may
            hold -100 (ignored). The generator is seeded from (seed, step, rank, micro-step).
        resume: continue the run saved in `out_dir` exactly (same data order, optimizer, RNG).
        overwrite: allow starting a fresh run in a directory that already holds one.
        extra: JSON-able facts stored in every checkpoint (e.g. the data paths, for the CLI's resume).
    Returns:
        final metrics: step, loss, val_loss, val_ppl (when validated), tokens, wall_s.
    """
    out_dir = Path(out_dir)
    if batch_fn is None and train_ids is None:
        raise DataError("no training data", "pass train_ids or batch_fn")
    check_run_dir(out_dir, resume, overwrite)
    rank, world = _dist_setup(cfg.device)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cfg.device == "cuda" and world > 1
                          else cfg.device)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    if batch_fn is None:
        batch_fn = _window_sampler(train_ids, cfg)
    val_batches: list = []
    if val_batch_fn is not None:
        val_batches = [val_batch_fn(i, _generator(cfg.seed, 7, i)) for i in range(cfg.eval_batches)]
    elif val_ids is not None:
        gen = _generator(cfg.seed, 7)
        val_batches = [random_windows(val_ids, cfg.batch_size, cfg.seq_len, gen) for _ in range(cfg.eval_batches)]
    val_batches = [(x.to(device), y.to(device)) for x, y in val_batches]

    model.to(device)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    start = 0
    metrics_path = out_dir / METRICS_FILE
    if resume:
        start = load_checkpoint(out_dir, model, opt)
        if is_main:
            _truncate_metrics(metrics_path, start)
    elif is_main:
        for old in out_dir.glob("ckpt-*"):
            shutil.rmtree(old, ignore_errors=True)
        (out_dir / CHECKPOINT_POINTER).unlink(missing_ok=True)
        metrics_path.unlink(missing_ok=True)
    if is_main:
        atomic_write_text(out_dir / TRAIN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2))
        if tokenizer is not None:
            from mulfree.data.text import save_tokenizer

            save_tokenizer(tokenizer, out_dir)

    train_model = model
    if world > 1:
        dist.barrier()
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def log(record: dict) -> None:
        if is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    final: dict = {"step": start}
    t_start = time.perf_counter()
    tokens_seen = 0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               disable=not (cfg.progress and is_main), dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss_sum, step_tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            x, y = batch_fn(step, _generator(cfg.seed, step, rank, micro))
            x, y = x.to(device), y.to(device)
            sync = world == 1 or micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else train_model.no_sync():
                loss = lm_loss(train_model, x, y, cfg.bf16)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
            step_tokens += int((y != -100).sum())
        loss_value = loss_sum / cfg.grad_accum
        if world > 1:
            buf = torch.tensor([loss_value, float(step_tokens)], dtype=torch.float64, device=device)
            dist.all_reduce(buf)
            loss_value, step_tokens = buf[0].item() / world, int(buf[1].item())
        if not math.isfinite(loss_value):
            raise ConfigError(f"loss became {loss_value} at step {step + 1}", "lower --lr or enable clipping")
        # max_norm = inf measures the norm without clipping.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        opt.step()
        done = step + 1
        dt = time.perf_counter() - t0
        tokens_seen += step_tokens
        final.update(step=done, loss=loss_value)
        if done % cfg.log_every == 0 or done == cfg.steps:
            log({"step": done, "loss": loss_value, "lr": opt.param_groups[0]["lr"],
                 "grad_norm": float(grad_norm), "tokens_per_s": step_tokens / max(dt, 1e-9),
                 "elapsed_s": time.perf_counter() - t_start})
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if val_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            val_loss = evaluate_loss(model, val_batches, cfg.bf16)
            final.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
            log({"step": done, "val_loss": val_loss, "val_ppl": final["val_ppl"]})
        if is_main and ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
            save_checkpoint(out_dir, done, model, opt, cfg, extra)
    bar.close()
    final.update(tokens=tokens_seen, wall_s=time.perf_counter() - t_start)
    if is_main:
        from mulfree.models.io import save_model

        save_model(model, out_dir, tokenizer)
    if world > 1:
        dist.barrier()
    return final

