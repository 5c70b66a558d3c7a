"""Training loop for our causal LMs: AdamW, warmup + cosine LR, clipping, accumulation, optional bf16
autocast, periodic validation, atomic safetensors checkpoints and exact `resume`; single process or
torchrun DDP or FSDP2 (`--fsdp`; gloo on CPU, nccl on GPU).

Batches are a pure function of (seed, step, global micro-step rank * grad_accum + micro), so a resumed run
sees exactly the data an uninterrupted run would, and together with the restored optimizer state gives
identical losses; W processes with A micro-steps see the batches of one process with W * A micro-steps.
Checkpoints and the rules of which directory a run may use live in `mulfree.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from mulfree.atomic import (
    atomic_write_text,
    describe_dir,
    exclusive,
    make_dir,
    remove_stale_temps,
    replace_dir,
    shown_name,
)
from mulfree.checkpoint import (  # noqa: F401  (checkpoint_state, CHECKPOINT_POINTER: re-exported)
    CHECKPOINT_POINTER,
    METRICS_FILE,
    TRAIN_CONFIG_FILE,
    append_metrics,
    check_run_dir,
    checkpoint_state,
    clear_unstarted_run,
    gather_full_state,
    is_unstarted_run,
    load_checkpoint,
    remove_other_checkpoints,
    save_checkpoint,
    truncate_metrics,
)
from mulfree.errors import ConfigError, DataError
from mulfree.evaluate import model_logits
from mulfree.integrity import digest_bytes
from mulfree.models.schema import available_memory
from mulfree.nn.fused import set_fused
from mulfree.settings import TrainConfig, check_device
from mulfree.threads import ThreadTuner

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


# ---------------------------------------------------------------- memory


def _available_bytes(device: torch.device) -> int | None:
    """Free memory of the device (CUDA) or what this process may still allocate on the host; None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory()


