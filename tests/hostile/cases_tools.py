"""The hostile flags of quantize, pack, energy, lmul, lm-eval and serve: out-of-range, non-finite and huge
numbers, `--out` over models, non-empty dirs, `.` and files, `--json` / `--png` naming directories, and the
configs these commands read (`damage.py` does the damage)."""

from __future__ import annotations

import json

from hostile import Case
from hostile import damage as d

BIG = str(2**70)
M = ("model",)

def _quantize(method: str, *flags: str, out: str = "{tmp}/out", model: str = "{tmp}/nowhere") -> tuple[str, ...]:
    return ("quantize", method, "--model", model, "--bits", "4", "--out", out, *flags)


_FLAGS = [  # (id, what, argv, expected error): refused before any model is read or output written
    ("quantize-out-model", "quantize --out over a model dir", _quantize("rtn", out="{model}"), "already holds a model"),
    ("quantize-out-cwd", "quantize --out .", _quantize("rtn", out="."), "current directory"),
    ("quantize-out-file", "quantize --out naming a file", _quantize("rtn", out="{data}/play0.txt"), "is a file"),
    ("quantize-out-nonempty", "quantize --out over a non-empty dir", _quantize("rtn", out="{data}"), "already holds"),
    ("quantize-group-huge", "--group-size 2^70", _quantize("rtn", "--group-size", BIG), "--group-size"),
    ("quantize-seed-negative", "--seed -1", _quantize("rtn", "--seed", "-1"), "--seed"),
    ("quantize-seed-huge", "--seed 2^70", _quantize("rtn", "--seed", BIG), "--seed"),
    ("quantize-calib-huge", "--calib-samples 10^12", _quantize("gptq", "--calib-samples", "1000000000000"),
     "calibration needs"),
    ("quantize-seqlen-one", "--calib-seqlen 1", _quantize("gptq", "--calib-seqlen", "1"), "calibration needs"),
    ("quantize-tune-lr-inf", "--tune-lr inf", _quantize("gptq", "--tune-lr", "inf"), "--tune-lr"),
    ("quantize-tune-lr-nan", "--tune-lr nan", _quantize("gptq", "--tune-lr", "nan"), "--tune-lr"),
    ("quantize-distill-huge", "--distill-epochs 10^9", _quantize("gptq", "--distill-epochs", "1000000000"),
     "--distill-epochs"),
    ("quantize-rounds-huge", "--rounds 10^9", _quantize("shiftadd", "--rounds", "1000000000"), "--rounds"),
    ("quantize-mixed-nan", "--mixed-bits nan", _quantize("shiftadd", "--mixed-bits", "nan"), "--mixed-bits"),
    ("quantize-bits-zero", "--bits 0", ("quantize", "rtn", "--model", "x", "--bits", "0", "--out", "{tmp}/o"),
     "out of range"),
    ("pack-out-same", "pack --out the model dir itself", ("pack", "--model", "{model}", "--out", "{model}"), "same dir"),
    ("pack-out-cwd", "pack --out .", ("pack", "--model", "{model}", "--out", "."), "current directory"),
    ("pack-out-nonempty", "pack --out over a non-empty dir", ("pack", "--model", "{model}", "--out", "{data}"),
     "already holds"),
    ("pack-out-packed", "pack --out over another packed model", ("pack", "--model", "{model}", "--out", "{packed}"),
     "already holds a model"),
    ("pack-out-file", "pack --out naming a file", ("pack", "--model", "{model}", "--out", "{data}/play0.txt"),
     "is a file"),
    ("energy-context-negative", "energy --context -1", ("energy", "--model", "mmfree:370m", "--context", "-1"),
     "--context"),
    ("energy-context-huge", "energy --context 2^70", ("energy", "--model", "mmfree:370m", "--context", BIG), "--context"),
    ("energy-bits-zero", "energy --shiftadd-bits 0", ("energy", "--model", "mmfree:370m", "--shiftadd-bits", "0"),
     "--shiftadd-bits"),
    ("energy-json-dir", "energy --json naming a directory", ("energy", "--model", "mmfree:370m", "--json", "{tmp}"),
     "is a directory"),
    ("energy-preset-unknown", "energy --model mmfree:999b", ("energy", "--model", "mmfree:999b"), "unknown preset"),
    ("lmul-window-one", "lmul eval --window 1 (was ZeroDivisionError)", ("lmul", "eval", "--window", "1"), "--window"),
    ("lmul-window-zero", "lmul eval --window 0", ("lmul", "eval", "--window", "0"), "--window"),
    ("lmul-windows-zero", "lmul eval --windows 0", ("lmul", "eval", "--windows", "0"), "--windows"),
    ("lmul-json-dir", "lmul eval --json naming a directory", ("lmul", "eval", "--json", "{tmp}"), "is a directory"),
    ("lmul-methods-bad", "lmul eval --methods fp7", ("lmul", "eval", "--model", "{tmp}/x", "--methods", "fp7"),
     "unknown product"),
    ("lmul-samples-zero", "lmul error-table --samples 0", ("lmul", "error-table", "--samples", "0"), "--samples"),
    ("lmul-samples-huge", "lmul error-table --samples 10^12", ("lmul", "error-table", "--samples", "1000000000000"),
     "--samples"),
    ("lmul-seed-negative", "lmul error-table --seed -1", ("lmul", "error-table", "--seed", "-1"), "--seed"),
    ("lmul-png-dir", "lmul error-table --png naming a directory", ("lmul", "error-table", "--no-model", "--samples",
                                                                  "10", "--png", "{tmp}"), "--png"),
    ("lmul-table-json-dir", "lmul error-table --json naming a directory",
     ("lmul", "error-table", "--no-model", "--samples", "10", "--png", "{tmp}/p.png", "--json", "{tmp}"), "--json"),
    ("lmeval-limit-zero", "lm-eval --limit 0", ("lm-eval", "--model", "{model}", "--limit", "0"), "--limit"),
    ("lmeval-max-length-zero", "lm-eval --max-length 0", ("lm-eval", "--model", "{model}", "--max-length", "0"),
     "--max-length"),
    ("lmeval-tasks-empty", "lm-eval --tasks ,", ("lm-eval", "--model", "{model}", "--tasks", ","), "names no task"),
    ("lmeval-seed-huge", "lm-eval --seed 2^70", ("lm-eval", "--model", "{model}", "--seed", BIG), "--seed"),
    ("lmeval-out-dir", "lm-eval --out naming a directory", ("lm-eval", "--model", "{model}", "--out", "{tmp}"),
     "is a directory"),
    ("lmeval-hub-task-offline", "lm-eval --tasks arc_easy offline (was a 47-line traceback)",
     ("lm-eval", "--model", "{model}", "--tasks", "arc_easy", "--limit", "1"), "need a download"),
    ("lmeval-quantized-dir", "lm-eval on a quantized HF dir (not a mulfree model)",
     ("lm-eval", "--model", "{tmp}/q"), "unknown model_type"),
    ("serve-port-zero", "serve --port 0", ("serve", "--model", "{model}", "--port", "0"), "--port"),
    ("serve-port-huge", "serve --port 70000", ("serve", "--model", "{model}", "--port", "70000"), "--port"),
    ("serve-batch-zero", "serve --max-batch 0", ("serve", "--model", "{model}", "--max-batch", "0"), "--max-batch"),
    ("serve-batch-huge", "serve --max-batch 10^12", ("serve", "--model", "{model}", "--max-batch", "1000000000000"),
     "--max-batch"),
    ("serve-seed-negative", "serve --seed -1", ("serve", "--model", "{model}", "--seed", "-1"), "--seed"),
    ("serve-host-garbage", "serve --host 'a;b'", ("serve", "--model", "{model}", "--host", "a;b"), "--host"),
    ("serve-host-foreign", "serve --host 192.0.2.1 (an address of no local interface)",
     ("serve", "--model", "{model}", "--host", "192.0.2.1", "--port", "8765"), "cannot listen"),
]
CASES = [Case(id_, what, argv, expect, setup=d.qdir() if id_ == "lmeval-quantized-dir" else None)
          for id_, what, argv, expect in _FLAGS]
