"""Run settings of the commands as dataclasses: defaults, one-line checks (ConfigError) on
construction, and a `help` per field from which `mulfree.commands.flags` makes each command's flags.

Every field is checked by `check_fields` against its type and its metadata bounds (`min`, `max`
inclusive; `gt`, `lt` exclusive; floats must be finite unless `finite: False`; ints fit in int64 and a
field named `seed` in [0, 2**63 - 1]), so `--lr inf`, `--grad-clip -1` or `--seed 2**70` from a flag or a
JSON config end as one line. Kept free of torch so that building the CLI parser (and `--help`) stays
fast; `mulfree.train.TrainConfig` is the same class.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mulfree.errors import ConfigError

INT64_MAX = 2**63 - 1
MAX_BATCH_TOKENS = 2**26  # tokens of one micro-batch (batch_size x seq_len); far beyond any CPU's memory


def _opt(default, help: str, **meta):
    """A field with the help text of its flag (for a default-True bool: of its `--no-` flag) and its bounds."""
    return field(default=default, metadata={"help": help, **meta})


def flag_name(f: dataclasses.Field) -> str:
    """The command-line name of a field (`metadata["flag"]` or `--kebab-name`)."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _bound_text(meta: typing.Mapping[str, Any], is_int: bool) -> str:
    """'positive', '>= 0', '< 1', 'in (0, 1]': the bounds in `meta` as words."""
    lo = ("[", meta["min"]) if "min" in meta else ("(", meta["gt"]) if "gt" in meta else None
    hi = ("]", meta["max"]) if "max" in meta else (")", meta["lt"]) if "lt" in meta else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return "positive" if is_int and lo == ("[", 1) else f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    return f"{'<=' if hi[0] == ']' else '<'} {hi[1]}" if hi else ""


def _in_range(value: float, meta: typing.Mapping[str, Any]) -> bool:
    return not (("min" in meta and value < meta["min"]) or ("max" in meta and value > meta["max"])
                or ("gt" in meta and value <= meta["gt"]) or ("lt" in meta and value >= meta["lt"]))


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _check_value(label: str, value: Any, tp: Any, meta: typing.Mapping[str, Any], seed: bool) -> None:
    """One-line ConfigError when `value` is not of type `tp` or outside the bounds in `meta`."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{label} must be one of {list(typing.get_args(tp))}, got {value!r}", "pick one of them")
        return
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{label} must be a list, got {value!r}", f"pass one or more values to {label}")
        item = typing.get_args(tp)[0] if typing.get_args(tp) else str
        for v in value:
            _check_value(label, v, unwrap_optional(item)[0], meta, seed)
        return
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool)) if isinstance(tp, type) else True
    if not ok:
        raise ConfigError(f"{label} must be {_type_name(tp)}, got {value!r}", f"pass {_type_name(tp)} to {label}")
    if tp is float and meta.get("finite", True) and not _finite(value):
        raise ConfigError(f"{label} must be a finite number, got {value}", f"pass a finite {label}")
    if tp not in (int, float):
        return
    limits = {"min": 0 if seed else -INT64_MAX, "max": INT64_MAX} if tp is int else {}
    full = {**limits, **meta}
    for keys in (("min", "gt"), ("max", "lt")):
        side = {k: full[k] for k in keys if k in full}
        if _in_range(value, side):
            continue
        if "hint" in meta:
            hint = meta["hint"]
        elif seed:
            hint = "pass a seed in [0, 2**63 - 1]"
        elif any(k in meta for k in keys):
            text = _bound_text({k: v for k, v in full.items() if k in meta}, tp is int)
            hint = f"pass a positive {label}" if text == "positive" else f"pass a value {text}"
        else:
            hint = "pass a value that fits in a signed 64-bit integer"
        raise ConfigError(f"{label} must be {_bound_text(side, tp is int)}, got {value}", hint)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def check_fields(obj: Any) -> None:
    """Check every init field of the dataclass instance `obj` against its annotation and metadata bounds;
    raises a one-line ConfigError naming the flag. Called by the settings classes below on construction
    and by `commands.flags.from_args` for every settings class."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        if not f.init or f.name not in hints:
            continue
        value = getattr(obj, f.name)
        tp, optional = unwrap_optional(hints[f.name])
        if value is None and optional:
            continue
        if tp is Any:
            continue
        _check_value(flag_name(f), value, tp, f.metadata, f.name == "seed")


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass
class TrainConfig:
    """Run settings (not model settings). Defaults suit the tiny preset on a CPU; each field is also a
    `mulfree train` flag (see `mulfree.commands.flags`)."""

    steps: int = _opt(1000, "optimizer steps", min=1)
    batch_size: int = _opt(16, "sequences per micro-batch per process", min=1, max=2**20)
    seq_len: int = _opt(128, "tokens per sequence", min=1, max=2**20)
    lr: float = _opt(3e-3, "peak learning rate (ternary models want ~3x the LR of a float model)", gt=0)
    min_lr: float = _opt(3e-4, "final learning rate of the cosine decay", min=0)
    warmup: int = _opt(100, "linear warmup steps", min=0)
    weight_decay: float = _opt(0.01, "AdamW weight decay", min=0)
    beta1: float = _opt(0.9, "AdamW beta1", min=0, lt=1)
    beta2: float = _opt(0.95, "AdamW beta2", min=0, lt=1)
    grad_clip: float = _opt(1.0, "max gradient norm (0: off)", min=0)
    grad_accum: int = _opt(1, "micro-batches per optimizer step", min=1, max=2**20)
    eval_every: int = _opt(100, "validate every N steps (0: only at the end)", min=0)
    eval_batches: int = _opt(8, "validation batches per evaluation", min=1, max=2**16)
    save_every: int = _opt(200, "checkpoint every N steps (0: only at the end)", min=0)
    log_every: int = _opt(1, "write a metrics record every N steps", min=1)
    bf16: bool = _opt(False, "bfloat16 autocast")
    fsdp: bool = _opt(False, "shard parameters, gradients and optimizer state over the torchrun processes (FSDP2) "
                      "instead of DDP; a no-op in a single process")
    compile: bool = _opt(False, "torch.compile the training forward (on a GPU it fuses the element-wise ops around "
                         "the Triton kernels; the first steps are slow while it compiles)")
    fused: bool = _opt(True, "unfused torch ops instead of the fused CPU kernels (to compare memory and speed)")
    seed: int = _opt(0, "seed for init, data order and sampling")
    device: str = _opt("cpu", "cpu or cuda")
    threads: int = _opt(0, "torch CPU threads (0: re-chosen every 50 steps by measured step time, up to torch's "
                        "default, so a busy core does not stall training)", min=0, max=4096)
    progress: bool = _opt(True, "no progress bar")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.min_lr > self.lr:
            raise ConfigError(f"need min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}", "fix --lr / --min-lr")
        if self.batch_size * self.seq_len > MAX_BATCH_TOKENS:
            raise ConfigError(f"a micro-batch of --batch-size {self.batch_size} x --seq-len {self.seq_len} tokens "
                              f"exceeds {MAX_BATCH_TOKENS:,} tokens",
                              "lower --batch-size and use --grad-accum for a larger effective batch")
        if not _DEVICE.match(self.device):
            raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}", "pass --device cpu")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"train settings must be a JSON object, got {type(d).__name__}",
                              "write them as {\"steps\": 100, ...}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown train settings {unknown}", f"valid settings: {sorted(known)}")
        return cls(**d)


