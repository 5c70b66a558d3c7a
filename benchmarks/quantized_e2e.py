"""Whole-model CPU comparison on SmolLM2-135M: torch fp32, torch bf16, ShiftAdd latency / accuracy and
GPTQ at the same bit width. Per model: greedy decode tokens/s, prefill tokens/s, resident memory and
perplexity (`mulfree eval`'s computation on the bundled validation text).

Each model runs in its own subprocess (so RSS numbers do not mix and the thread pools start cold the
same way); quantized dirs are made once with `mulfree quantize` and cached under --work (a temp dir by
default; their names carry the calibration settings). The torch-* rows run transformers' own forward;
"ours-fp32" and the quantized rows run what `mulfree generate` runs (`models.resolve`: `LlamaLM`). A
Latency-mode ShiftAdd model decodes one token per native call (`_cpu.ShiftAddLlama`: LUT GEMVs and the
glue between them), and runs the LUT GEMM for the prefill and the perplexity windows.

    python benchmarks/quantized_e2e.py --quick               # smoke run, < 2 min once dirs are cached
    python benchmarks/quantized_e2e.py --work /tmp/qe2e      # full run, dirs kept for the next run
    python benchmarks/quantized_e2e.py --calib 128           # quantize with the CLI's full calibration

RSS columns (MiB): after load, after generating, peak, and "live" = after generating with freed heap
returned to the OS (malloc_trim); "dense" counts fp32 dense weight copies the quantized layers hold.
Prints a table, ratios vs torch fp32 and bf16, the load average before and after, and one JSON line.
Issue target (not asserted): ShiftAdd latency 3-bit decode >= 1.5x torch fp32 and >= 1.0x torch bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> `mulfree quantize` arguments (None: the torch model itself); {bits} is filled in. The torch-* rows run
# transformers' own forward (the baseline a user has); "ours-fp32" and the quantized rows run the path `mulfree
# generate` takes (`models.resolve`: `LlamaLM`, with the native decode step for Latency-mode ShiftAdd).
MODELS = {
    "torch-fp32": None,
    "torch-bf16": None,
    "ours-fp32": None,
    "shiftadd-lat": ["shiftadd", "--bits", "{bits}", "--mode", "lat"],
    "shiftadd-acc": ["shiftadd", "--bits", "{bits}", "--mode", "acc"],
    "gptq": ["gptq", "--bits", "{bits}"],
}


def rss_mib() -> dict:
    """Current and peak resident set size of this process, MiB (from /proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(val.split()[0]) / 1024, 1)
    return out


def rss_trimmed_mib() -> float:
    """VmRSS after glibc returns freed heap pages (malloc_trim): the live footprint, without memory the
    loaders freed but the allocator kept (building the fp32 model before swapping in quantized layers)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mib()["VmRSS"]


def best_of(rounds: int, fn) -> float:
    """Smallest wall time of `rounds` calls of fn (seconds)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def child(args) -> None:
    """Measure one model (run in a subprocess); prints one JSON line."""
    import torch

    from mulfree.data.text import load_corpus
    from mulfree.evaluate import perplexity
    from mulfree.models.pretrained import load_smollm2

    torch.set_num_threads(args.threads)
    rss_start = rss_mib()["VmRSS"]
    t0 = time.perf_counter()
    if args.child.startswith("torch-"):
        model, tok = load_smollm2(torch.bfloat16 if args.child == "torch-bf16" else torch.float32)
        step = _hf_step(model)
    else:
        from mulfree.models.resolve import resolve

        res = resolve(args.dir or "smollm2")
        model, tok = res.model, res.tokenizer
        step = model
    load_s = time.perf_counter() - t0
    rss_load = rss_mib()["VmRSS"]
    encoder = getattr(tok, "backend_tokenizer", tok)  # a `tokenizers.Tokenizer` either way
    ids = torch.tensor(encoder.encode(load_corpus().val_text).ids, dtype=torch.long)
    prefill_ids = ids[None, : args.prefill]
    prompt = ids[None, :16]

    def prefill():
        step(prefill_ids, None)

    generated = []

    def decode():  # greedy; only the decode steps are timed
        logits, state = step(prompt, None)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        toks = []
        for _ in range(args.decode):
            toks.append(int(nxt))
            logits, state = step(nxt, state)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        generated.append((time.perf_counter() - t, toks))

    with torch.inference_mode():
        prefill()  # warm-up: kernel weight layouts, thread pools
        prefill_s = best_of(args.rounds, prefill)
        for _ in range(args.rounds):
            decode()
        decode_s = min(t for t, _ in generated)
        rss_gen = rss_mib()
        ppl_ids = ids[: args.ppl_tokens]
        t1 = time.perf_counter()
        ppl = perplexity(model, ppl_ids, min(256, ppl_ids.numel()), progress=False)
        ppl_s = time.perf_counter() - t1
    rss_live = rss_trimmed_mib()
    dense = sum(getattr(m, "_dense", None) is not None for m in model.modules())
    print(json.dumps({
        "model": args.child, "decode_tok_s": round(args.decode / decode_s, 2),
        "prefill_tok_s": round(prefill_ids.shape[1] / prefill_s, 1), "ppl": round(ppl, 3),
        "ppl_tokens": ppl_ids.numel(), "ppl_s": round(ppl_s, 1), "load_s": round(load_s, 1),
        "rss_start_mib": rss_start, "rss_load_mib": rss_load, "rss_gen_mib": rss_gen["VmRSS"],
        "rss_peak_mib": rss_gen["VmHWM"], "rss_live_mib": rss_live, "dense_copies": dense, "tokens": generated[0][1][:8],
    }))


