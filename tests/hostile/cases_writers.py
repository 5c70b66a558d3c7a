"""The writing and training commands (train, generate, eval, demo, arith train/eval): every numeric flag
with NaN / inf / negative / huge / text values, `--out` over models, runs, non-empty dirs, `.` and files,
and resumes from torn, corrupt, mistyped or edited run directories."""

from __future__ import annotations

import json
from pathlib import Path

from hostile import Case

BIG = str(2**70)
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 300, "max_position_embeddings": 64,
        "train": {"eval_batches": 1, "warmup": 1}}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _write_cfg(tmp: Path, **train) -> None:
    cfg = {**TINY, "train": {**TINY["train"], **train}} if train else TINY
    (tmp / "cfg.json").write_text(json.dumps(cfg))


def _cfg_with(train_value) -> callable:
    def setup(tmp: Path) -> None:
        (tmp / "cfg.json").write_text(json.dumps({**TINY, "train": train_value}))

    return setup


def _train(*flags: str, out: str = "{tmp}/out", config: str = "{tmp}/cfg.json") -> tuple[str, ...]:
    return ("train", "--config", config, "--data", "{data}", "--out", out, "--batch-size", "2", "--seq-len", "16",
            "--no-progress", *flags)


def _resume(*flags: str) -> tuple[str, ...]:
    return ("train", "--out", "{tmp}/run", "--resume", "--no-progress", *flags)


def _ckpt(tmp: Path) -> Path:
    run = tmp / "run"
    return run / json.loads((run / "checkpoint.json").read_text())["checkpoint"]


def _rehash(ckpt: Path) -> None:
    """Record the edited files' digests, so the edit itself (not the checksum) is what the loader meets."""
    from mulfree.integrity import write_manifest

    write_manifest(ckpt, ["model.safetensors", "optimizer.safetensors", "state.json"])


def _pointer(text: str):
    def setup(tmp: Path) -> None:
        (tmp / "run" / "checkpoint.json").write_text(text)

    return setup


def _flip(name: str):
    def setup(tmp: Path) -> None:
        path = _ckpt(tmp) / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))

    return setup


def _delete(name: str):
    def setup(tmp: Path) -> None:
        (_ckpt(tmp) / name).unlink()

    return setup


def _edit_state(edit):
    def setup(tmp: Path) -> None:
        ckpt = _ckpt(tmp)
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps(edit(state)))
        _rehash(ckpt)

    return setup


def _edit_optimizer(edit):
    def setup(tmp: Path) -> None:
        from safetensors.torch import load_file, save_file

        ckpt = _ckpt(tmp)
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        save_file(edit(tensors), str(ckpt / "optimizer.safetensors"))
        _rehash(ckpt)

    return setup


def _without(*keys: str):
    return lambda tensors: {k: v for k, v in tensors.items() if k not in keys}


def _drop_key(key: str):
    return lambda state: {k: v for k, v in state.items() if k != key}


def _changed(state: dict) -> dict:
    files = state["extra"]["data_files"]
    first = min(files)
    return {**state, "extra": {**state["extra"], "data_files": {**files, first: "xxh3-64:0000000000000000"}}}


_CRC = "does not match its checksum"
_CKPT99 = '{"checkpoint": "ckpt-99", "step": 99}'


def _step_text(state: dict) -> dict:
    return {**state, "step": "two"}


def _lr_text(state: dict) -> dict:
    return {**state, "train_config": {**state["train_config"], "lr": "x"}}


def _no_exp_avg(tensors: dict) -> dict:
    return _without("0.exp_avg")(tensors)


def _extra(tensors: dict) -> dict:
    return {**tensors, "999.exp_avg": tensors["0.exp_avg"].clone()}


def _append_metrics(text: str):
    def setup(tmp: Path) -> None:
        with (tmp / "run" / "metrics.jsonl").open("a") as f:
            f.write(text)

    return setup


