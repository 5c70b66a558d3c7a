"""Train and evaluate small LMs on arithmetic: batches whose loss covers only what the model must produce
(`output_mask`: the answer, or in `interleaved` only the output digits between the given operand digits) for
`mulfree.train.train`, batched greedy decoding through the model's state (KV cache or recurrent state; given
answer characters are fed, not generated), exact-match and per-digit accuracy per operand length, and the
lengths × formats heatmap.

Models (`ARITH_MODELS`): the registry's families plus `bitnet`, the Transformer++ with every projection and
the head a ternary BitLinear (`TransformerConfig.bitlinear`; its config.json says model_type transformerpp).
A trained directory holds the model (`mulfree.models.io`), `chartok.json` and `arith.json` (the task).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mulfree.data.arithmetic import (
    GIVEN_IN_ANSWER,
    ArithTask,
    digit_accuracy,
    format_chars,
    held_out_problems,
    make_test_set,
    output_mask,
    parse_answer,
    split_line,
)
from mulfree.data.chartok import ARITH_CHARS, CharTokenizer
from mulfree.errors import CheckpointError, ConfigError, MulfreeError
from mulfree.models import registry
from mulfree.settings import ArithConfig, ArithEvalConfig

if TYPE_CHECKING:
    from mulfree.train import TrainConfig

TASK_FILE = "arith.json"
RESULTS_FILE = "arith_eval.json"
# The `arith` size: d=128, 4 layers, GLU width 512 -> ~1.05M parameters (vocab 21); 4 heads where
# the family has attention heads.
ARITH_SIZE = {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 512, "max_position_embeddings": 512}
ARITH_HEADS = 4
# `mulfree arith --model` name -> (model family, config overrides)
ARITH_MODELS: dict[str, tuple[str, dict]] = {
    **{name: (name, {}) for name in registry.NAMES},
    "bitnet": ("transformerpp", {"bitlinear": True}),
}


def arith_model(kind: str) -> tuple[str, dict]:
    """(model family, config overrides) of an arith model name (old family aliases accepted)."""
    name = registry.canonical(kind)
    if name not in ARITH_MODELS:
        raise ConfigError(f"unknown arithmetic model {kind!r}", f"use one of {', '.join(ARITH_MODELS)}")
    return ARITH_MODELS[name]


def tokenizer_for(fmt: str) -> CharTokenizer:
    """The character tokenizer of a format: the arithmetic characters plus the format's own (index hints)."""
    return CharTokenizer(ARITH_CHARS + format_chars(fmt))


def model_config(kind: str, vocab_size: int, preset: str = "arith", **overrides):
    """Config of the arith model `kind` (a registry family or `bitnet`): the `arith` size or any model
    preset / config .json of its family, with our vocab."""
    family, extra = arith_model(kind)
    cls = registry.get(family).config_cls
    fields = {"vocab_size": vocab_size, **extra, **overrides}
    if preset == "arith":
        has_heads = any(f.name == "num_attention_heads" for f in dataclasses.fields(cls))
        heads = {"num_attention_heads": ARITH_HEADS} if has_heads else {}
        return cls.from_preset("tiny", **{**ARITH_SIZE, **heads, **fields})
    return cls.from_name_or_file(preset, **fields)


def build_model(kind: str, vocab_size: int, preset: str = "arith", seed: int = 0, **overrides) -> nn.Module:
    """A freshly initialised model (deterministic for a given seed)."""
    cfg = model_config(kind, vocab_size, preset, **overrides)
    torch.manual_seed(seed)
    return registry.get(arith_model(kind)[0]).model_cls(cfg)


def encode_line(tok: CharTokenizer, line: str, fmt: str = "plain") -> tuple[list[int], list[bool]]:
    """Ids of bos + line + eos, and one flag per target (ids[1:]): True where the model produces it
    (`output_mask`; for every format but `interleaved`: the answer and eos)."""
    return tok.encode(line, bos=True, eos=True), output_mask(line, fmt)