def check_device(device: str) -> None:
    """One-line ConfigError when `device` names a CUDA device this machine does not have."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"CUDA is not available on this machine (--device {device})", "pass --device cpu")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                          "pass --device cuda:0 or cpu")


MAX_NEW_TOKENS = 2**24


def check_max_new_tokens(max_new_tokens: int) -> None:
    """The one check of a generation length (CLI flag and library call alike)."""
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}", "pass 0 or a positive count")
    if max_new_tokens > MAX_NEW_TOKENS:
        raise ConfigError(f"--max-new-tokens must be <= {MAX_NEW_TOKENS}, got {max_new_tokens}", "generate less")


@dataclass
class GenerationConfig:
    """How `mulfree generate` extends a prompt; validated on construction (one-line ConfigError)."""

    max_new_tokens: int = _opt(100, "tokens to generate", min=0, max=MAX_NEW_TOKENS)
    temperature: float = _opt(0.8, "0 = greedy", min=0, hint="use 0 for greedy decoding")
    top_k: int | None = _opt(None, "sample from the k most likely tokens", min=0, max=2**31 - 1)
    top_p: float | None = _opt(None, "nucleus sampling mass in (0, 1]", gt=0, max=1, hint="use e.g. 0.9")
    seed: int = _opt(0, "sampling seed")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class PerplexityConfig:
    """How `mulfree eval` windows the text; validated on construction (one-line ConfigError)."""

    window: int = _opt(256, "tokens per window", min=2, max=2**20, hint="use e.g. 256")
    stride: int | None = _opt(None, "window stride (default: the window)", min=1)
    max_tokens: int = _opt(65536, "score at most this many tokens (0: all)", min=0, hint="use 0 for all tokens")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.stride is not None and self.stride > self.window:
            raise ConfigError(f"--stride must be in (0, window], got {self.stride}", "use e.g. half the window")


@dataclass
class TokenizeConfig:
    """How `mulfree tokenize` shards a corpus; validated on construction (one-line ConfigError)."""

    shard_tokens: int = _opt(1 << 26, "tokens per shard file (a shard closes at the next document or piece end)",
                             min=1, max=2**40)
    vocab_size: int = _opt(4096, "BPE vocabulary trained on the first 8 MiB when no --tokenizer is given",
                           min=257, max=2**20)
    progress: bool = _opt(True, "no progress bar")

    def __post_init__(self) -> None:
        check_fields(self)


MAX_DIGITS = 100  # longest operand of `mulfree arith` (train, test lengths, padding width)
MAX_TEST_PROBLEMS = 100_000  # test problems per operand length


@dataclass
class ArithConfig:
    """Task size of `mulfree arith train` (saved in arith.json); `--digits` below 1 is refused by
    `mulfree.data.arithmetic.check_digits`."""

    digits: int = _opt(3, "longest training operand", max=MAX_DIGITS)
    width: int | None = _opt(None, "padding width of the padded formats (default: --digits)", min=1, max=MAX_DIGITS)
    test_per_length: int = _opt(200, "test problems per length", min=1, max=MAX_TEST_PROBLEMS)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class ArithEvalConfig:
    """How `mulfree arith eval` draws its test problems."""

    per_length: int | None = _opt(None, "test problems per length (default: as in training)", min=1,
                                  max=MAX_TEST_PROBLEMS)
    seed: int | None = _opt(None, "seed of the test problems (default: the training one)")

    def __post_init__(self) -> None:
        check_fields(self)