def _stale_temps(tmp: Path) -> None:
    run = tmp / "run"
    (run / ".model.safetensors.ab12cd34.tmp").write_bytes(b"\0" * 1000)
    (run / ".ckpt-9.zz99yy88.tmp").mkdir()
    (run / ".ckpt-9.zz99yy88.tmp" / "model.safetensors").write_bytes(b"partial")


def _file(name: str):
    def setup(tmp: Path) -> None:
        (tmp / name).write_text("not a directory")

    return setup


def _arith_preset(tmp: Path) -> None:
    (tmp / "p.json").write_text(json.dumps({"model_type": "transformerpp", "vocab_size": 20, "hidden_size": 32,
                                            "num_hidden_layers": 1, "num_attention_heads": 2,
                                            "intermediate_size": 64}))


def _arith_json(meta):
    def setup(tmp: Path) -> None:
        base = {"op": "add", "fmt": "reversed", "digits": 2, "width": None, "model": "mmfree",
                "test_seed": 1, "test_per_length": 5}
        value = meta(base) if callable(meta) else meta
        (tmp / "model" / "arith.json").write_text(json.dumps(value))

    return setup


_NUMERIC_TRAIN = [  # (id, flags, expected error)
    ("lr-inf", ("--lr", "inf"), "--lr must be a finite number"),
    ("threads-negative", ("--threads", "-1"), "--threads must be >= 0"),
    ("threads-huge", ("--threads", "1000000"), "--threads must be <= 4096"),
    ("threads-text", ("--threads", "all"), "invalid int value"),
    ("lr-nan", ("--lr", "nan"), "--lr must be a finite number"),
    ("lr-overflow", ("--lr", "1e400"), "--lr must be a finite number"),
    ("lr-negative", ("--lr", "-1"), "--lr must be > 0"),
    ("lr-zero", ("--lr", "0"), "--lr must be > 0"),
    ("lr-text", ("--lr", "fast"), "invalid float value"),
    ("min-lr-above-lr", ("--lr", "0.001", "--min-lr", "0.1"), "min_lr <= lr"),
    ("weight-decay-nan", ("--weight-decay", "nan"), "--weight-decay must be a finite number"),
    ("weight-decay-negative", ("--weight-decay", "-0.1"), "--weight-decay must be >= 0"),
    ("grad-clip-negative", ("--grad-clip", "-1"), "--grad-clip must be >= 0"),
    ("grad-clip-inf", ("--grad-clip", "inf"), "--grad-clip must be a finite number"),
    ("beta1-one", ("--beta1", "1"), "--beta1 must be < 1"),
    ("beta2-nan", ("--beta2", "nan"), "--beta2 must be a finite number"),
    ("seed-huge", ("--seed", BIG), "--seed must be <="),
    ("seed-negative", ("--seed", "-1"), "--seed must be >= 0"),
    ("batch-size-huge", ("--batch-size", "1000000000000"), "--batch-size must be <="),
    ("batch-size-zero", ("--batch-size", "0"), "--batch-size must be positive"),
    ("seq-len-negative", ("--seq-len", "-5"), "--seq-len must be positive"),
    ("micro-batch-too-many-tokens", ("--batch-size", "1048576", "--seq-len", "128"), "exceeds 67,108,864 tokens"),
    ("steps-zero", ("--steps", "0"), "--steps must be positive"),
    ("steps-text", ("--steps", "ten"), "invalid int value"),
    ("steps-beyond-int64", ("--steps", BIG), "--steps must be <="),
    ("warmup-negative", ("--warmup", "-1"), "--warmup must be >= 0"),
    ("grad-accum-zero", ("--grad-accum", "0"), "--grad-accum must be positive"),
    ("eval-batches-zero", ("--eval-batches", "0"), "--eval-batches must be positive"),
    ("save-every-negative", ("--save-every", "-2"), "--save-every must be >= 0"),
    ("device-unknown", ("--device", "tpu"), "--device must be cpu, cuda or cuda:N"),
]