def collate(
    encoded: Sequence[tuple[list[int], Sequence[bool] | int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T] and y [B, T] = x shifted by one, with -100 wherever the target is given (prompt, given answer
    characters) or padding. Each item is (ids, flags per target) or (ids, number of prompt ids)."""
    T = max(len(ids) for ids, _ in encoded) - 1
    x = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    y = torch.full((len(encoded), T), -100, dtype=torch.long)
    for i, (ids, produced) in enumerate(encoded):
        seq = torch.tensor(ids)
        if isinstance(produced, int):
            produced = [j >= produced - 1 for j in range(len(ids) - 1)]
        x[i, : len(ids) - 1] = seq[:-1]
        y[i, : len(ids) - 1] = torch.where(torch.tensor(produced, dtype=torch.bool), seq[1:], -100)
    return x, y


def make_batch_fn(task: ArithTask, tok: CharTokenizer, batch_size: int):
    """`(step, generator) -> (x, y)`: fresh balanced problems each step, loss on what the model produces."""

    def batch_fn(step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
        lines = [task.line(*task.sample(rng), rng=rng) for _ in range(batch_size)]
        return collate([encode_line(tok, line, task.fmt) for line in lines], tok.pad_id)

    return batch_fn


@torch.no_grad()
def greedy_complete(
    model: nn.Module, tok: CharTokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 256
) -> list[str]:
    """Greedy completions of `prompts` (text after the prompt, up to eos), decoding one token at a time
    through the model's returned state; prompts of equal token length share a batch."""
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(prompts)
    groups: dict[int, list[int]] = defaultdict(list)
    encoded = [tok.encode(p, bos=True) for p in prompts]
    for i, ids in enumerate(encoded):
        groups[len(ids)].append(i)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk])
            logits, state = model(ids)
            generated = []
            done = torch.zeros(len(chunk), dtype=torch.bool)
            for _ in range(max_new_tokens):
                nxt = logits[:, -1].argmax(-1)
                generated.append(nxt)
                done |= nxt == tok.eos_id
                if bool(done.all()):
                    break
                logits, state = model(nxt[:, None], state)
            gen = torch.stack(generated, dim=1)
            for row, i in enumerate(chunk):
                out[i] = tok.decode(gen[row])
    model.train(was_training)
    return out


@torch.no_grad()
def forced_complete(
    model: nn.Module, tok: CharTokenizer, lines: Sequence[str], fmt: str, batch_size: int = 256
) -> list[str]:
    """Answers of whole `lines` in which the model writes only the characters `output_mask` marks as
    produced, greedily, while the given ones (prompt, interleaved operand digits) are fed from the line:
    the model's own earlier outputs (not the true ones) stay in its state. Each run of given characters
    goes in one forward call with the state; lines of the same shape share a batch."""
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(lines)
    groups: dict[tuple, list[int]] = defaultdict(list)
    encoded = [tok.encode(line, bos=True) for line in lines]
    for i, line in enumerate(lines):
        flags = output_mask(line, fmt)[:-1]  # the end is never produced where characters are given
        groups[(len(split_line(line)[0]) + 1, tuple(flags))].append(i)
    for (n_prompt, flags), idx in groups.items():
        spots = [t + 1 for t, produced in enumerate(flags) if produced]  # ids positions the model writes
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk])
            if spots:
                logits, state = model(ids[:, : spots[0]])
                for k, t in enumerate(spots):
                    ids[:, t] = logits[:, -1].argmax(-1)
                    if k + 1 < len(spots):
                        logits, state = model(ids[:, t : spots[k + 1]], state)
            for row, i in enumerate(chunk):
                out[i] = tok.decode(ids[row, n_prompt:])
    model.train(was_training)
    return out


@dataclass
class LengthResult:
    """Accuracy on the problems of one operand length."""

    digits: int
    n: int
    exact: float
    per_digit: float
    malformed: int


