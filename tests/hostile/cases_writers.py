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


def _changed_data(state: dict) -> dict:
    files = state["extra"]["data_files"]
    first = min(files)
    return {**state, "extra": {**state["extra"], "data_files": {**files, first: "xxh3-64:0000000000000000"}}}


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

_RESUME = [  # (id, what, flags after `train --resume`, expected error or None for success, setup)
    ("resume-torn-metrics", "resume after a kill tore the last line of metrics.jsonl",
     ("--steps", "3"), None, _append_metrics('{"step": 3, "lo')),
    ("resume-garbage-metrics-line", "resume with a binary line in metrics.jsonl",
     ("--steps", "3"), None, _append_metrics("\x00\xff garbage\n")),
    ("resume-stale-temps", "resume next to temp files of killed checkpoint writes",
     ("--steps", "3"), None, _stale_temps),
    ("resume-pointer-list", "checkpoint.json holding a JSON list",
     (), "must be a JSON object", _pointer("[1, 2]")),
    ("resume-pointer-string", "checkpoint.json holding a JSON string",
     (), "must be a JSON object", _pointer('"ckpt-2"')),
    ("resume-pointer-not-json", "checkpoint.json that is not JSON",
     (), "is not valid JSON", _pointer("{oops")),
    ("resume-pointer-escape", "checkpoint.json naming a directory outside the run",
     (), "ckpt-<step>", _pointer('{"checkpoint": "../model"}')),
    ("resume-pointer-missing-ckpt", "checkpoint.json naming a checkpoint that is gone",
     (), "is missing", _pointer('{"checkpoint": "ckpt-99", "step": 99}')),
    ("resume-optimizer-deleted", "the checkpoint's optimizer.safetensors deleted",
     (), "optimizer.safetensors is missing", _delete("optimizer.safetensors")),
    ("resume-state-deleted", "the checkpoint's state.json deleted",
     (), "state.json is missing", _delete("state.json")),
    ("resume-model-bitflip", "one bit flipped in the checkpoint's model.safetensors",
     (), "does not match its checksum", _flip("model.safetensors")),
    ("resume-optimizer-bitflip", "one bit flipped in the checkpoint's optimizer.safetensors",
     (), "does not match its checksum", _flip("optimizer.safetensors")),
    ("resume-state-bitflip", "one bit flipped in the checkpoint's state.json",
     (), "does not match its checksum", _flip("state.json")),
    ("resume-state-list", "state.json holding a JSON list (checksum updated)",
     (), "must hold a JSON object", _edit_state(lambda s: [s])),
    ("resume-state-no-groups", "state.json without param_groups",
     (), "param_groups", _edit_state(_drop_key("param_groups"))),
    ("resume-state-no-train-config", "state.json without train_config",
     (), "train_config", _edit_state(_drop_key("train_config"))),
    ("resume-state-step-text", "state.json whose step is text",
     (), "is not the checkpoint's step", _edit_state(lambda s: {**s, "step": "two"})),
    ("resume-state-lr-text", "state.json whose saved lr is text",
     (), "--lr must be a number", _edit_state(lambda s: {**s, "train_config": {**s["train_config"], "lr": "x"}})),
    ("resume-optimizer-missing-key", "optimizer.safetensors without one parameter's exp_avg",
     (), "lacks ['exp_avg']", _edit_optimizer(_without("0.exp_avg"))),
    ("resume-optimizer-no-rng", "optimizer.safetensors without the RNG state",
     (), "torch_rng", _edit_optimizer(_without("torch_rng"))),
    ("resume-optimizer-extra-key", "optimizer.safetensors with a tensor for a parameter that does not exist",
     (), "unexpected tensor", _edit_optimizer(lambda t: {**t, "999.exp_avg": t["0.exp_avg"].clone()})),
    ("resume-data-changed", "resume after a data file changed (recorded digest differs)",
     (), "changed since the run", _edit_state(_changed_data)),
    ("resume-other-data", "resume --data with another corpus",
     ("--data", "{tmp}/other.txt"), "--data differs", _file("other.txt")),
    ("resume-changed-lr", "resume --lr 0.1 (a resumed run keeps its settings)",
     ("--lr", "0.1"), "differs from the resumed run", None),
    ("resume-lr-inf", "resume --lr inf",
     ("--lr", "inf"), "--lr must be a finite number", None),
    ("resume-extend", "resume --steps 3 of a finished 2-step run",
     ("--steps", "3"), None, None),
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
    Case("train-out-model-overwrite", "train --out over a model with --overwrite (replaced once complete)",
         _train("--steps", "1", "--overwrite", out="{model}"), None, copy=("model",), setup=_write_cfg),
    Case("train-resume-and-overwrite", "train --resume --overwrite", _resume("--overwrite"),
         "--resume and --overwrite", copy=("run",)),
    Case("train-resume-nothing", "train --resume in an empty dir", ("train", "--out", "{tmp}", "--resume"),
         "no checkpoint to resume"),
    # resume from damaged run dirs
    *[Case(cid, what, _resume(*flags), expect, copy=("run",), setup=setup)
      for cid, what, flags, expect, setup in _RESUME],
    # generate
    Case("generate-temperature-nan", "generate --temperature nan",
         ("generate", "--model", "{model}", "--prompt", "x", "--temperature", "nan"), "--temperature must be a finite"),
    Case("generate-temperature-inf", "generate --temperature inf",
         ("generate", "--model", "{model}", "--prompt", "x", "--temperature", "inf"), "--temperature must be a finite"),
    Case("generate-temperature-negative", "generate --temperature -1",
         ("generate", "--model", "{model}", "--prompt", "x", "--temperature", "-1"), "--temperature must be >= 0"),
    Case("generate-top-p-nan", "generate --top-p nan", ("generate", "--model", "{model}", "--prompt", "x",
                                                        "--top-p", "nan"), "--top-p must be a finite"),
    Case("generate-top-p-two", "generate --top-p 2", ("generate", "--model", "{model}", "--prompt", "x",
                                                      "--top-p", "2"), "--top-p must be <= 1"),
    Case("generate-top-p-zero", "generate --top-p 0", ("generate", "--model", "{model}", "--prompt", "x",
                                                       "--top-p", "0"), "--top-p must be > 0"),
    Case("generate-top-k-negative", "generate --top-k -1", ("generate", "--model", "{model}", "--prompt", "x",
                                                            "--top-k", "-1"), "--top-k must be >= 0"),
    Case("generate-top-k-float", "generate --top-k 1e3", ("generate", "--model", "{model}", "--prompt", "x",
                                                          "--top-k", "1e3"), "invalid int value"),
    Case("generate-top-k-beyond-vocab", "generate --top-k 100000 (more than the vocabulary: all tokens)",
         ("generate", "--model", "{model}", "--prompt", "ROMEO", "--top-k", "100000", "--max-new-tokens", "3"), None),
    Case("generate-seed-huge", "generate --seed 2**70", ("generate", "--model", "{model}", "--prompt", "x",
                                                         "--seed", BIG), "--seed must be <="),
    Case("generate-seed-negative", "generate --seed -3", ("generate", "--model", "{model}", "--prompt", "x",
                                                          "--seed", "-3"), "--seed must be >= 0"),
    Case("generate-max-new-huge", "generate --max-new-tokens 10**12", ("generate", "--model", "{model}", "--prompt",
                                                                       "x", "--max-new-tokens", "1000000000000"),
         "--max-new-tokens must be <="),
    Case("generate-packed-temperature-nan", "generate --engine packed --temperature nan",
         ("generate", "--model", "{packed}", "--engine", "packed", "--prompt", "x", "--temperature", "nan"),
         "--temperature must be a finite"),
    # eval
    Case("eval-window-huge", "eval --window 10**9", ("eval", "--model", "{model}", "--data", "{data}",
                                                     "--window", "1000000000"), "--window must be <="),
    Case("eval-window-nan", "eval --window nan", ("eval", "--model", "{model}", "--window", "nan"),
         "invalid int value"),
    Case("eval-stride-zero", "eval --stride 0", ("eval", "--model", "{model}", "--stride", "0"),
         "--stride must be positive"),
    Case("eval-stride-above-window", "eval --stride 1000 --window 32",
         ("eval", "--model", "{model}", "--window", "32", "--stride", "1000"), "--stride must be in (0, window]"),
    Case("eval-max-tokens-negative", "eval --max-tokens -1", ("eval", "--model", "{model}", "--max-tokens", "-1"),
         "--max-tokens must be >= 0"),
    # demo (checked before the corpus is read)
    Case("demo-steps-zero", "demo --steps 0", ("demo", "--steps", "0", "--out", "{tmp}/d"), "--steps must be positive"),
    Case("demo-hidden-zero", "demo --hidden-size 0", ("demo", "--hidden-size", "0", "--out", "{tmp}/d"),
         "--hidden-size must be positive"),
    Case("demo-lr-nan", "demo --mmfree-lr nan", ("demo", "--mmfree-lr", "nan", "--out", "{tmp}/d"),
         "--mmfree-lr must be a finite number"),
    Case("demo-lr-negative", "demo --transformer-lr -1", ("demo", "--transformer-lr", "-1", "--out", "{tmp}/d"),
         "--transformer-lr must be > 0"),
    Case("demo-vocab-huge", "demo --vocab-size 10**12", ("demo", "--vocab-size", "1000000000000", "--out", "{tmp}/d"),
         "--vocab-size must be <="),
    Case("demo-eval-tokens-zero", "demo --eval-tokens 0", ("demo", "--eval-tokens", "0", "--out", "{tmp}/d"),
         "--eval-tokens must be positive"),
    Case("demo-seed-huge", "demo --seed 2**70", ("demo", "--seed", BIG, "--out", "{tmp}/d"), "--seed must be <="),
    Case("demo-out-cwd", "demo --out .", ("demo", "--out", "."), "current directory"),
    Case("demo-out-model", "demo --out over a model dir", ("demo", "--out", "{model}"), "already holds a model",
         copy=("model",)),
    Case("demo-out-file", "demo --out naming a file", ("demo", "--out", "{tmp}/f"), "is a file", setup=_file("f")),
    # arith train / eval
    Case("arith-width-negative", "arith train --width -1", ("arith", "train", "--width", "-1", "--out", "{tmp}/a"),
         "--width must be positive"),
    Case("arith-width-huge", "arith train --width 1000", ("arith", "train", "--width", "1000", "--out", "{tmp}/a"),
         "--width must be <= 100"),
    Case("arith-digits-zero", "arith train --digits 0", ("arith", "train", "--digits", "0", "--out", "{tmp}/a"),
         "operand length must be an integer >= 1"),
    Case("arith-digits-huge", "arith train --digits 1000", ("arith", "train", "--digits", "1000", "--out",
                                                            "{tmp}/a"), "--digits must be <= 100"),
    Case("arith-test-per-length-zero", "arith train --test-per-length 0",
         ("arith", "train", "--test-per-length", "0", "--out", "{tmp}/a"), "--test-per-length must be positive"),
    Case("arith-test-per-length-huge", "arith train --test-per-length 10**9",
         ("arith", "train", "--test-per-length", "1000000000", "--out", "{tmp}/a"), "--test-per-length must be <="),
    Case("arith-lr-inf", "arith train --lr inf", ("arith", "train", "--lr", "inf", "--out", "{tmp}/a"),
         "--lr must be a finite number"),
    Case("arith-steps-negative", "arith train --steps -1", ("arith", "train", "--steps", "-1", "--out", "{tmp}/a"),
         "--steps must be positive"),
    Case("arith-batch-huge", "arith train --batch-size 10**12",
         ("arith", "train", "--batch-size", "1000000000000", "--out", "{tmp}/a"), "--batch-size must be <="),
    Case("arith-seed-huge", "arith train --seed 2**70", ("arith", "train", "--seed", BIG, "--out", "{tmp}/a"),
         "--seed must be <="),
    Case("arith-eval-lengths-huge", "arith train --eval-lengths 1-100000",
         ("arith", "train", "--eval-lengths", "1-100000", "--out", "{tmp}/a"), "beyond 100 digits"),
    Case("arith-eval-lengths-text", "arith train --eval-lengths x",
         ("arith", "train", "--eval-lengths", "x", "--out", "{tmp}/a"), "cannot read operand lengths"),
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
    Case("arith-eval-per-length-zero", "arith eval --per-length 0",
         ("arith", "eval", "--model", "{model}", "--per-length", "0"), "--per-length must be positive"),
    Case("arith-eval-per-length-huge", "arith eval --per-length 10**9",
         ("arith", "eval", "--model", "{model}", "--per-length", "1000000000"), "--per-length must be <="),
    Case("arith-eval-seed-negative", "arith eval --seed -1", ("arith", "eval", "--model", "{model}", "--seed", "-1"),
         "--seed must be >= 0"),
    Case("arith-eval-png-dir", "arith eval --png naming a directory",
         ("arith", "eval", "--model", "{model}", "--png", "{tmp}"), "--png"),
    Case("arith-eval-lengths-zero", "arith eval --lengths 0-2",
         ("arith", "eval", "--model", "{model}", "--lengths", "0-2"), "must be >= 1"),
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
