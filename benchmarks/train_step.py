"""Training-step throughput and peak memory: MMfree vs Transformer++ at the same preset, side by side.

Each model is trained for a few AdamW steps in its own subprocess (so peak RSS is per model) on random
tokens; warm-up steps are excluded from timing. CPU seconds per step are reported too: on a shared
machine they are steadier than wall time. Prints a table, the ratios and one final JSON line.

    python benchmarks/train_step.py [--preset small --batch-size 4 --seq-len 128 --steps 3 --device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones; returns tokens/s and peak memory."""
    import torch

    from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM
    from mulfree.models.transformer import TransformerConfig, TransformerForCausalLM
    from mulfree.train import lm_loss

    torch.manual_seed(0)
    cfg_cls, model_cls = ((MMFreeConfig, MMFreeForCausalLM) if args.worker == "mmfree"
                          else (TransformerConfig, TransformerForCausalLM))
    config = cfg_cls.from_preset(args.preset)
    device = torch.device(args.device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = model_cls(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
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
    p.add_argument("--worker", choices=("mmfree", "transformer"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {}
    for name in ("mmfree", "transformer"):
        cmd = [sys.executable, __file__, "--worker", name] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    mm, tf = results["mmfree"], results["transformer"]
    mem = "peak GPU MiB" if args.device.startswith("cuda") else "peak RSS MiB (train)"
    print(f"preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps, "
          f"{args.device}{' bf16' if args.bf16 else ''}")
    print(f"{'':22}{'MMfree':>14}{'Transformer++':>16}{'ratio':>9}")
    for key, label in (("params", "parameters"), ("tokens_per_s", "tokens/s"), ("s_per_step", "s/step"),
                       ("cpu_s_per_step", "CPU s/step (all threads)"),
                       ("peak_mem_mib", mem)):
        print(f"{label:22}{mm[key]:>14,.1f}{tf[key]:>16,.1f}{mm[key] / tf[key]:>9.2f}")
    print(json.dumps({"bench": "train_step", "preset": args.preset, "device": args.device,
                      "batch_size": args.batch_size, "seq_len": args.seq_len, "mmfree": mm, "transformer": tf,
                      "tokens_per_s_ratio": mm["tokens_per_s"] / tf["tokens_per_s"],
                      "peak_mem_ratio": mm["peak_mem_mib"] / tf["peak_mem_mib"]}))


if __name__ == "__main__":
    main()
