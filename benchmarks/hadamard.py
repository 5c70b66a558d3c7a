"""Online cost of randomized Hadamard incoherence per decoded token: the C++ transform vs its torch
reference (input side T x plus output side U⁻¹ y of one K→N layer), beside torch's fp32 GEMV of the same
layer, measured in one run. Prints ratios and a JSON line.

    python benchmarks/hadamard.py [--reps 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from mulfree.kernels import hadamard as kernel
from mulfree.ops.hadamard import RandomHadamard

SHAPES = ((2048, 2048), (2048, 5632))


def median_us(fn: Callable[[], object], reps: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with torch.no_grad():
        for k, n in SHAPES:
            rin, rout = RandomHadamard(k, 0), RandomHadamard(n, 1)
            x, y, lin = torch.randn(1, k), torch.randn(1, n), torch.nn.Linear(k, n, bias=False)
            ours = median_us(lambda: (kernel.apply_input(rin, x), kernel.invert_output(rout, y)), args.reps)
            ref = median_us(lambda: (rin.apply_input(x), rout.invert_output(y)), args.reps)
            gemv = median_us(lambda: lin(x), args.reps)
            rows.append({"k": k, "n": n, "cpp_us": round(ours, 1), "torch_us": round(ref, 1),
                         "fp32_gemv_us": round(gemv, 1), "speedup": round(ref / ours, 2),
                         "share_of_fp32_gemv": round(ours / gemv, 3)})
            print(f"{k}->{n}: transform in+out C++ {ours:.1f} us, torch {ref:.1f} us ({ref / ours:.1f}x); "
                  f"torch fp32 GEMV {gemv:.1f} us (transform = {100 * ours / gemv:.1f} % of it)")
    print(json.dumps({"benchmark": "hadamard", "threads": args.threads, "results": rows}))


if __name__ == "__main__":
    main()
