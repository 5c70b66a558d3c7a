"""ShiftAdd LUT GEMV (Latency-mode BCQ, APoT scales) vs torch fp32 and bf16 GEMV, batch 1.

Shapes K→N 2048→2048 and 2048→5632, 3 APoT terms; `--group` rows × 8 columns per scale set. For
every kernel thread count T, torch runs with T threads and with 1 thread; ratio = torch time /
kernel time. Candidates run in interleaved blocks (so load from other processes hits all of them
alike, with a pause between blocks so that idle spinning threads of one do not slow the next).
Ratios use the median over `--reps` warm calls; the last two columns use the fastest call of each
(vs torch fp32 with the same threads | with 1 thread), less sensitive to other jobs on a shared host. Prints a table and one JSON line;
checks every measured backend against the dense product first and reports no speed if one disagrees.

    python benchmarks/shiftadd.py --bits 3 --group 128 --reps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from mulfree.kernels import backend as default_backend
from mulfree.kernels import shiftadd as kernel
from mulfree.ops.bcq import bcq_dequantize
from mulfree.ops.powers import apot_round

BLOCK = 50  # calls of one candidate per round: steady state as in decoding (a woken worker needs a few calls)
SETTLE_S = 0.01  # pause before each block: idle worker threads of the previous block stop spinning


def interleaved_times(
    cands: dict[str, tuple[int, Callable[[], object]]], reps: int
) -> dict[str, list[float]]:
    """ms per call of each candidate (torch threads, fn), measured in interleaved blocks."""
    times: dict[str, list[float]] = {name: [] for name in cands}
    for _ in range(max(1, reps // BLOCK)):
        for name, (threads, fn) in cands.items():
            torch.set_num_threads(threads)
            time.sleep(SETTLE_S)
            fn()
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: [1e3 * t for t in ts] for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument(
        "--group",
        type=int,
        default=128,
        help="rows per scale set (each set covers 8 columns: 128 = `--group-size 1024`, 16 = 128)",
    )
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--backends", nargs="+", default=None, help="kernel backends (default: the best available)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    backends = args.backends or [default_backend()]
    torch_threads = sorted(set(args.threads) | {1})
    rows = []
    print(
        f"{args.bits}-bit, group {args.group} rows x 8 columns, median of {args.reps} calls; "
        "x = torch ms / kernel ms (torch with the same threads | with 1 thread)"
    )
    print(
        f"{'K->N':>11} {'backend':>7} {'T':>2} {'lut ms':>7} {'fp32 ms':>8} {'bf16 ms':>8} "
        f"{'x fp32':>6} {'x bf16':>6} {'x fp32@1T':>9} {'x bf16@1T':>9} {'min x fp32':>10} {'min x fp32@1T':>13}"
    )
    for k, n in ((2048, 2048), (2048, 5632)):
        c, ng = k // 8, -(-n // args.group)
        planes = torch.randint(0, 256, (args.bits, n, c), dtype=torch.uint8)
        alpha = torch.rand(c, ng, args.bits) * 0.02 + 0.002
        _, exps, signs = apot_round(alpha, 3)
        w32 = bcq_dequantize(planes, exps, signs, n, k, args.group, 8)
        w16 = w32.bfloat16()
        x = torch.randn(k)
        x16 = x.bfloat16()
        dense = w32 @ x
        prepared = kernel.prepare(planes, exps, signs, n, args.group)
        for name in backends:
            err = (kernel.lut_gemv(x, prepared, name) - dense).abs().max().item()
            if err > 1e-3 * dense.abs().max().item():
                raise SystemExit(
                    f"{name} kernel disagrees with the dense product (max err {err}); no timings reported"
                )
        cands: dict[str, tuple[int, Callable[[], object]]] = {}
        for t in torch_threads:
            cands[f"fp32_{t}t"] = (t, lambda w32=w32, x=x: torch.mv(w32, x))
            cands[f"bf16_{t}t"] = (t, lambda w16=w16, x16=x16: torch.mv(w16, x16))
        for name in backends:
            for t in args.threads:
                cands[f"{name}_{t}t"] = (
                    1,
                    lambda name=name, t=t, x=x, prepared=prepared: kernel.lut_gemv(x, prepared, name, t),
                )
        times = interleaved_times(cands, args.reps)
        ms = {name: statistics.median(ts) for name, ts in times.items()}
        best = {name: min(ts) for name, ts in times.items()}
        row = {
            "k": k,
            "n": n,
            **{f"{key}_ms": round(v, 4) for key, v in ms.items()},
            **{f"{key}_min_ms": round(v, 4) for key, v in best.items()},
        }
        for name in backends:
            for t in args.threads:
                lut = ms[f"{name}_{t}t"]
                ratios = {
                    f"{name}_{t}t_x_fp32": ms[f"fp32_{t}t"] / lut,
                    f"{name}_{t}t_x_bf16": ms[f"bf16_{t}t"] / lut,
                    f"{name}_{t}t_x_fp32_1t": ms["fp32_1t"] / lut,
                    f"{name}_{t}t_x_bf16_1t": ms["bf16_1t"] / lut,
                }
                ratios[f"{name}_{t}t_min_x_fp32"] = best[f"fp32_{t}t"] / best[f"{name}_{t}t"]
                ratios[f"{name}_{t}t_min_x_fp32_1t"] = best["fp32_1t"] / best[f"{name}_{t}t"]
                row.update({key: round(v, 2) for key, v in ratios.items()})
                r = list(ratios.values())
                print(
                    f"{f'{k}->{n}':>11} {name:>7} {t:>2} {lut:7.3f} {ms[f'fp32_{t}t']:8.3f} {ms[f'bf16_{t}t']:8.3f} "
                    f"{r[0]:6.2f} {r[1]:6.2f} {r[2]:9.2f} {r[3]:9.2f} {r[4]:10.2f} {r[5]:13.2f}"
                )
        rows.append(row)
    print(
        json.dumps(
            {
                "bench": "shiftadd_lut_gemv",
                "bits": args.bits,
                "group": args.group,
                "reps": args.reps,
                "torch": torch.__version__,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
