"""Decode and prefill speed of the packed 2-bit engine vs torch fp32 / bf16 dense models of the same
shape, beside the machine's streaming read bandwidth measured in the same run.

    python benchmarks/decode.py                     # 370m and 1.3b shapes (a few minutes)
    python benchmarks/decode.py --shapes tiny --tokens 8 --prefill 32   # smoke run
    python benchmarks/decode.py --shapes 1.3b --batch 1 8 32   # batched decode only: aggregate tok/s per B
    python benchmarks/decode.py --shapes 1.3b --batch 8 32 --formats t1   # the same in the 1.6-bit format
    python benchmarks/decode.py --shapes 1.3b --formats t2 t1 --rounds 3   # packed formats side by side
    python benchmarks/decode.py --shapes 1.3b --contention --rounds 3      # 1 vs 2 threads, idle and one core busy

Weights are random (speed does not depend on values). Prints a table, the ratios, effective GB/s,
% of the bandwidth roofline, and one JSON line.

torch picks its kernels by the host's ISA too, so where the host has more than the engine path being
timed, the torch baselines are also timed in a child process limited to that path's ISA (oneDNN's
ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY): with AMX present, bf16 without AMX
beside our engine with AMX off (an AVX-512 host without AMX, e.g. Zen 4); with MULFREE_BACKEND=avx2 on
an AVX-512 host, torch at AVX2 (an AVX2-only host, e.g. Zen 3). These emulate such hosts' instruction
sets, not their cores or memory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from demo_load import one_core_busy

from mulfree.infer.engine import PackedModel
from mulfree.infer.packed_layout import layout
from mulfree.kernels import backend as best_backend
from mulfree.kernels import cpu_module
from mulfree.kernels.ternary import amx_available, set_amx
from mulfree.ops.pack import packed_format
from mulfree.ops.pack_t1 import encode_codes
from mulfree.ops.sampling import greedy

SHAPES = {  # name: (vocab, hidden, layers, intermediate), reference/matmulfree.md §1.2
    "tiny": (4096, 256, 4, 768),
    "370m": (32000, 1024, 24, 2816),
    "1.3b": (32000, 2048, 24, 5632),
}
# engine path -> (label, environment that limits torch to that path's ISA)
TORCH_LIMITS = {
    "vnni": ("AMX off", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}),
    "avx2": ("at AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}),
    "avxvnni": ("at AVX2 + AVX-VNNI", {"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                       "ATEN_CPU_CAPABILITY": "avx2"}),
}
VALID_BYTES = {  # the bytes each packer writes (random trits are random bytes among these)
    "mulfree-t2": torch.tensor([b for b in range(256) if all((b >> (2 * s)) & 3 != 3 for s in range(4))],
                               dtype=torch.uint8),
    "mulfree-t1": encode_codes(torch.cartesian_prod(*[torch.arange(3)] * 5)),
}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random_packed_model(vocab: int, d: int, layers: int, inter: int, threads: int, seed: int,
                        fmt: str = "t2") -> PackedModel:
    """A PackedModel in format `fmt` with random trits (every byte one the packer writes), unit norms, random lower
    bounds."""
    f = packed_format(fmt)
    valid = VALID_BYTES[f.name]
    g = torch.Generator().manual_seed(seed)
    cfg = {"model_type": "mmfree", "vocab_size": vocab, "hidden_size": d, "num_hidden_layers": layers,
           "intermediate_size": inter, "rms_norm_eps": 1e-6, "use_lower_bound": True}
    linears, shapes = layout(cfg)
    t = {name: torch.ones(shape) for name, shape in shapes.items() if name.endswith("norm.weight")}
    t["model.embeddings.weight"] = torch.randn(vocab, d, generator=g).to(torch.bfloat16)
    t["model.lb"] = torch.rand(layers, d, generator=g)
    for name, (n, k) in linears.items():
        t[name + ".packed"] = valid[torch.randint(0, len(valid), f.packed_shape(n, k), generator=g)]
        t[name + ".scale"] = torch.tensor([0.02])
    return PackedModel(cfg, t, backend=best_backend(), threads=threads, fmt=f.name)


def read_bandwidth(nbytes: int, threads: int, reps: int) -> float:
    """Streaming read bandwidth in GB/s (best of reps over an nbytes buffer): benchmarks/bandwidth.cpp, compiled
    with the machine's g++ (or $CXX) into ~/.cache/mulfree on first use and called through ctypes."""
    src = Path(__file__).with_name("bandwidth.cpp")
    lib = Path.home() / ".cache" / "mulfree" / f"bandwidth-{hashlib.sha1(src.read_bytes()).hexdigest()[:12]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([os.environ.get("CXX", "g++"), "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src),
                        "-lpthread"], check=True)
        os.replace(tmp, lib)
    fn = ctypes.CDLL(str(lib)).read_bandwidth
    fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    return fn(nbytes, threads, reps)


