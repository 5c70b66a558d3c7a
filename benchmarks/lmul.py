"""L-Mul matmul speed: the C++ kernel per backend and the torch reference vs torch fp32 matmul.

Prints one row per (shape, path) with the time and the ratio to torch fp32 matmul, then one JSON line.
L-Mul is a numerical simulator on CPUs (an FMA costs the same as an integer add), so expect ratios > 1.
Usage: python benchmarks/lmul.py [--threads N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mulfree.kernels import available_backends
from mulfree.kernels.lmul import lmul_matmul
from mulfree.ops.lmul import lmul_matmul as lmul_matmul_ref

# (M, K, N): attention scores of one head (T=512, D=64), attention·V, a SmolLM2 linear on 64 tokens
SHAPES = [(512, 64, 512), (512, 512, 64), (64, 576, 1536)]


def best_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch and kernel threads")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    results = []
    print(f"{'shape MxKxN':<16} {'path':<10} {'ms':>9} {'Gprod/s':>8} {'x fp32 matmul':>14}")
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        want = lmul_matmul_ref(a, b)
        base = best_time(lambda: a @ b, args.repeat * 10)
        paths = {"torch_fp32": base}
        for be in available_backends()[1:]:
            assert torch.equal(lmul_matmul(a, b, backend=be), want), f"{be} differs from the reference"
            paths[be] = best_time(lambda: lmul_matmul(a, b, backend=be), args.repeat)
        paths["reference"] = best_time(lambda: lmul_matmul_ref(a, b), 1)
        for path, t in paths.items():
            print(f"{f'{m}x{k}x{n}':<16} {path:<10} {1e3 * t:>9.3f} {m * k * n / t / 1e9:>8.2f} {t / base:>14.1f}")
            results.append({"shape": [m, k, n], "path": path, "seconds": t, "ratio_vs_fp32_matmul": t / base})
    print(json.dumps({"benchmark": "lmul_matmul", "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
