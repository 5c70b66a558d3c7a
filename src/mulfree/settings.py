"""Run settings of the commands as dataclasses: defaults, one-line checks (ConfigError) on
construction, and a `help` per field from which `mulfree.commands.flags` makes each command's flags.

Kept free of torch so that building the CLI parser (and `--help`) stays fast; `mulfree.train.TrainConfig`
is the same class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from mulfree.errors import ConfigError


def _opt(default, help: str, **meta):
    """A field with the help text of its flag (for a default-True bool: of its `--no-` flag)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Run settings (not model settings). Defaults suit the tiny preset on a CPU; each field is also a
    `mulfree train` flag (see `mulfree.commands.flags`)."""

    steps: int = _opt(1000, "optimizer steps")
    batch_size: int = _opt(16, "sequences per micro-batch per process")
    seq_len: int = _opt(128, "tokens per sequence")
    lr: float = _opt(3e-3, "peak learning rate (ternary models want ~3x the LR of a float model)")
    min_lr: float = _opt(3e-4, "final learning rate of the cosine decay")
    warmup: int = _opt(100, "linear warmup steps")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "max gradient norm (0: off)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    eval_every: int = _opt(100, "validate every N steps (0: only at the end)")
    eval_batches: int = _opt(8, "validation batches per evaluation")
    save_every: int = _opt(200, "checkpoint every N steps (0: only at the end)")
    log_every: int = _opt(1, "write a metrics record every N steps")
    bf16: bool = _opt(False, "bfloat16 autocast")
    seed: int = _opt(0, "seed for init, data order and sampling")
    device: str = _opt("cpu", "cpu or cuda")
    progress: bool = _opt(True, "no progress bar")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train setting {name} must be positive, got {getattr(self, name)}",
                                  f"pass a positive --{name.replace('_', '-')}")
        for name in ("warmup", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train setting {name} must be >= 0, got {getattr(self, name)}",
                                  "use 0 or a positive number")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"need 0 < lr and 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}",
                              "fix --lr / --min-lr")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown train settings {unknown}", f"valid settings: {sorted(known)}")
        return cls(**d)


def check_max_new_tokens(max_new_tokens: int) -> None:
    """The one check of a generation length (CLI flag and library call alike)."""
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}", "pass 0 or a positive count")


@dataclass
class GenerationConfig:
    """How `mulfree generate` extends a prompt; validated on construction (one-line ConfigError)."""

    max_new_tokens: int = _opt(100, "tokens to generate")
    temperature: float = _opt(0.8, "0 = greedy")
    top_k: int | None = _opt(None, "sample from the k most likely tokens")
    top_p: float | None = _opt(None, "nucleus sampling mass in (0, 1]")
    seed: int = _opt(0, "sampling seed")

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}", "use 0 for greedy decoding")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}", "use a positive k or leave it out")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}", "use e.g. 0.9")
        check_max_new_tokens(self.max_new_tokens)


@dataclass
class PerplexityConfig:
    """How `mulfree eval` windows the text; validated on construction (one-line ConfigError)."""

    window: int = _opt(256, "tokens per window")
    stride: int | None = _opt(None, "window stride (default: the window)")
    max_tokens: int = _opt(65536, "score at most this many tokens (0: all)")

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ConfigError(f"--window must be >= 2, got {self.window}", "use e.g. 256")
        if self.stride is not None and not 0 < self.stride <= self.window:
            raise ConfigError(f"--stride must be in (0, window], got {self.stride}", "use e.g. half the window")
        if self.max_tokens < 0:
            raise ConfigError(f"--max-tokens must be >= 0, got {self.max_tokens}", "use 0 for all tokens")
