"""ShiftAdd LUT GEMV (Latency-mode BCQ, APoT scales) vs torch fp32 and bf16 GEMV, batch 1.

Shapes K→N 2048→2048 and 2048→5632, group 128, 3 APoT terms; median of `--reps` warm calls.
Prints a table of ms and ratios (torch time / kernel time) and one JSON line. Checks the kernel
against the dense product first and reports no speed if it disagrees.

    python benchmarks/shiftadd.py --bits 3 --reps 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mulfree.kernels import backend as default_backend
from mulfree.kernels import shiftadd as kernel
from mulfree.ops.bcq import bcq_dequantize
from mulfree.ops.powers import apot_round


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=128,
                    help="rows per scale set (each set covers 8 columns: 128 = `--group-size 1024`, 16 = 128)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--backend", default=None, help="kernel backend (default: best available)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads for the baselines")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    name = args.backend or default_backend()
    rows = []
    print(f"backend {name}, {args.bits}-bit, group {args.group}, torch threads {torch.get_num_threads()}")
    print(f"{'K->N':>12} {'fp32 ms':>8} {'bf16 ms':>8} " + " ".join(f"{'lut' + str(t) + 'T ms':>9} {'x fp32':>6} {'x bf16':>6}" for t in args.threads))
    for k, n in ((2048, 2048), (2048, 5632)):
        c, ng = k // 8, -(-n // args.group)
        planes = torch.randint(0, 256, (args.bits, n, c), dtype=torch.uint8)
        alpha = torch.rand(c, ng, args.bits) * 0.02 + 0.002
        _, exps, signs = apot_round(alpha, 3)
        w32 = bcq_dequantize(planes, exps, signs, n, k, args.group, 8)
        w16 = w32.bfloat16()
        x = torch.randn(k)
        x16 = x.bfloat16()
        prepared = kernel.prepare(planes, exps, signs, n, args.group)
        err = (kernel.lut_gemv(x, prepared, name) - w32 @ x).abs().max().item()
        if err > 1e-3 * (w32 @ x).abs().max().item():
            raise SystemExit(f"kernel disagrees with the dense product (max err {err}); no timings reported")
        t32 = median_ms(lambda: torch.mv(w32, x), args.reps)
        t16 = median_ms(lambda: torch.mv(w16, x16), args.reps)
        row = {"k": k, "n": n, "fp32_ms": round(t32, 4), "bf16_ms": round(t16, 4)}
        cells = []
        for t in args.threads:
            tl = median_ms(lambda: kernel.lut_gemv(x, prepared, name, t), args.reps)
            row[f"lut_{t}t_ms"] = round(tl, 4)
            row[f"speedup_vs_fp32_{t}t"] = round(t32 / tl, 2)
            row[f"speedup_vs_bf16_{t}t"] = round(t16 / tl, 2)
            cells.append(f"{tl:9.3f} {t32 / tl:6.2f} {t16 / tl:6.2f}")
        rows.append(row)
        print(f"{f'{k}->{n}':>12} {t32:8.3f} {t16:8.3f} " + " ".join(cells))
    print(json.dumps({"bench": "shiftadd_lut_gemv", "backend": name, "bits": args.bits, "group": args.group, "rows": rows}))


if __name__ == "__main__":
    main()
