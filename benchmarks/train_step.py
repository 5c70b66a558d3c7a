"""Training-step throughput and peak memory: MMfree (fused CPU ops, and optionally unfused) vs Transformer++.

Each run trains a model for a few AdamW steps in its own subprocess (so peak RSS is per run) on random tokens;
warm-up steps are excluded from timing. CPU seconds per step are reported too: on a shared machine they are
steadier than wall time. `--rounds N` repeats every run N times, interleaved, and reports the range. Prints a
table, the ratios (MMfree / Transformer++, fused / unfused MMfree) and one final JSON line.

    python benchmarks/train_step.py [--preset small --batch-size 4 --seq-len 128 --steps 3 --device cpu]
    python benchmarks/train_step.py --preset 370m --batch-size 2 --seq-len 256 --runs mmfree mmfree-unfused
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

RUNS = ("mmfree", "transformer", "mmfree-unfused")


def worker(args: argparse.Namespace) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones; returns tokens/s and peak memory."""
    import torch

    from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM
    from mulfree.models.transformer import TransformerConfig, TransformerForCausalLM
    from mulfree.nn.fused import set_fused
    from mulfree.train import lm_loss

    set_fused(args.worker != "mmfree-unfused")
    torch.manual_seed(0)
    cfg_cls, model_cls = ((MMFreeConfig, MMFreeForCausalLM) if args.worker.startswith("mmfree")
                          else (TransformerConfig, TransformerForCausalLM))
    config = cfg_cls.from_preset(args.preset)
    device = torch.device(args.device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = model_cls(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # as `mulfree train` steps
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        lm_loss(model, x[:, :-1], x[:, 1:], args.bf16).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before)
    return {"model": config.model_type, "params": sum(p.numel() for p in model.parameters()),
            "tokens_per_s": args.steps * args.batch_size * args.seq_len / dt, "s_per_step": dt / args.steps,
            "cpu_s_per_step": cpu / args.steps,
            "peak_mem_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="model preset for both models (default small)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=["mmfree", "transformer"])
    p.add_argument("--rounds", type=int, default=1, help="repeat every run, interleaved (ranges are reported)")
    p.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows: dict[str, list[dict]] = {name: [] for name in args.runs}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name in args.runs:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name]
            env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}  # as `mulfree train` runs (cli.py)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            rows[name].append(json.loads(out.strip().splitlines()[-1]))
            load.append(os.getloadavg()[0])
    keys = (("params", "parameters"), ("tokens_per_s", "tokens/s"), ("s_per_step", "s/step"),
            ("cpu_s_per_step", "CPU s/step (all threads)"),
            ("peak_mem_mib", "peak GPU MiB" if args.device.startswith("cuda") else "peak RSS MiB (train)"))
    best = {name: {k: (max if k == "tokens_per_s" else min)(r[k] for r in rs) for k, _ in keys}
            for name, rs in rows.items()}
    print(f"preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps, "
          f"{args.rounds} round(s), {args.device}{' bf16' if args.bf16 else ''}, load {min(load):.1f}-{max(load):.1f}")
    print(f"{'':26}" + "".join(f"{n:>22}" for n in rows))
    for key, label in keys:
        cells = [f"{min(r[key] for r in rs):,.1f}-{max(r[key] for r in rs):,.1f}" if len(rs) > 1
                 else f"{rs[0][key]:,.1f}" for rs in rows.values()]
        print(f"{label:26}" + "".join(f"{c:>22}" for c in cells))
    ratios = {}
    for a, b in (("mmfree", "transformer"), ("mmfree", "mmfree-unfused")):
        if a in rows and b in rows:
            ratios[f"{a}/{b}"] = {"tokens_per_s": [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(rows[a], rows[b])],
                                  "peak_mem": [x["peak_mem_mib"] / y["peak_mem_mib"] for x, y in zip(rows[a], rows[b])]}
            r = ratios[f"{a}/{b}"]
            print(f"{a} / {b}: tokens/s {min(r['tokens_per_s']):.2f}-{max(r['tokens_per_s']):.2f}x, "
                  f"peak memory {min(r['peak_mem']):.2f}-{max(r['peak_mem']):.2f}x")
    print(json.dumps({"bench": "train_step", "preset": args.preset, "device": args.device,
                      "batch_size": args.batch_size, "seq_len": args.seq_len, "rounds": args.rounds,
                      "load": [min(load), max(load)], "runs": rows, "best": best, "ratios": ratios}))


if __name__ == "__main__":
    main()