class DenseMMfree(torch.nn.Module):
    """The MMfree forward with plain dense linears (no quantization): the torch baseline of the same shape."""

    def __init__(self, vocab: int, d: int, layers: int, inter: int, dtype: torch.dtype):
        super().__init__()

        def lin(n: int, k: int) -> torch.nn.Linear:
            m = torch.nn.Linear(k, n, bias=False, dtype=dtype)
            m.weight.data.fill_(0.01)  # touch every page; values do not change the speed
            return m

        self.emb = torch.nn.Embedding(vocab, d, dtype=dtype)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleList([lin(d, d), lin(d, d), lin(d, d), lin(d, d), lin(2 * inter, d), lin(d, inter)])
            for _ in range(layers))
        self.head = lin(vocab, d)
        self.d = d

    def forward(self, ids: torch.Tensor, state: list[torch.Tensor]) -> torch.Tensor:
        x = self.emb(ids)  # [T, d]
        for layer, h in zip(self.layers, state):
            i_p, f_p, g_p, o_p, gate_p, down_p = layer
            a = F.rms_norm(x, (self.d,))
            f = torch.sigmoid(f_p(a))
            i = F.silu(i_p(a)) * (1 - f)
            hs = []
            for t in range(x.shape[0]):
                h.mul_(f[t]).add_(i[t])
                hs.append(h.clone())
            x = x + o_p(F.rms_norm(g_p(a), (self.d,)) * F.silu(torch.stack(hs)))
            gate, up = gate_p(F.rms_norm(x, (self.d,))).chunk(2, dim=-1)
            x = x + down_p(F.silu(gate) * up)
        return self.head(F.rms_norm(x[-1:], (self.d,)))


def best_rate(count: int, run: Callable[[], object], setup: Callable[[], object] = lambda: None) -> float:
    """count / seconds of the fastest of 3 timed run() calls, setup() untimed before each (the host is shared)."""
    best = 0.0
    for _ in range(3):
        setup()
        t0 = time.perf_counter()
        run()
        best = max(best, count / (time.perf_counter() - t0))
    return best