def evaluate_task(
    model: nn.Module, tok: CharTokenizer, task: ArithTask, test_set: dict[int, list[tuple[int, int]]]
) -> list[LengthResult]:
    """Exact match and per-digit accuracy per operand length; malformed answers count as wrong."""
    results = []
    for n, problems in sorted(test_set.items()):
        lines = [task.line(a, b, rng=random.Random(k)) for k, (a, b) in enumerate(problems)]
        if task.fmt in GIVEN_IN_ANSWER:
            completions = forced_complete(model, tok, lines, task.fmt)
        else:
            prompts = [split_line(line)[0] for line in lines]
            completions = greedy_complete(model, tok, prompts, 2 * max(len(line) for line in lines) + 4)
        exact = per_digit = 0.0
        malformed = 0
        for (a, b), text in zip(problems, completions):
            target = a + b if task.op == "add" else a * b
            pred = parse_answer(text, task.fmt)
            malformed += pred is None
            exact += pred == target
            per_digit += digit_accuracy(pred, target)
        k = len(problems)
        results.append(LengthResult(n, k, exact / k, per_digit / k, malformed))
    return results


def format_table(rows: dict[str, list[LengthResult]]) -> str:
    """A text table: one row per run label, exact-match % (per-digit %) per operand length."""
    lengths = sorted({r.digits for res in rows.values() for r in res})
    width = max([len(k) for k in rows] + [5])
    head = f"{'run':<{width}} " + " ".join(f"{f'{n}-digit':>13}" for n in lengths)
    lines = [head, "-" * len(head)]
    for label, res in rows.items():
        by_n = {r.digits: r for r in res}
        cells = [f"{100 * by_n[n].exact:5.1f} ({100 * by_n[n].per_digit:5.1f})" if n in by_n else f"{'-':>13}"
                 for n in lengths]
        lines.append(f"{label:<{width}} " + " ".join(f"{c:>13}" for c in cells))
    lines.append("cells: exact match % (per-digit %)")
    return "\n".join(lines)