def _hf_step(model):
    """transformers' own forward as `(logits, state) = step(ids, state)`."""

    def step(ids, state):
        out = model(input_ids=ids, past_key_values=state, use_cache=True)
        return out.logits, out.past_key_values

    return step


def quantize(name: str, args, work: Path) -> tuple[Path, float]:
    """The cached quantized dir of model `name` (made with the CLI if missing) and the seconds it took."""
    tag = f"{name}-{args.bits}b-c{args.calib}x{args.calib_seqlen}" + (f"-r{args.rounds_als}" if "shiftadd" in name else "")
    out = work / tag
    if (out / "config.json").is_file():
        return out, 0.0
    cmd = [sys.executable, "-m", "mulfree", "quantize", *[a.format(bits=args.bits) for a in MODELS[name]],
           "--model", "smollm2", "--out", str(out), "--calib-samples", str(args.calib),
           "--calib-seqlen", str(args.calib_seqlen), "--overwrite"]
    if "shiftadd" in name:
        cmd += ["--rounds", str(args.rounds_als)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - t0


def run_child(name: str, qdir: Path | None, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--threads", str(args.threads), "--rounds", str(args.rounds),
           "--decode", str(args.decode), "--prefill", str(args.prefill), "--ppl-tokens", str(args.ppl_tokens)]
    if qdir is not None:
        cmd += ["--dir", str(qdir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(rows: list[dict], load: tuple, args) -> None:
    base = {r["model"]: r for r in rows}
    head = f"{'model':<14} {'decode t/s':>10} {'prefill t/s':>11} {'ppl':>9} {'RSS load':>9} {'RSS gen':>8} {'peak':>7} {'live':>6} {'dense':>5}"
    print(head)
    for r in rows:
        print(f"{r['model']:<14} {r['decode_tok_s']:>10.1f} {r['prefill_tok_s']:>11.1f} {r['ppl']:>9.3f} "
              f"{r['rss_load_mib']:>9.0f} {r['rss_gen_mib']:>8.0f} {r['rss_peak_mib']:>7.0f} {r['rss_live_mib']:>6.0f} {r['dense_copies']:>5}")
    for ref in ("torch-fp32", "torch-bf16"):
        if ref not in base:
            continue
        print(f"\nratios vs {ref} (decode, prefill speed; live RSS after generating):")
        for r in rows:
            b = base[ref]
            print(f"  {r['model']:<14} decode {r['decode_tok_s'] / b['decode_tok_s']:.2f}x  "
                  f"prefill {r['prefill_tok_s'] / b['prefill_tok_s']:.2f}x  RSS {r['rss_live_mib'] / b['rss_live_mib']:.2f}x")
    print(f"\nload average before {load[0]}, after {load[1]} ({os.cpu_count()} CPUs, {args.threads} threads)")
    print(json.dumps({"bench": "quantized_e2e", "bits": args.bits, "threads": args.threads, "quick": args.quick,
                      "calib": args.calib, "load_before": load[0], "load_after": load[1], "results": rows}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer tokens and rounds, tiny calibration")
    p.add_argument("--work", help="dir caching the quantized models (default: a temp dir, removed afterwards)")
    p.add_argument("--calib", type=int, help="calibration windows (default: 16; --quick: 4)")
    p.add_argument("--calib-seqlen", type=int, help="tokens per calibration window (default: 256; --quick: 128)")
    p.add_argument("--rounds-als", type=int, help="ShiftAdd ALS rounds (default: the CLI's 10; --quick: 2)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, help="timing rounds, best kept (default: 3; --quick: 1)")
    p.add_argument("--decode", type=int, help="greedy tokens after a 16-token prompt (default: 64; --quick: 16)")
    p.add_argument("--prefill", type=int, help="prefill tokens (default: 128; --quick: 64)")
    p.add_argument("--ppl-tokens", type=int, help="perplexity tokens (default: 4096; --quick: 512)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--quantize-only", action="store_true", help="only make the cached quantized dirs (needs --work)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    q = args.quick
    for key, full, quick in (("calib", 16, 4), ("calib_seqlen", 256, 128), ("rounds_als", 10, 2), ("rounds", 3, 1), ("decode", 64, 16),
                             ("prefill", 128, 64), ("ppl_tokens", 4096, 512)):
        if getattr(args, key) is None:
            setattr(args, key, quick if q else full)
    if args.child:
        return child(args)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="quantized_e2e_")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    if args.quantize_only:
        for name in args.models:
            if MODELS[name] is not None:
                qdir, qs = quantize(name, args, work)
                print(f"{name}: {qdir} ({qs:.0f} s)")
        return
    load_before = os.getloadavg()[0]
    rows = []
    for name in args.models:
        qdir, qs = (None, 0.0) if MODELS[name] is None else quantize(name, args, work)
        row = run_child(name, qdir, args)
        row["quantize_s"] = round(qs, 1)
        rows.append(row)
        print(f"{name}: {row}", file=sys.stderr)
    report(rows, (round(load_before, 2), round(os.getloadavg()[0], 2)), args)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