def time_packed(pm: PackedModel, tokens: int, prefill: int) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s) of the packed engine."""
    ids = torch.randint(0, pm.config["vocab_size"], (prefill,))
    pm.reset()
    pm.forward(ids[:8])
    pre = best_rate(prefill, lambda: pm.forward(ids), setup=pm.reset)
    tok = [1]
    for _ in range(2):
        pm.forward(tok)

    def window() -> None:
        for _ in range(tokens):
            tok[0] = int(greedy(pm.forward(tok)))

    return best_rate(tokens, window), pre


@torch.inference_mode()
def time_dense(model: DenseMMfree, vocab: int, d: int, layers: int, tokens: int, prefill: int) -> tuple[float, float]:
    dtype = model.head.weight.dtype
    ids = torch.randint(0, vocab, (prefill,))
    model(ids[:8], [torch.zeros(d, dtype=dtype) for _ in range(layers)])
    state: list[torch.Tensor] = []

    def fresh_state() -> None:
        state[:] = [torch.zeros(d, dtype=dtype) for _ in range(layers)]

    pre = best_rate(prefill, lambda: model(ids, state), setup=fresh_state)
    tok = [torch.tensor([1])]
    for _ in range(2):
        model(tok[0], state)

    def window() -> None:
        for _ in range(tokens):
            tok[0] = greedy(model(tok[0], state))

    return best_rate(tokens, window), pre


def batched_window(pm: PackedModel, batch: int, steps: int) -> Callable[[], float]:
    """A timer of `batch` sequences at different positions, one decode_batch call per step: each call returns
    the aggregate tok/s of `steps` steps."""
    vocab = pm.config["vocab_size"]
    states = torch.stack([pm.prefill_state(torch.randint(0, vocab, (1 + b % 8,)))[1] for b in range(batch)])
    tok = [torch.randint(0, vocab, (batch,))]
    pm.decode_batch(tok[0], states)

    def window() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            tok[0] = greedy(pm.decode_batch(tok[0], states))
        return batch * steps / (time.perf_counter() - t0)

    return window


def bench_batched(name: str, args: argparse.Namespace) -> dict:
    """Batched decode of shape `name`, 2 threads: aggregate tok/s per batch size beside B = 1 and prefill. The
    batch sizes and the prefill are timed in turn, round after round, best of each kept (the host is shared)."""
    vocab, d, layers, inter = SHAPES[name]
    torch.set_num_threads(1)  # torch's argmax workers would spin against the engine's pool on 2 cores
    fmt = (args.formats or ["t2"])[0]
    pm = random_packed_model(vocab, d, layers, inter, threads=2, seed=args.seed, fmt=fmt)
    ids = torch.randint(0, vocab, (args.prefill,))
    timers = {f"batch_{b}": batched_window(pm, b, args.tokens) for b in args.batch}

    def prefill() -> float:
        t0 = time.perf_counter()
        pm.prefill_state(ids)
        return args.prefill / (time.perf_counter() - t0)

    timers["prefill"] = prefill
    res: dict = {"shape": name, "steps": args.tokens, "rounds": args.rounds}
    for _ in range(args.rounds):
        for key, timer in timers.items():
            res[key] = max(res.get(key, 0.0), timer())
    print(f"\n[{name}] {fmt}, 2T: {args.prefill}-token prefill {res['prefill']:.1f} tok/s")
    base = res.get("batch_1")
    for b in args.batch:
        r = res[f"batch_{b}"]
        vs = f"  {r / base:5.2f}x B=1" if base else ""
        print(f"decode_batch B={b:<4}{r:>10.1f} tok/s aggregate{vs}  {r / res['prefill']:5.2f}x prefill")
    return res


def decode_window(pm: PackedModel, steps: int) -> float:
    """tok/s of `steps` greedy decode steps of one sequence (batch 1), after two untimed ones."""
    tok = [1]
    for _ in range(2):
        pm.forward(tok)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok[0] = int(greedy(pm.forward(tok)))
    return steps / (time.perf_counter() - t0)


def prefill_then_decode(pm: PackedModel, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """(prefill tok/s of `ids` from a fresh state, then the better of two `steps`-step decode windows)."""
    pm.reset()
    t0 = time.perf_counter()
    pm.forward(ids)
    prefill = len(ids) / (time.perf_counter() - t0)
    return prefill, max(decode_window(pm, steps) for _ in range(2))


def bench_contention(name: str, args: argparse.Namespace) -> dict:
    """Decode (batch 1) and prefill tok/s of shape `name` at 1 and 2 threads, with the machine as it is and while
    another process (a pure-Python spin loop, a second user's job) keeps one core busy, round after round: the
    per-round values, the 2-thread / 1-thread ratios in each condition and the load averages."""
    vocab, d, layers, inter = SHAPES[name]
    torch.set_num_threads(1)
    pm2 = random_packed_model(vocab, d, layers, inter, threads=2, seed=args.seed)
    models = {1: PackedModel(pm2.config, pm2.tensors, backend=pm2.backend, threads=1), 2: pm2}
    ids = torch.randint(0, vocab, (args.prefill,))
    for pm in models.values():
        pm.reset()
        pm.forward(ids[:8])
    res: dict = {"shape": name, "steps": args.tokens, "prefill_tokens": args.prefill, "rounds": []}
    for r in range(args.rounds):
        for cond in ("idle", "busy"):
            with one_core_busy(600, settle=0.5) if cond == "busy" else contextlib.nullcontext():
                row: dict = {"condition": cond, "load_before": os.getloadavg()[0]}
                for threads, pm in models.items():
                    row[f"{threads}t_prefill"], row[f"{threads}t_decode"] = prefill_then_decode(pm, ids, args.tokens)
                row["load_after"] = os.getloadavg()[0]
            for phase in ("decode", "prefill"):
                row[f"{phase}_2t_x_1t"] = row[f"2t_{phase}"] / row[f"1t_{phase}"]
            res["rounds"].append(row)
            print(f"[{name}] round {r + 1} {cond:<4} (load {row['load_before']:.2f} -> {row['load_after']:.2f}): "
                  + ", ".join(f"{t}T decode {row[f'{t}t_decode']:.1f} / prefill {row[f'{t}t_prefill']:.1f}"
                              for t in models)
                  + f"; 2T/1T decode {row['decode_2t_x_1t']:.2f}x, prefill {row['prefill_2t_x_1t']:.2f}x")
    for cond in ("idle", "busy"):
        rows = [row for row in res["rounds"] if row["condition"] == cond]
        for key in ("1t_decode", "2t_decode", "1t_prefill", "2t_prefill", "decode_2t_x_1t", "prefill_2t_x_1t"):
            vals = [row[key] for row in rows]
            res[f"{cond}_{key}_range"] = [min(vals), max(vals)]
        print(f"  {cond}: " + ", ".join(f"{key} {res[f'{cond}_{key}_range'][0]:.2f}-{res[f'{cond}_{key}_range'][1]:.2f}"
                                          for key in ("1t_decode", "2t_decode", "decode_2t_x_1t", "1t_prefill",
                                                      "2t_prefill", "prefill_2t_x_1t")))
    return res


def bench_formats(name: str, args: argparse.Namespace) -> dict:
    """Decode (batch 1) and prefill tok/s of shape `name` in each packed format at 1 and 2 threads, timed in turn
    round after round (the host is shared): per-round values, their ranges, and the load average around each
    round."""
    vocab, d, layers, inter = SHAPES[name]
    torch.set_num_threads(1)  # torch's argmax workers would spin against the engine's pool on 2 cores
    models = {}
    for f in args.formats:
        pm = random_packed_model(vocab, d, layers, inter, threads=2, seed=args.seed, fmt=f)
        models[f, 2] = pm
        models[f, 1] = PackedModel(pm.config, pm.tensors, backend=pm.backend, threads=1, fmt=pm.format.name)
    ids = torch.randint(0, vocab, (args.prefill,))
    res: dict = {"shape": name, "steps": args.tokens, "prefill_tokens": args.prefill, "rounds": []}
    for (f, threads), pm in models.items():
        res[f"{f}_packed_mb"] = sum(v.numel() for k, v in pm.tensors.items() if k.endswith(".packed")) / 1e6
        pm.reset()
        pm.forward(ids[:8])  # first touch of every page before any timing
    keys = [f"{f}_{threads}t" for f, threads in models]
    for r in range(args.rounds):
        row: dict = {"load_before": os.getloadavg()[0]}
        for (f, threads), pm in models.items():
            row[f"{f}_{threads}t_prefill"], row[f"{f}_{threads}t_decode"] = prefill_then_decode(pm, ids, args.tokens)
        row["load_after"] = os.getloadavg()[0]
        res["rounds"].append(row)
        print(f"[{name}] round {r + 1} (load {row['load_before']:.2f} -> {row['load_after']:.2f}): " + ", ".join(
            f"{k} decode {row[k + '_decode']:.1f} / prefill {row[k + '_prefill']:.1f}" for k in keys))
    for k in keys:
        for phase in ("decode", "prefill"):
            vals = [row[f"{k}_{phase}"] for row in res["rounds"]]
            res[f"{k}_{phase}_range"] = [min(vals), max(vals)]
    base = args.formats[0]
    for f in args.formats[1:]:
        for threads in (1, 2):
            for phase in ("decode", "prefill"):
                ratios = [row[f"{f}_{threads}t_{phase}"] / row[f"{base}_{threads}t_{phase}"] for row in res["rounds"]]
                res[f"{f}_{threads}t_{phase}_x_{base}_range"] = [min(ratios), max(ratios)]
    print(f"\n[{name}] batch 1, {args.tokens}-step decode windows (best of 2 per round), {args.prefill}-token "
          f"prefill, {args.rounds} rounds, tok/s (min-max over rounds):")
    for k in keys:
        f = k.rsplit("_", 1)[0]
        lo, hi = res[f"{k}_decode_range"]
        plo, phi = res[f"{k}_prefill_range"]
        print(f"  {k:<6} {res[f'{f}_packed_mb']:5.0f} MB packed  decode {lo:6.1f}-{hi:6.1f}  prefill {plo:6.1f}-{phi:6.1f}")
    for f in args.formats[1:]:
        for threads in (1, 2):
            d_lo, d_hi = res[f"{f}_{threads}t_decode_x_{base}_range"]
            p_lo, p_hi = res[f"{f}_{threads}t_prefill_x_{base}_range"]
            print(f"  {f} / {base}, {threads} thread(s), per round: decode {d_lo:.2f}-{d_hi:.2f}x, prefill "
                  f"{p_lo:.2f}-{p_hi:.2f}x")
    loads = [row[k] for row in res["rounds"] for k in ("load_before", "load_after")]
    print(f"  load average (1 min) during the rounds: {min(loads):.2f}-{max(loads):.2f}")
    return res


def torch_baseline(name: str, dtype: torch.dtype, args: argparse.Namespace) -> tuple[float, float]:
    """(decode, prefill) tok/s of the dense torch model of shape `name` in `dtype`, 2 threads."""
    vocab, d, layers, inter = SHAPES[name]
    torch.set_num_threads(2)
    dense = DenseMMfree(vocab, d, layers, inter, dtype)
    out = time_dense(dense, vocab, d, layers, max(2, args.tokens // 4), args.prefill)
    del dense
    gc.collect()
    return out


def limited_torch_path() -> str | None:
    """Which TORCH_LIMITS entry this run needs: the ISA the timed engine path uses where torch's is wider."""
    feats = cpu_module().cpu_features()
    if best_backend() in ("avx2", "avxvnni") and feats.get("avx512"):
        return best_backend()
    return "vnni" if best_backend() == "avx512" and amx_available() else None


def torch_limited(name: str, path: str, args: argparse.Namespace) -> dict:
    """The torch baselines of shape `name` in a child process whose torch may only use `path`'s ISA
    (the libraries read these variables when they start)."""
    cmd = [sys.executable, __file__, "--torch-only", "--shapes", name, "--tokens", str(args.tokens),
           "--prefill", str(args.prefill), "--seed", str(args.seed)]
    env = {**os.environ, **TORCH_LIMITS[path][1]}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def torch_rows(name: str, args: argparse.Namespace) -> dict:
    """torch bf16 and fp32 (decode, prefill) tok/s of shape `name` in this process."""
    res = {}
    for dtype, key in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        res[f"torch_{key}_decode"], res[f"torch_{key}_prefill"] = torch_baseline(name, dtype, args)
    return res


def bench_shape(name: str, args: argparse.Namespace, bw2: float) -> dict:
    vocab, d, layers, inter = SHAPES[name]
    res: dict = {"shape": name}
    pm = random_packed_model(vocab, d, layers, inter, threads=2, seed=args.seed)
    packed_bytes = sum(v.numel() for k, v in pm.tensors.items() if k.endswith(".packed"))
    per_token = packed_bytes + 4 * (d * (5 * layers + 1)) + 2 * d  # trits + norm vectors + one embedding row
    res["bytes_per_token_mb"] = per_token / 1e6
    for threads in (1, 2):
        pm_t = pm if threads == 2 else PackedModel(pm.config, pm.tensors, backend=pm.backend, threads=1)
        dec, pre = time_packed(pm_t, args.tokens, args.prefill)
        res[f"packed_{threads}t_decode"], res[f"packed_{threads}t_prefill"] = dec, pre
    if amx_available():  # the same engine with AMX off: the avx512 VNNI GEMM tiles
        prev = set_amx(False)
        res["packed_2t_vnni_decode"], res["packed_2t_vnni_prefill"] = time_packed(pm, args.tokens, args.prefill)
        set_amx(prev)
    del pm, pm_t
    gc.collect()
    res.update(torch_rows(name, args))
    path = limited_torch_path()
    if path is not None:  # ours on `path` against torch limited to the same ISA
        ours = "packed_2t_vnni" if path == "vnni" else "packed_2t"
        for key, val in torch_limited(name, path, args).items():
            res[key.replace("torch_", f"torch_{path}_")] = val
        for key in ("bf16", "fp32"):
            for phase in ("decode", "prefill"):
                res[f"{path}_{phase}_x_{key}_{path}"] = res[f"{ours}_{phase}"] / res[f"torch_{path}_{key}_{phase}"]
    res["roofline_2t_tok_s"] = bw2 * 1e9 / per_token
    res["pct_roofline_2t"] = 100 * res["packed_2t_decode"] / res["roofline_2t_tok_s"]
    res["effective_gb_s_2t"] = res["packed_2t_decode"] * per_token / 1e9
    for key in ("bf16", "fp32"):
        res[f"decode_x_{key}"] = res["packed_2t_decode"] / res[f"torch_{key}_decode"]
        res[f"prefill_x_{key}"] = res["packed_2t_prefill"] / res[f"torch_{key}_prefill"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["370m", "1.3b"], choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=32, help="decode steps per timed window (best of 3) of the packed engine")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens timed for prefill")
    p.add_argument("--bw-mb", type=int, default=1024, help="buffer for the bandwidth measurement (MB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, nargs="+", help="only time batched decode at these batch sizes")
    p.add_argument("--rounds", type=int, default=5,
                   help="--batch: rounds over the batch sizes (best of each kept); --formats: rounds over the formats")
    p.add_argument("--formats", nargs="+", choices=["t2", "t1"],
                   help="only time the packed engine in these formats, side by side (decode batch 1 and prefill); "
                        "with --batch, the one format of the batched model")
    p.add_argument("--contention", action="store_true",
                   help="only time 1 and 2 threads, idle and with another process keeping one core busy")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)  # the child of torch_limited
    args = p.parse_args()
    if args.batch and args.formats and len(args.formats) > 1:
        p.error("--batch takes one --formats value")
    if args.torch_only:
        torch.manual_seed(args.seed)
        print(json.dumps(torch_rows(args.shapes[0], args)))
        return
    if cpu_module() is None:
        raise SystemExit("error: the compiled extension is missing; reinstall mulfree")
    torch.manual_seed(args.seed)
    # The single-purpose modes: (flag, benchmark name, function of one shape).
    for flag, bench, fn in (("contention", "decode_contention", bench_contention),
                            ("batch", "decode_batch", bench_batched), ("formats", "decode_formats", bench_formats)):
        if getattr(args, flag):
            print(f"host: {cpu_model()}, {os.cpu_count()} CPUs, kernel backend {best_backend()}")
            results = [fn(name, args) for name in args.shapes]
            print(json.dumps({"benchmark": bench, "host": cpu_model(), "backend": best_backend(),
                              "formats": args.formats or ["t2"], "results": results}))
            return
    feats = cpu_module().cpu_features()
    bw1 = read_bandwidth(args.bw_mb << 20, threads=1, reps=6)
    bw2 = read_bandwidth(args.bw_mb << 20, threads=2, reps=6)
    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs, features {feats}, kernel backend {best_backend()}")
    print(f"streaming read bandwidth: {bw1:.1f} GB/s (1 thread), {bw2:.1f} GB/s (2 threads)")
    results = []
    for name in args.shapes:
        r = bench_shape(name, args, bw2)
        results.append(r)
        print(f"\n[{name}] weights read per token (packed): {r['bytes_per_token_mb']:.1f} MB")
        print(f"{'engine':<22}{'decode tok/s':>14}{'prefill tok/s':>15}")
        for key, label in (("packed_1t", "packed 2-bit, 1T"), ("packed_2t", "packed 2-bit, 2T"),
                           ("packed_2t_vnni", "  same, AMX off, 2T"),
                           ("torch_bf16", "torch bf16 dense, 2T"), ("torch_fp32", "torch fp32 dense, 2T"),
                           ("torch_vnni_bf16", "torch bf16, AMX off"), ("torch_vnni_fp32", "torch fp32, AMX off"),
                           ("torch_avx2_bf16", "torch bf16 at AVX2"), ("torch_avx2_fp32", "torch fp32 at AVX2")):
            if key + "_decode" in r:
                print(f"{label:<22}{r[key + '_decode']:>14.1f}{r[key + '_prefill']:>15.1f}")
        print(f"decode: {r['decode_x_bf16']:.1f}x bf16, {r['decode_x_fp32']:.1f}x fp32; prefill: "
              f"{r['prefill_x_bf16']:.1f}x bf16, {r['prefill_x_fp32']:.1f}x fp32")
        for path, (label, _) in TORCH_LIMITS.items():
            if f"{path}_decode_x_bf16_{path}" in r:
                print(f"{label} on both sides: decode {r[f'{path}_decode_x_bf16_{path}']:.1f}x bf16, "
                      f"{r[f'{path}_decode_x_fp32_{path}']:.1f}x fp32; prefill {r[f'{path}_prefill_x_bf16_{path}']:.1f}x "
                      f"bf16, {r[f'{path}_prefill_x_fp32_{path}']:.1f}x fp32")
        print(f"packed 2T: {r['effective_gb_s_2t']:.1f} GB/s effective = {r['pct_roofline_2t']:.0f} % of the "
              f"{r['roofline_2t_tok_s']:.0f} tok/s roofline at {bw2:.1f} GB/s")
    print(json.dumps({"benchmark": "decode", "host": cpu_model(), "backend": best_backend(), "amx": amx_available(),
                      "bw_1t_gb_s": bw1, "bw_2t_gb_s": bw2,
                      "results": results}))


if __name__ == "__main__":
    main()