_RESUME = [  # (id, what is damaged, expected error or None for success, setup) for `train --resume --steps 3`
    ("resume-torn-metrics", "metrics.jsonl's last line torn by a kill", None, _append_metrics('{"step": 3, "lo')),
    ("resume-garbage-metrics-line", "a binary line in metrics.jsonl", None, _append_metrics("\x00\xff junk\n")),
    ("resume-stale-temps", "temp files of killed checkpoint writes", None, _stale_temps),
    ("resume-extend", "nothing (a finished 2-step run extended)", None, None),
    ("resume-pointer-list", "checkpoint.json: a JSON list", "must be a JSON object", _pointer("[1, 2]")),
    ("resume-pointer-string", "checkpoint.json: a JSON string", "must be a JSON object", _pointer('"ckpt-2"')),
    ("resume-pointer-not-json", "checkpoint.json: not JSON", "is not valid JSON", _pointer("{oops")),
    ("resume-pointer-escape", "checkpoint.json: names ../model", "ckpt-<step>", _pointer('{"checkpoint": "../m"}')),
    ("resume-pointer-missing-ckpt", "checkpoint.json: names ckpt-99", "is missing", _pointer(_CKPT99)),
    ("resume-optimizer-deleted", "optimizer.safetensors deleted", "optimizer.safetensors is missing",
     _delete("optimizer.safetensors")),
    ("resume-state-deleted", "state.json deleted", "state.json is missing", _delete("state.json")),
    ("resume-model-bitflip", "one bit flipped: model.safetensors", _CRC, _flip("model.safetensors")),
    ("resume-optimizer-bitflip", "one bit flipped: optimizer.safetensors", _CRC, _flip("optimizer.safetensors")),
    ("resume-state-bitflip", "one bit flipped: state.json", _CRC, _flip("state.json")),
    ("resume-state-list", "state.json: a JSON list", "must hold a JSON object", _edit_state(lambda s: [s])),
    ("resume-state-no-groups", "state.json: no param_groups", "param_groups", _edit_state(_drop_key("param_groups"))),
    ("resume-state-no-train-config", "state.json: no train_config", "train_config",
     _edit_state(_drop_key("train_config"))),
    ("resume-state-step-text", "state.json: step is text", "is not the checkpoint's step", _edit_state(_step_text)),
    ("resume-state-lr-text", "state.json: saved lr is text", "--lr must be a number", _edit_state(_lr_text)),
    ("resume-optimizer-missing-key", "optimizer: no 0.exp_avg", "lacks ['exp_avg']", _edit_optimizer(_no_exp_avg)),
    ("resume-optimizer-no-rng", "optimizer: no torch_rng", "torch_rng", _edit_optimizer(_without("torch_rng"))),
    ("resume-optimizer-extra-key", "optimizer: a tensor 999.exp_avg", "unexpected tensor", _edit_optimizer(_extra)),
    ("resume-data-changed", "a data file's recorded digest differs", "changed since the run", _edit_state(_changed)),
]