def check_memory(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, shards: int = 1) -> None:
    """Refuse (one line) a step whose rough size (weights + AdamW state, split over `shards` FSDP ranks, +
    logits and activations of one micro-batch) exceeds the memory available, before anything is allocated."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", 0) or 0
    width = (getattr(config, "hidden_size", 0) or 0) * (getattr(config, "num_hidden_layers", 1) or 1)
    tokens = cfg.batch_size * cfg.seq_len
    need = 16 * sum(p.numel() for p in model.parameters()) // shards + tokens * (12 * vocab + 48 * width)
    available = _available_bytes(device)
    if available is not None and need > available:
        raise ConfigError(f"a training step needs about {need / 2**30:.1f} GiB (--batch-size {cfg.batch_size} x "
                          f"--seq-len {cfg.seq_len}, vocab {vocab}) but {available / 2**30:.1f} GiB is available",
                          "lower --batch-size or --seq-len (use --grad-accum for a larger effective batch)")


# ---------------------------------------------------------------- distributed


def _dist_setup(device: str) -> tuple[int, int]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        if device.startswith("cuda"):  # one GPU per process, before NCCL picks one
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _shard(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """FSDP2: `fully_shard` each decoder block (`model.model.layers`), then the root (embeddings, final
    norm, head), over all `world` ranks; the parameters become DTensor shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in getattr(getattr(model, "model", None), "layers", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


@contextlib.contextmanager
def _micro_step(train_model: torch.nn.Module, sync: bool, sharded: bool):
    """The context of one micro-step's forward and backward: gradients are reduced over the ranks only when `sync`."""
    if not sharded:
        with contextlib.nullcontext() if sync else train_model.no_sync():
            yield
        return
    train_model.set_requires_gradient_sync(sync)  # off: unsharded gradients accumulate locally
    with warnings.catch_warnings():
        # Our models may return views (the fused kernels' logits, recurrent state slices); FSDP2 warns of
        # in-place ops on them, and the loss makes none.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        yield


class _GatheredModel:
    """What `save_model` reads of a model (`config`, `state_dict()`), holding a sharded model's full weights."""

    def __init__(self, config, weights: dict[str, torch.Tensor]):
        self.config, self._weights = config, weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._weights


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


def _token_digest(ids: torch.Tensor | None) -> str | None:
    """Content fingerprint of a training token stream (a resumed run must see the same data)."""
    return None if ids is None else digest_bytes(ids.detach().cpu().contiguous().numpy().tobytes())


def _prepare_run(out_dir: Path, resume: bool, overwrite: bool, is_main: bool) -> Path:
    """The directory to train in: `out_dir` itself, or for `overwrite` of a non-empty dir a temporary
    sibling that replaces it once the new run is complete (the old run stays until then)."""
    build = out_dir
    replacing = not resume and overwrite and describe_dir(out_dir) is not None and not is_unstarted_run(out_dir)
    if replacing and is_main:
        make_dir(out_dir.parent)
        remove_stale_temps(out_dir.parent, names={out_dir.name})  # an earlier replacement that was killed
        build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    if is_main:
        make_dir(build)
        if resume:
            remove_stale_temps(build)
        elif is_unstarted_run(build):
            clear_unstarted_run(build)
    return build


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
    cpu_budget_s: float | None = None,
    stop_event: threading.Event | None = None,
) -> dict:
    """Train `model` in place and save it to `out_dir` with `mulfree.models.io.save_model`.

    Args:
        train_ids: 1-D token stream sampled in random windows (unused when `batch_fn` is given).
        val_ids: 1-D token stream for validation loss (or None; `val_batch_fn` is an alternative).
        batch_fn: `(step, generator) -> (x [B, T], y [B, T])` supplying custom micro-batches; y may
            hold -100 (ignored). The generator is seeded from (seed, step, 0, rank * grad_accum + micro).
        resume: continue the run saved in `out_dir` exactly (same data order, optimizer, RNG); the
            token stream must be the one the run started with.
        overwrite: replace what `out_dir` holds; the old contents stay until the new run is complete.
        extra: JSON-able facts stored in every checkpoint (e.g. the data paths, for the CLI's resume).
        cpu_budget_s: stop after the step at which this process's CPU time (time.process_time, all its
            threads) since the loop began reaches this many seconds; the model is saved as at the end.
            Single-process runs only (DDP ranks would not agree on the step).
        stop_event: set by another thread (runs side by side), it ends the run after the current step with
            KeyboardInterrupt, as Ctrl-C would end it.
    Returns:
        final metrics: step, loss, val_loss, val_ppl (when validated), tokens, wall_s, cpu_s.
    Raises:
        ConfigError: on a non-finite loss or gradient (the last checkpoint stays), or settings the
            machine cannot run (no CUDA, a step beyond the available memory).
    """
    out_dir = Path(out_dir)
    if batch_fn is None and train_ids is None:
        raise DataError("no training data", "pass train_ids or batch_fn")
    check_device(cfg.device)
    check_run_dir(out_dir, resume, overwrite)
    set_fused(cfg.fused)
    rank, world = _dist_setup(cfg.device)
    if world > 1:
        check_run_dir(out_dir, resume, overwrite)
        dist.barrier()  # every rank checked the dir before rank 0 writes into it
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cfg.device == "cuda" and world > 1
                          else cfg.device)
    sharded = cfg.fsdp and world > 1  # --fsdp in one process: plain training
    check_memory(model, cfg, device, world if sharded else 1)
    is_main = rank == 0
    with exclusive(out_dir, "training run") if is_main else contextlib.nullcontext():
        run_dir = _prepare_run(out_dir, resume, overwrite, is_main)
        data_digest = _token_digest(train_ids) if batch_fn is None else None
        extra = {**(extra or {}), "train_tokens": data_digest} if data_digest else extra

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
        if sharded:
            _shard(model, device, world)  # before the optimizer, which must hold the shards
        # fused: one vectorized pass over each parameter (CPU and GPU) instead of six element-wise ops per tensor
        opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                fused=True)
        start = 0
        metrics_path = run_dir / METRICS_FILE
        if resume:
            start, state = load_checkpoint(run_dir, model, opt)  # collective when sharded
            saved_digest = state.get("extra", {}).get("train_tokens")
            if data_digest and saved_digest and saved_digest != data_digest:
                raise DataError(f"the training data differs from the data the run in '{out_dir}' started with",
                                "resume with the same --data (or leave --data out to reuse it)")
            if is_main:
                remove_other_checkpoints(run_dir, f"ckpt-{start}")
                torn = truncate_metrics(metrics_path, start)
                if torn:
                    print(f"dropped {torn} unreadable line(s) of {metrics_path} (a write cut off by a kill)",
                          file=sys.stderr)
        if is_main:
            atomic_write_text(run_dir / TRAIN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2))
            if tokenizer is not None:
                from mulfree.data.text import save_tokenizer

                save_tokenizer(tokenizer, run_dir)

        train_model = model
        if world > 1:
            dist.barrier()
        if world > 1 and not sharded:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            train_model = torch.compile(train_model)

        def log(record: dict) -> None:
            if is_main:
                append_metrics(metrics_path, record)

        def stop(what: str, value: float, step: int) -> ConfigError:
            kept = (f"the last good checkpoint (step {last_saved}) stays in '{out_dir}'" if last_saved is not None and
                    run_dir == out_dir else "no checkpoint was written")
            return ConfigError(f"{what} became {value} at step {step}; training stopped, {kept}",
                               "lower --lr, set --grad-clip or check the data, then start again (or --resume)")

        last_saved = start if resume else None
        final: dict = {"step": start}
        t_start, cpu_start = time.perf_counter(), time.process_time()
        tokens_seen = 0
        torch_threads = torch.get_num_threads()
        tuner = None
        if device.type == "cpu" and cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif device.type == "cpu":
            tuner = ThreadTuner(torch_threads)
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {shown_name(out_dir)}",
                   disable=not (cfg.progress and is_main), dynamic_ncols=True)
        try:
            for step in bar:
                if tuner is not None:
                    tuner.before(step)
                t0 = time.perf_counter()
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, cfg)
                opt.zero_grad(set_to_none=True)
                loss_sum, step_tokens = 0.0, 0
                for micro in range(cfg.grad_accum):
                    # Keyed on the global micro-step: rank 0 (and a single process) keeps the keys (step, 0, micro).
                    x, y = batch_fn(step, _generator(cfg.seed, step, 0, rank * cfg.grad_accum + micro))
                    x, y = x.to(device), y.to(device)
                    sync = world == 1 or micro == cfg.grad_accum - 1
                    with _micro_step(train_model, sync, sharded):
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
                    raise stop("loss", loss_value, step + 1)
                # max_norm = inf measures the norm without clipping; on DTensor shards the norm is the global one.
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf))
                if not math.isfinite(grad_norm):
                    raise stop("gradient norm", grad_norm, step + 1)
                opt.step()
                done = step + 1
                dt = time.perf_counter() - t0
                if tuner is not None:
                    tuner.after(step, dt)
                tokens_seen += step_tokens
                final.update(step=done, loss=loss_value)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    log({"step": done, "loss": loss_value, "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm,
                         "tokens_per_s": step_tokens / max(dt, 1e-9), "elapsed_s": time.perf_counter() - t_start})
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
                if val_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                    val_loss = evaluate_loss(model, val_batches, cfg.bf16)
                    final.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
                    log({"step": done, "val_loss": val_loss, "val_ppl": final["val_ppl"]})
                if (is_main or sharded) and ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
                    save_checkpoint(run_dir, done, model, opt, cfg, extra)  # sharded: every rank gathers, rank 0 writes
                    last_saved = done
                if cpu_budget_s is not None and time.process_time() - cpu_start >= cpu_budget_s:
                    break
                if stop_event is not None and stop_event.is_set():
                    raise KeyboardInterrupt
            bar.close()
            final.update(tokens=tokens_seen, wall_s=time.perf_counter() - t_start,
                         cpu_s=time.process_time() - cpu_start)
            weights = gather_full_state(model)[0] if sharded else None  # collective
            if is_main:
                from mulfree.models.io import save_model

                save_model(model if weights is None else _GatheredModel(model.config, weights), run_dir, tokenizer)
                if run_dir != out_dir:
                    replace_dir(run_dir, out_dir, overwrite=True, kind="training run")
        finally:
            torch.set_num_threads(torch_threads)
            if is_main and run_dir != out_dir and run_dir.exists():
                shutil.rmtree(run_dir, ignore_errors=True)  # a replacing run that did not finish: the old stays
        if world > 1:
            dist.barrier()
        return final