CASES += [
    Case("pack-overwrite", "pack --out over a packed model with --overwrite (replaced once complete)",
         ("pack", "--model", "{model}", "--out", "{tmp}/packed", "--overwrite"), None, copy=("packed",)),
    Case("energy-config-huge", "energy on a config.json with num_hidden_layers 100000000",
         ("energy", "--model", "{tmp}/model"), "num_hidden_layers", copy=M,
         setup=d.set_json("model/config.json", num_hidden_layers=100_000_000)),
    Case("energy-config-list", "energy on a config.json holding a list", ("energy", "--model", "{tmp}/model"),
         "JSON object", copy=M, setup=d.write("model/config.json", "[]")),
    Case("energy-config-not-json", "energy on a config.json that is not JSON", ("energy", "--model", "{tmp}/model"),
         "not valid JSON", copy=M, setup=d.write("model/config.json", "{")),
    Case("energy-hf-vocab-float", "energy on an HF config with vocab_size 1e11", ("energy", "--model", "{tmp}/c.json"),
         "vocab_size", setup=d.write("c.json", json.dumps({"model_type": "llama", "vocab_size": 1e11, "hidden_size": 64,
                                                          "num_hidden_layers": 2, "intermediate_size": 128,
                                                          "num_attention_heads": 4}))),
    Case("energy-hf-heads-string", "energy on an HF config with num_attention_heads '4'",
         ("energy", "--model", "{tmp}/c.json"), "num_attention_heads",
         setup=d.write("c.json", json.dumps({"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
                                            "num_hidden_layers": 2, "intermediate_size": 128,
                                            "num_attention_heads": "4"}))),
    Case("quantize-pickle-model", "quantize from an HF dir holding a malicious pytorch_model.bin",
         _quantize("rtn", model="{tmp}/hf"), "never loads pickles", setup=d.hf_pickle),
    Case("lmul-pickle-model", "lmul eval on an HF dir holding a malicious pytorch_model.bin",
         ("lmul", "eval", "--model", "{tmp}/hf"), "never loads pickles", setup=d.hf_pickle),
]