_PREFIX = {  # command lines the flags of _FLAGS are added to
    "generate": ("generate", "--model", "{model}", "--prompt", "x"),
    "eval": ("eval", "--model", "{model}"),
    "demo": ("demo", "--out", "{tmp}/d"),
    "arith": ("arith", "train", "--out", "{tmp}/a"),
    "arith-eval": ("arith", "eval", "--model", "{model}"),
}
_FLAGS = [  # (id, command, flags, expected error): refused before any model, corpus or output is touched
    ("generate-temperature-nan", "generate", ("--temperature", "nan"), "--temperature must be a finite"),
    ("generate-temperature-inf", "generate", ("--temperature", "inf"), "--temperature must be a finite"),
    ("generate-temperature-negative", "generate", ("--temperature", "-1"), "--temperature must be >= 0"),
    ("generate-top-p-nan", "generate", ("--top-p", "nan"), "--top-p must be a finite"),
    ("generate-top-p-two", "generate", ("--top-p", "2"), "--top-p must be <= 1"),
    ("generate-top-p-zero", "generate", ("--top-p", "0"), "--top-p must be > 0"),
    ("generate-top-k-negative", "generate", ("--top-k", "-1"), "--top-k must be >= 0"),
    ("generate-top-k-float", "generate", ("--top-k", "1e3"), "invalid int value"),
    ("generate-seed-huge", "generate", ("--seed", BIG), "--seed must be <="),
    ("generate-seed-negative", "generate", ("--seed", "-3"), "--seed must be >= 0"),
    ("generate-max-new-huge", "generate", ("--max-new-tokens", "1000000000000"), "--max-new-tokens must be <="),
    ("generate-prompt-not-utf8", "generate", ("--prompt", "ab\udcffcd"), "argument 'ab\\xffcd' is not valid UTF-8"),
    ("eval-model-path-not-utf8", "eval", ("--model", "/no/such/m\udcff"), "argument '/no/such/m\\xff' is not valid"),
    ("eval-window-huge", "eval", ("--window", "1000000000"), "--window must be <="),
    ("eval-window-nan", "eval", ("--window", "nan"), "invalid int value"),
    ("eval-stride-zero", "eval", ("--stride", "0"), "--stride must be positive"),
    ("eval-stride-above-window", "eval", ("--window", "32", "--stride", "1000"), "--stride must be in (0, window]"),
    ("eval-max-tokens-negative", "eval", ("--max-tokens", "-1"), "--max-tokens must be >= 0"),
    ("demo-steps-zero", "demo", ("--steps", "0"), "--steps must be positive"),
    ("demo-hidden-zero", "demo", ("--hidden-size", "0"), "--hidden-size must be positive"),
    ("demo-lr-nan", "demo", ("--mmfree-lr", "nan"), "--mmfree-lr must be a finite number"),
    ("demo-lr-negative", "demo", ("--transformer-lr", "-1"), "--transformer-lr must be > 0"),
    ("demo-vocab-huge", "demo", ("--vocab-size", "1000000000000"), "--vocab-size must be <="),
    ("demo-eval-tokens-zero", "demo", ("--eval-tokens", "0"), "--eval-tokens must be positive"),
    ("demo-seed-huge", "demo", ("--seed", BIG), "--seed must be <="),
    ("arith-width-negative", "arith", ("--width", "-1"), "--width must be positive"),
    ("arith-width-huge", "arith", ("--width", "1000"), "--width must be <= 100"),
    ("arith-digits-zero", "arith", ("--digits", "0"), "operand length must be an integer >= 1"),
    ("arith-digits-huge", "arith", ("--digits", "1000"), "--digits must be <= 100"),
    ("arith-test-per-length-zero", "arith", ("--test-per-length", "0"), "--test-per-length must be positive"),
    ("arith-test-per-length-huge", "arith", ("--test-per-length", "1000000000"), "--test-per-length must be <="),
    ("arith-lr-inf", "arith", ("--lr", "inf"), "--lr must be a finite number"),
    ("arith-steps-negative", "arith", ("--steps", "-1"), "--steps must be positive"),
    ("arith-batch-huge", "arith", ("--batch-size", "1000000000000"), "--batch-size must be <="),
    ("arith-seed-huge", "arith", ("--seed", BIG), "--seed must be <="),
    ("arith-eval-lengths-huge", "arith", ("--eval-lengths", "1-100000"), "beyond 100 digits"),
    ("arith-eval-lengths-text", "arith", ("--eval-lengths", "x"), "cannot read operand lengths"),
    ("arith-eval-per-length-zero", "arith-eval", ("--per-length", "0"), "--per-length must be positive"),
    ("arith-eval-per-length-huge", "arith-eval", ("--per-length", "1000000000"), "--per-length must be <="),
    ("arith-eval-seed-negative", "arith-eval", ("--seed", "-1"), "--seed must be >= 0"),
    ("arith-eval-png-dir", "arith-eval", ("--png", "{tmp}"), "--png"),
    ("arith-eval-png-under-file", "arith-eval", ("--png", "{model}/config.json/x.png"), "is a file"),
    ("arith-eval-lengths-zero", "arith-eval", ("--lengths", "0-2"), "must be >= 1"),
]