def plot_heatmap(rows: dict[str, list[LengthResult]], path: str | Path, title: str = "exact match") -> Path:
    """Heatmap PNG of exact match: runs (formats) × operand lengths, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mulfree.atomic import atomic_write

    lengths = sorted({r.digits for res in rows.values() for r in res})
    grid = [[next((100 * r.exact for r in res if r.digits == n), float("nan")) for n in lengths]
            for res in rows.values()]
    label_width = 0.09 * max(len(k) for k in rows)
    fig, ax = plt.subplots(figsize=(2.4 + label_width + 0.9 * len(lengths), 1.4 + 0.5 * len(rows)))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xlabel("operand digits")
    ax.set_title(title)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="%")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def save_task(out_dir: Path, task: ArithTask, kind: str, test_seed: int, test_per_length: int) -> None:
    """Write arith.json (task, model kind and how the held-out test set was drawn)."""
    from mulfree.atomic import atomic_write_text

    meta = {"op": task.op, "fmt": task.fmt, "digits": task.digits, "width": task.width, "model": kind,
            "test_seed": test_seed, "test_per_length": test_per_length}
    atomic_write_text(Path(out_dir) / TASK_FILE, json.dumps(meta, indent=2) + "\n")


def load_run(model_dir: str | Path) -> tuple[nn.Module, CharTokenizer, ArithTask, dict]:
    """Model, tokenizer, task and metadata of a directory written by `train_arith`."""
    from mulfree.models.io import load_model

    path = Path(model_dir) / TASK_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing", "pass a directory written by `mulfree arith train`")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise TypeError(f"a JSON object is needed, not {type(meta).__name__}")
        ArithConfig(meta["digits"], meta["width"], meta.get("test_per_length", 200))
        ArithEvalConfig(seed=meta.get("test_seed", 1234))
        task = ArithTask(meta["op"], meta["fmt"], meta["digits"], meta["width"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, MulfreeError) as exc:
        what = exc.what if isinstance(exc, MulfreeError) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{path} is malformed ({what})", "retrain with `mulfree arith train`") from None
    model, _ = load_model(model_dir)
    return model, CharTokenizer.load(model_dir), task, meta


def train_arith(
    task: ArithTask,
    kind: str,
    out_dir: str | Path,
    train_cfg: TrainConfig,
    preset: str = "arith",
    eval_lengths: Sequence[int] | None = None,
    test_per_length: int = 200,
    test_seed: int = 1234,
    overwrite: bool = False,
    cpu_budget_s: float | None = None,
) -> tuple[nn.Module, list[LengthResult], dict]:
    """Train a fresh `kind` model (`ARITH_MODELS`) on `task` (test problems of lengths 1..digits held out),
    save it and evaluate on lengths `eval_lengths` (default 1..digits+3); returns (model, results, train
    metrics). `cpu_budget_s` stops training once the process has used that much CPU time (see `train`).

    The whole directory is built beside `out_dir` and renamed into place when complete; an `out_dir` that
    is not empty is replaced only with `overwrite` (and kept until then). Without a CPU budget the build dir is
    named by the settings and kept when the run is interrupted: the same call continues from its last checkpoint
    (`train_cfg.save_every`) to the same model."""
    from mulfree.atomic import atomic_dir, prepare_output
    from mulfree.checkpoint import CHECKPOINT_POINTER
    from mulfree.train import train

    kind = registry.canonical(kind)
    arith_model(kind)
    out_dir = prepare_output(out_dir, "arithmetic run", overwrite)
    tok = tokenizer_for(task.fmt)
    lengths = list(eval_lengths or range(1, task.digits + 4))
    settings = [task.op, task.fmt, task.digits, task.width, sorted(task.held_out), kind, train_cfg.to_dict(), preset,
                lengths, test_per_length, test_seed]
    key = None if cpu_budget_s is not None else hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:8]
    test_set = make_test_set(task.op, lengths, test_per_length, seed=test_seed)
    task = ArithTask(task.op, task.fmt, task.digits, task.width,
                     held_out=held_out_problems({n: p for n, p in test_set.items() if n <= task.digits}))
    model = build_model(kind, tok.vocab_size, preset, seed=train_cfg.seed)
    batch_fn = make_batch_fn(task, tok, train_cfg.batch_size)
    with atomic_dir(out_dir, overwrite, kind="arithmetic run", resume_key=key) as tmp:
        resume = (tmp / CHECKPOINT_POINTER).is_file()
        try:
            metrics = train(model, None, None, train_cfg, tmp, resume=resume, batch_fn=batch_fn,
                            val_batch_fn=batch_fn, cpu_budget_s=cpu_budget_s)
        except BaseException:
            if key is not None and (tmp / CHECKPOINT_POINTER).is_file():
                print(f"\nthe run is kept in {tmp} at its last checkpoint; the same command continues from there",
                      file=sys.stderr)
            raise
        tok.save(tmp)
        save_task(tmp, task, kind, test_seed, test_per_length)
        results = evaluate_task(model, tok, task, test_set)
        write_results(tmp, results)
    return model, results, metrics


def read_results(model_dir: str | Path) -> list[LengthResult]:
    """The results `train_arith` stored in arith_eval.json."""
    path = Path(model_dir) / RESULTS_FILE
    try:
        return [LengthResult(**r) for r in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc})", "evaluate without --saved") from None


def write_results(out_dir: str | Path, results: list[LengthResult]) -> Path:
    """Write arith_eval.json (one record per operand length) atomically."""
    from mulfree.atomic import atomic_write_json

    path = Path(out_dir) / RESULTS_FILE
    atomic_write_json(path, [asdict(r) for r in results])
    return path
