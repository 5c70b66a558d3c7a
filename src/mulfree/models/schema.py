"""Validated schemas of the files mulfree loads: model configs (ours and Hugging Face), packed configs and
tokenizers (quantized dirs: `mulfree.quant.schema`). Each check names the file, the field and what to do, in
one line (`ConfigError` for a config object, `CheckpointError` for a file in a model dir), and every loader
estimates the memory a config needs and compares it with the memory available before it allocates anything.

    check_model_fields(config)                    # LMConfig.__post_init__: types, ranges, cross-field checks
    model_config(cfg_dict, "m/config.json")       # our config dict -> validated config object
    check_memory(estimate_model_bytes(cfg), "m/config.json", "the model")
    validate_packed_config(cfg_dict, "p/config.json")
    check_tokenizer(tokenizer, vocab_size, "m/tokenizer.json")
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mulfree.errors import CheckpointError, ConfigError

# Upper bounds far beyond any released model, low enough that no check loops or allocates without bound.
MAX_VOCAB = 1 << 22
MAX_WIDTH = 1 << 17
MAX_INTERMEDIATE = 1 << 20
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_POSITIONS = 1 << 24
MAX_SEED = (1 << 63) - 1
FIX = "fix the field or rewrite the file with the command that made it"


@dataclass(frozen=True)
class Rule:
    """One field: its JSON type ('int', 'float', 'bool', 'str'), closed range or choices, and None allowed."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    optional: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        what = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}[self.kind]
        if self.choices:
            what = "one of " + ", ".join(map(repr, self.choices))
        elif self.lo is not None and self.hi is not None:
            what += f" in {_number(self.lo)}..{_number(self.hi)}"
        elif self.lo is not None:
            what += f" >= {_number(self.lo)}"
        return what + (" or null" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) != (self.kind == "bool"):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if self.kind == "float" and not (isinstance(value, (int, float)) and math.isfinite(value)):
            return False
        if self.kind == "str" and not isinstance(value, str):
            return False
        if self.choices and value not in self.choices:
            return False
        if self.kind in ("int", "float"):
            return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)
        return True


