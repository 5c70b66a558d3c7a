"""Held-out perplexity of SmolLM2-135M: FP vs RTN, GPTQ and ShiftAdd (acc, lat) at 3 and 2 bits.

Calibration: random windows of the bundled corpus' train split; evaluation: the first
`--eval-windows` non-overlapping 512-token windows of its validation split. One JSON line per row
(appended to --jsonl as each finishes, so a partial run keeps its rows).

    python benchmarks/shiftadd_ppl.py --calib-samples 16 --eval-windows 8 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from mulfree import offline
from mulfree.data.text import load_corpus
from mulfree.evaluate import perplexity
from mulfree.models.pretrained import load_smollm2
from mulfree.quant.config import WalkOptions
from mulfree.quant.gptq import GPTQ
from mulfree.quant.rtn import RTN
from mulfree.quant.shiftadd import ShiftAdd
from mulfree.quant.walker import calibration_ids, quantize_model


@torch.no_grad()
def fit_gap(fp_model, qmodel, windows: torch.Tensor) -> dict:
    """Mean per-token cross-entropy of both models and KL(p_FP || p_q) over `windows` [n, T]: how much of the
    quantization loss shows on these windows (calibration windows vs held-out ones measures overfitting)."""
    ce_fp = ce_q = kl = 0.0
    for row in windows:
        lf, lq = (torch.log_softmax(m(row[None]).logits[0, :-1].float(), -1) for m in (fp_model, qmodel))
        target = row[1:, None]
        ce_fp -= lf.gather(1, target).mean().item()
        ce_q -= lq.gather(1, target).mean().item()
        kl += (lf.exp() * (lf - lq)).sum(-1).mean().item()
    n = len(windows)
    return {"ce_fp": round(ce_fp / n, 4), "ce_q": round(ce_q / n, 4), "kl": round(kl / n, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128, as mulfree quantize)")
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128, help="weights per scale set (lat: 8 columns x group/8 rows)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--apot-terms", type=int, default=3, help="signed powers of two per ShiftAdd scale")
    ap.add_argument("--incoherence", choices=("none", "hadamard", "hadamard-out", "hadamard-io"), default="none",
                    help="randomized Hadamard incoherence processing for gptq and shiftadd rows")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "shiftadd-acc", "shiftadd-lat"])
    ap.add_argument("--runs", nargs="+", default=None, metavar="METHOD:BITS",
                    help="explicit (method, bits) rows instead of --methods x --bits, e.g. gptq:3 shiftadd-acc:2")
    ap.add_argument("--skip-fp", action="store_true", help="do not report the FP row again (it is still measured for ratios)")
    ap.add_argument("--jsonl", default="shiftadd_ppl.jsonl")
    ap.add_argument("--fit-gap", action="store_true",
                    help="also report CE of FP and quantized model and their KL on the calibration and held-out windows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--percdamp", type=float, default=0.01, help="Hessian dampening (fraction of mean diag)")
    ap.add_argument("--tune-epochs", type=int, default=0, help="norm tweaking epochs per block (0 = off)")
    ap.add_argument("--tune-lr", type=float, default=1e-3)
    ap.add_argument("--distill-epochs", type=int, default=0,
                    help="end-to-end distillation of norms and biases to the FP model's logits (0 = off)")
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                    help="Hessians of all linears from the FP block instead of stage by stage")
    ap.add_argument("--asymmetric", action=argparse.BooleanOptionalAction, default=True,
                    help="asymmetric calibration: fit each layer to the FP model's output (default on)")
    ap.add_argument("--calib-precision", choices=("fp32", "bf16"), default="fp32",
                    help="matmuls of the calibration forwards and Hessian sums (WalkOptions.calib_precision)")
    args = ap.parse_args()
    offline.setup()

    torch.manual_seed(args.seed)
    model, tok = load_smollm2()
    corpus = load_corpus()
    ids = torch.tensor(tok(corpus.val_text)["input_ids"], dtype=torch.long)[: args.eval_windows * args.window]
    calib = calibration_ids(tok, corpus.train_text, args.calib_samples, args.calib_seqlen, args.seed)
    setup = {"model": "SmolLM2-135M-Instruct", "eval_tokens": ids.numel(), "window": args.window,
             "weights_per_scale_set": args.group_size,
             "calib": f"{args.calib_samples}x{args.calib_seqlen}", "group": args.group_size, "rounds": args.rounds,
             "apot_terms": args.apot_terms, "incoherence": args.incoherence,
             "true_sequential": args.true_sequential, "tune_epochs": args.tune_epochs, "tune_lr": args.tune_lr,
             "distill_epochs": args.distill_epochs, "distill_lr": args.distill_lr,
             "percdamp": args.percdamp, "asymmetric": args.asymmetric, "calib_precision": args.calib_precision}

    def report(row: dict) -> None:
        line = json.dumps({**setup, **row})
        print(line, flush=True)
        with open(args.jsonl, "a") as f:
            f.write(line + "\n")

    walk = WalkOptions(true_sequential=args.true_sequential, asymmetric=args.asymmetric,
                       tune_epochs=args.tune_epochs, tune_lr=args.tune_lr,
                       distill_epochs=args.distill_epochs, distill_lr=args.distill_lr,
                       calib_precision=args.calib_precision)
    fp = perplexity(model, ids, args.window, progress=False)
    if not args.skip_fp:
        report({"method": "fp32", "bits": 32, "ppl": round(fp, 3)})
    makers = {
        "rtn": lambda b: RTN(b, args.group_size),
        "gptq": lambda b: GPTQ(b, args.group_size, percdamp=args.percdamp, incoherence=args.incoherence,
                               seed=args.seed),
        "shiftadd-acc": lambda b: ShiftAdd(b, args.group_size, "acc", args.rounds, args.apot_terms,
                                           percdamp=args.percdamp, incoherence=args.incoherence, seed=args.seed),
        "shiftadd-lat": lambda b: ShiftAdd(b, args.group_size, "lat", args.rounds, args.apot_terms,
                                           percdamp=args.percdamp, incoherence=args.incoherence, seed=args.seed),
    }
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs] if args.runs else [
        (name, bits) for bits in args.bits for name in args.methods]
    for name, bits in runs:
        t0 = time.time()
        qmodel = copy.deepcopy(model)
        quantize_model(qmodel, makers[name](bits), calib, walk)
        ppl = perplexity(qmodel, ids, args.window, progress=False)
        row = {"method": name, "bits": bits, "ppl": round(ppl, 3), "ratio_vs_fp": round(ppl / fp, 3),
               "seconds": round(time.time() - t0, 1)}
        if args.fit_gap:
            row["gap_calib"] = fit_gap(model, qmodel, calib)
            row["gap_heldout"] = fit_gap(model, qmodel, ids[: ids.numel() // args.window * args.window].view(-1, args.window))
        report(row)


if __name__ == "__main__":
    main()