CASES = [
    *[Case(f"train-{cid}", f"train {' '.join(flags)}", _train(*flags), expect, setup=_write_cfg)
      for cid, flags, expect in _NUMERIC_TRAIN],
    Case("train-device-cuda", "train --device cuda (on a machine without CUDA: one line)",
         _train("--steps", "1", "--device", "cuda"), None if _cuda() else "CUDA is not available", setup=_write_cfg),
    Case("train-step-beyond-memory", "a micro-batch of 16384 x 4096 tokens (under the token cap, over the RAM)",
         _train("--batch-size", "16384", "--seq-len", "4096"), "GiB", setup=_write_cfg),
    Case("train-config-lr-text", "a config JSON whose train settings hold \"lr\": \"fast\"", _train(),
         "--lr must be a number", setup=_cfg_with({"lr": "fast"})),
    Case("train-config-train-list", "a config JSON whose \"train\" is a list", _train(),
         "\"train\" must be a JSON object", setup=_cfg_with([1, 2])),
    Case("train-config-seed-float", "a config JSON with \"seed\": 1e30", _train(), "--seed must be an integer",
         setup=_cfg_with({"seed": 1e30})),
    Case("train-config-steps-bool", "a config JSON with \"steps\": true", _train(), "--steps must be an integer",
         setup=_cfg_with({"steps": True})),
    Case("train-config-unknown-setting", "a config JSON with an unknown train setting", _train(),
         "unknown train settings", setup=_cfg_with({"stepz": 3})),
    # --out: never into a model, another run, a non-empty dir, the cwd or a file
    Case("train-out-model", "train --out over an existing model dir", _train(out="{model}"), "already holds a model",
         copy=("model",), setup=_write_cfg),
    Case("train-out-run", "train --out over another training run", _train(out="{run}"),
         "already holds a training run", copy=("run",), setup=_write_cfg),
    Case("train-out-nonempty", "train --out over a folder of the user's files", _train(out="{data}"),
         "already holds 3 other entries", copy=("data",), setup=_write_cfg),
    Case("train-out-cwd", "train --out .", _train(out="."), "current directory", setup=_write_cfg),
    Case("train-out-parent", "train --out ..", _train(out=".."), "current directory", setup=_write_cfg),
    Case("train-out-file", "train --out naming a file", _train(out="{tmp}/f"), "is a file",
         setup=lambda tmp: (_write_cfg(tmp), _file("f")(tmp))),
    Case("train-out-under-file", "train --out inside a path that is a file", _train(out="{tmp}/f/run"),
         "is a file, not a directory", setup=lambda tmp: (_write_cfg(tmp), _file("f")(tmp))),
    Case("train-out-model-overwrite", "train --out over a model with --overwrite (replaced once complete)",
         _train("--steps", "1", "--overwrite", out="{model}"), None, copy=("model",), setup=_write_cfg),
    Case("train-resume-and-overwrite", "train --resume --overwrite", _resume("--overwrite"),
         "--resume and --overwrite", copy=("run",)),
    Case("train-resume-nothing", "train --resume in an empty dir", ("train", "--out", "{tmp}", "--resume"),
         "no checkpoint to resume"),
    # resume from damaged run dirs (table above)
    *[Case(cid, f"resume: {what}", _resume("--steps", "3"), expect, copy=("run",), setup=setup)
      for cid, what, expect, setup in _RESUME],
    Case("resume-other-data", "resume --data with another corpus", _resume("--data", "{tmp}/other.txt"),
         "--data differs", copy=("run",), setup=_file("other.txt")),
    Case("resume-changed-lr", "resume --lr 0.1 (a resumed run keeps its settings)", _resume("--lr", "0.1"),
         "differs from the resumed run", copy=("run",)),
    Case("resume-lr-inf", "resume --lr inf", _resume("--lr", "inf"), "--lr must be a finite number", copy=("run",)),
    # one flag at a time (table above)
    *[Case(cid, f"{' '.join(_PREFIX[cmd][:2] if cmd.startswith('arith') else _PREFIX[cmd][:1])} {' '.join(flags)}",
           (*_PREFIX[cmd], *flags), expect) for cid, cmd, flags, expect in _FLAGS],
    Case("generate-top-k-beyond-vocab", "generate --top-k 100000 (more than the vocabulary: all tokens)",
         ("generate", "--model", "{model}", "--prompt", "ROMEO", "--top-k", "100000", "--max-new-tokens", "3"), None),
    Case("generate-packed-temperature-nan", "generate --engine packed --temperature nan",
         ("generate", "--model", "{packed}", "--engine", "packed", "--prompt", "x", "--temperature", "nan"),
         "--temperature must be a finite"),
    Case("demo-out-cwd", "demo --out .", ("demo", "--out", "."), "current directory"),
    Case("demo-out-model", "demo --out over a model dir", ("demo", "--out", "{model}"), "already holds a model",
         copy=("model",)),
    Case("demo-out-file", "demo --out naming a file", ("demo", "--out", "{tmp}/f"), "is a file", setup=_file("f")),
    Case("arith-out-model", "arith train --out over a model dir", ("arith", "train", "--out", "{model}"),
         "already holds a model", copy=("model",)),
    Case("arith-out-run", "arith train --out over a training run", ("arith", "train", "--out", "{run}"),
         "already holds a training run", copy=("run",)),
    Case("arith-out-cwd", "arith train --out .", ("arith", "train", "--out", "."), "current directory"),
    Case("arith-out-file", "arith train --out naming a file", ("arith", "train", "--out", "{tmp}/f"), "is a file",
         setup=_file("f")),
    Case("arith-out-overwrite", "arith train --out over a model with --overwrite (replaced once complete)",
         ("arith", "train", "--out", "{model}", "--overwrite", "--preset", "{tmp}/p.json", "--digits", "1",
          "--steps", "2", "--batch-size", "4", "--test-per-length", "2"), None, copy=("model",), setup=_arith_preset),
    Case("arith-eval-not-arith", "arith eval of a model dir without arith.json", ("arith", "eval", "--model",
                                                                                 "{model}"), "arith.json is missing"),
    Case("arith-eval-json-huge-digits", "arith.json with digits 10**9 (would test a billion lengths)",
         ("arith", "eval", "--model", "{model}"), "--digits must be <= 100", copy=("model",),
         setup=_arith_json(lambda m: {**m, "digits": 10**9})),
    Case("arith-eval-json-list", "arith.json holding a JSON list", ("arith", "eval", "--model", "{model}"),
         "is malformed", copy=("model",), setup=_arith_json([1, 2])),
    Case("arith-eval-json-seed-text", "arith.json whose test_seed is text", ("arith", "eval", "--model", "{model}"),
         "--seed must be an integer", copy=("model",), setup=_arith_json(lambda m: {**m, "test_seed": "x"})),
    Case("arith-eval-json-per-length-huge", "arith.json with test_per_length 10**9",
         ("arith", "eval", "--model", "{model}"), "--test-per-length must be <=", copy=("model",),
         setup=_arith_json(lambda m: {**m, "test_per_length": 10**9})),
]