def _number(x: float) -> str:
    """A bound as written by hand: integers in full, other numbers in %g form."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e19 else f"{x:g}"


def show(value: Any) -> str:
    """A value for an error line, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_json(path: Path, what: str = "the checkpoint", hint: str | None = None) -> Any:
    """Parse a JSON file; CheckpointError (one line) when it is unreadable, not UTF-8, not JSON or nested too
    deep. `hint` says what to do (default: re-save `what`)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({str(exc)[:80]})",
                              hint or f"{what} is corrupt; re-save it") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception (or its type), short enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def check_field(data: Mapping, name: str, rule: Rule, source: str, error: type = CheckpointError,
                required: bool = True) -> Any:
    """`data[name]` if `rule` accepts it; a missing required field or a wrong value raises `error`."""
    if name not in data:
        if required and not rule.optional:
            raise error(f"{source}: field '{name}' is missing", f"add it ({rule.describe()}) or {FIX}")
        return None
    value = data[name]
    if not rule.accepts(value):
        raise error(f"{source}: field '{name}' must be {rule.describe()}, got {show(value)}", FIX)
    return value


def check_fields(data: Any, rules: Mapping[str, Rule], source: str, error: type = CheckpointError,
                 required: bool = True) -> dict:
    """Check that `data` is a JSON object and every field of `rules` in it; returns `data`."""
    require_object(data, source, error)
    for name, rule in rules.items():
        check_field(data, name, rule, source, error, required)
    return data


def require_object(data: Any, source: str, error: type = CheckpointError) -> dict:
    if not isinstance(data, dict):
        raise error(f"{source} must hold a JSON object, not {type(data).__name__}", FIX)
    return data


# ---- model configs -------------------------------------------------------------------------------------------
# Ranges of the fields of our config dataclasses (types come from each field's annotation) and of HF configs.
MODEL_RULES: dict[str, Rule] = {
    "vocab_size": Rule("int", 1, MAX_VOCAB),
    "hidden_size": Rule("int", 1, MAX_WIDTH),
    "num_hidden_layers": Rule("int", 1, MAX_LAYERS),
    "intermediate_size": Rule("int", 1, MAX_INTERMEDIATE, optional=True),
    "hidden_ratio": Rule("int", 1, 64),
    "rms_norm_eps": Rule("float", 1e-30, 1.0),
    "max_position_embeddings": Rule("int", 1, MAX_POSITIONS),
    "initializer_range": Rule("float", 0.0, 10.0),
    "bos_token_id": Rule("int", 0, MAX_VOCAB, optional=True),
    "eos_token_id": Rule("int", 0, MAX_VOCAB, optional=True),
    "num_attention_heads": Rule("int", 1, MAX_HEADS),
    "num_key_value_heads": Rule("int", 1, MAX_HEADS, optional=True),
    "num_heads": Rule("int", 1, MAX_HEADS, optional=True),
    "head_dim": Rule("int", 1, MAX_WIDTH, optional=True),
    "rope_theta": Rule("float", 1e-6, 1e12),
}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_ANNOTATION_KINDS = {"int": "int", "float": "float", "bool": "bool", "str": "str"}


def _annotation_rule(annotation: Any) -> Rule | None:
    """The type rule of a dataclass field annotation ('int', 'float | None', ...), None for other types."""
    parts = [p.strip() for p in str(annotation).split("|")]
    kinds = [p for p in parts if p != "None"]
    if len(kinds) != 1 or kinds[0] not in _ANNOTATION_KINDS:
        return None
    return Rule(_ANNOTATION_KINDS[kinds[0]], optional="None" in parts)


def check_model_fields(config: Any) -> None:
    """Types (from the annotations), ranges and cross-field rules of a config dataclass; ConfigError naming the
    first bad field. Runs before any value is derived from the fields (e.g. the GLU width)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        rule = _annotation_rule(f.type)
        if rule is not None and not rule.accepts(value):
            raise ConfigError(f"config field '{f.name}' must be {rule.describe()}, got {show(value)}", "fix the config")
        limit = MODEL_RULES.get(f.name)
        if limit is not None and value is not None and not limit.accepts(value):
            raise ConfigError(f"config field '{f.name}' must be {limit.describe()}, got {show(value)}", "fix the config")
    problem = _cross_problem({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    if problem:
        raise ConfigError(f"config {problem}", "fix the config")


def _cross_problem(cfg: Mapping, token_ids: bool = True) -> str | None:
    """Token ids inside the vocabulary; the width divisible by the number of heads. None when they hold."""
    vocab = cfg.get("vocab_size")
    for name in TOKEN_IDS if token_ids else ():
        value = cfg.get(name)
        if isinstance(value, int) and isinstance(vocab, int) and not 0 <= value < vocab:
            return f"{name} {value} is outside the vocabulary (vocab_size {vocab})"
    width = cfg.get("hidden_size")
    for name in ("num_attention_heads", "num_heads"):
        heads = cfg.get(name)
        if isinstance(heads, int) and isinstance(width, int) and heads > 0 and width % heads and not cfg.get("head_dim"):
            return f"hidden_size {width} is not divisible by {name} {heads}"
    return None


def model_config(cfg: Mapping, source: str) -> Any:
    """The validated config object of one of our families from a config dict; CheckpointError naming `source`."""
    from mulfree.models import registry

    require_object(cfg, source)
    family = registry.find(cfg)
    if family is None:
        raise CheckpointError(f"{source}: unknown model_type {show(cfg.get('model_type'))}",
                              f"mulfree models are {', '.join(registry.NAMES)}")
    try:
        return family.config_cls.from_dict(dict(cfg))
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc.what}", exc.hint) from None


def check_hf_config(config: Any, source: str, error: type = CheckpointError) -> None:
    """Shape fields of a Hugging Face config object or dict (aliases such as GPT-2's n_embd resolved by the
    config class) and their cross-field rules. Token ids are left alone (HF configs hold lists and -1 there;
    the tokenizer is checked against the vocabulary instead)."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    values = {name: get(name) for name in MODEL_RULES if name not in TOKEN_IDS}
    for name, value in values.items():
        rule = MODEL_RULES[name]
        if value is not None and not rule.accepts(value):
            raise error(f"{source}: field '{name}' must be {rule.describe()}, got {show(value)}", FIX)
    problem = _cross_problem(values, token_ids=False)
    if problem:
        raise error(f"{source}: {problem}", FIX)


# ---- memory --------------------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable of /proc/meminfo (else sysconf's available pages),
    capped by a cgroup v2 memory limit; None when the platform says nothing."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(need: int, source: str, what: str = "the model",
                 hint: str = "check num_hidden_layers, hidden_size, intermediate_size and vocab_size, or free memory"
                 ) -> None:
    """ConfigError when `need` bytes exceed the memory available now (checked before allocating)."""
    avail = available_memory()
    if avail is not None and need > avail:
        raise ConfigError(f"{source}: {what} needs about {gib(need)} of memory, more than the {gib(avail)} available",
                          hint)


def _shape(cfg: Any) -> tuple[int, int, int, int]:
    get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
    d, layers, vocab = int(get("hidden_size") or 0), int(get("num_hidden_layers") or 0), int(get("vocab_size") or 0)
    inter = get("intermediate_size") or get("n_inner") or 4 * d
    return d, layers, vocab, int(inter)


def parameter_count(cfg: Any) -> int:
    """Parameters of a decoder LM of `cfg`'s shape: embeddings + head (2 V d), per layer 4 d² (mixer) + 3 d I
    (GLU) + norms; an upper bound for every family we load (ours, Llama, OPT, GPT-2)."""
    d, layers, vocab, inter = _shape(cfg)
    return 2 * vocab * d + layers * (4 * d * d + 3 * d * inter + 4 * d) + d


def estimate_model_bytes(cfg: Any) -> int:
    """Memory of a float model of `cfg`: its fp32 parameters (a loader adds the tensors it reads from disk)."""
    return 4 * parameter_count(cfg)


def estimate_packed_bytes(cfg: Any) -> int:
    """Memory to load a packed model: fp32 embeddings and norms, 2-bit linears (an upper bound for 1.6-bit ones),
    twice (the file is read whole before its tensors are made), plus one fp32 row of logits per prefill token
    (512)."""
    d, layers, vocab, inter = _shape(cfg)
    ternary = layers * (4 * d * d + 3 * d * inter) + vocab * d
    return 2 * (4 * vocab * d + ternary // 4 + 4 * layers * 8 * d) + 4 * 512 * vocab


# ---- packed configs ------------------------------------------------------------------------------------------
PACKED_RULES: dict[str, Rule] = {
    "format": Rule("str"),
    "format_version": Rule("int", 1, 1 << 16),
    "crc32": Rule("int", 0, (1 << 32) - 1),
}


def validate_packed_config(cfg: Any, source: str) -> None:
    """A packed dir's config.json (`mulfree pack`): the format fields, the MMfree model fields (types, ranges,
    cross-field rules) and the memory the packed model needs. Fields other than these are left to the loader.
    Raises CheckpointError naming `source` and the field (ConfigError when the memory is not available)."""
    require_object(cfg, source)
    check_fields(cfg, PACKED_RULES, source)
    if cfg.get("model_type", "mmfree") != "mmfree":
        raise CheckpointError(f"{source}: field 'model_type' must be 'mmfree' in a packed dir, got "
                              f"{show(cfg.get('model_type'))}", "re-pack an MMfree model with `mulfree pack`")
    from mulfree.models.mmfree import MMFreeConfig

    known = {f.name for f in dataclasses.fields(MMFreeConfig)}
    for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
        check_field(cfg, name, MODEL_RULES[name], source)
    try:
        config = MMFreeConfig(**{k: v for k, v in cfg.items() if k in known})
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc.what.removeprefix('config ')}", FIX) from None
    check_memory(estimate_packed_bytes(config), source, "the packed model")


# ---- tokenizers ----------------------------------------------------------------------------------------------
def tokenizer_size(tokenizer: Any) -> int:
    """1 + the largest token id of a `tokenizers.Tokenizer` or a transformers tokenizer (added tokens too)."""
    try:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
    except TypeError:  # transformers tokenizers take no argument and include added tokens
        vocab = tokenizer.get_vocab()
    return max(vocab.values(), default=-1) + 1


def check_tokenizer(tokenizer: Any, vocab_size: int, source: str) -> None:
    """CheckpointError when the tokenizer can produce ids the model has no embedding for."""
    size = tokenizer_size(tokenizer)
    if size > vocab_size:
        raise CheckpointError(f"{source} has token ids up to {size - 1}, beyond the model's vocab_size {vocab_size}",
                              "use the tokenizer saved with this model")
