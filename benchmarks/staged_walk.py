"""Calibration walk speed: the staged true-sequential walk (`quant.staged`, one pass per stream) against the traced
walk it replaces (`CalibrationStream.collect` per stage), on the first --blocks decoder blocks of each model, in
one run, with every quantized tensor compared bit for bit.

    python benchmarks/staged_walk.py                                     # OPT-125m and GPT-2 shapes, 2 blocks
    python benchmarks/staged_walk.py --models smollm2 --method gptq      # the bundled SmolLM2-135M

`smollm2` is the real model with calibration windows of the bundled corpus; `opt-125m` and `gpt2` are random
models of those shapes (transformers' default configs) calibrated on random token ids: speed does not depend
on the values. Prints a table, the 1-minute load average and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import transformers

from mulfree import offline
from mulfree.quant import staged
from mulfree.quant.config import WalkOptions
from mulfree.quant.gptq import GPTQ
from mulfree.quant.shiftadd import ShiftAdd
from mulfree.quant.walker import calibration_ids, decoder_blocks, quantize_model

METHODS = {
    "shiftadd-acc": lambda: ShiftAdd(3, 128, "acc", 10, 3, incoherence="hadamard-io"),
    "gptq": lambda: GPTQ(3, 128, incoherence="hadamard"),
}
RANDOM = {"opt-125m": transformers.OPTConfig, "gpt2": transformers.GPT2Config}


def model_and_calib(name: str, blocks: int, samples: int, seqlen: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model cut to its first `blocks` decoder blocks, and [samples, seqlen] calibration ids."""
    if name == "smollm2":
        from mulfree.data.text import load_corpus
        from mulfree.models.pretrained import load_smollm2

        model, tok = load_smollm2()
        calib = calibration_ids(tok, load_corpus().train_text, samples, seqlen, 0)
    else:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(RANDOM[name]()).eval()
        calib = torch.randint(0, model.config.vocab_size, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    path, layers = decoder_blocks(model)
    parent, attr = path.rsplit(".", 1)
    setattr(model.get_submodule(parent), attr, torch.nn.ModuleList(list(layers)[:blocks]))
    return model, calib


def timed_walk(name: str, args, traced: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model, calib = model_and_calib(name, args.blocks, args.calib_samples, args.calib_seqlen)
    real = staged.layout_of
    if traced:
        staged.layout_of = lambda *a: None
    try:
        t0 = time.perf_counter()
        quantize_model(model, METHODS[args.method](), calib, WalkOptions(progress=False))
        seconds = time.perf_counter() - t0
    finally:
        staged.layout_of = real
    return seconds, model.state_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=("smollm2", *RANDOM), default=list(RANDOM))
    ap.add_argument("--method", choices=sorted(METHODS), default="shiftadd-acc")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    args = ap.parse_args()
    offline.setup()
    rows = []
    for name in args.models:
        fast, q_fast = timed_walk(name, args, traced=False)
        slow, q_slow = timed_walk(name, args, traced=True)
        equal = sum(torch.equal(q_fast[k], q_slow[k]) for k in q_fast)
        rows.append({"model": name, "staged_s": round(fast, 1), "traced_s": round(slow, 1),
                     "speedup": round(slow / fast, 2), "tensors_equal": f"{equal}/{len(q_fast)}"})
        print(f"{name}: {args.blocks} blocks, staged {fast:.1f} s, traced {slow:.1f} s ({slow / fast:.2f}x); "
              f"{equal} of {len(q_fast)} tensors equal", flush=True)
    load = os.getloadavg()[0]
    print(f"load average (1 min): {load:.2f}")
    print(json.dumps({"benchmark": "staged_walk", "method": args.method, "blocks": args.blocks,
                      "calib": f"{args.calib_samples}x{args.calib_seqlen}", "threads": torch.get_num_threads(),
                      "load_1min": round(load, 2), "results": rows}))


if __name__ == "__main__":
    main()
