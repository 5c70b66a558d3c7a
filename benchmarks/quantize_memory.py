"""Peak resident memory of block-by-block quantization (`quant.blockwise`) on a random ~1B Llama.

The model (TinyLlama's shape by default: hidden 2048, 22 layers, intermediate 5632, vocab 32000, 4 KV heads,
1.1B parameters, 4.4 GB in fp32) is written straight to sharded safetensors one decoder block at a time, so
writing it never holds more than one block. Each method then quantizes it in a fresh subprocess that reports
its VmHWM (/proc/self/status): the peak resident set, imports included. `--whole` adds the whole-model walk
(`walker.quantize_model` + `save_quantized`) as the baseline. Prints a table and one JSON line.

    .venv/bin/python benchmarks/quantize_memory.py                      # RTN 4-bit
    .venv/bin/python benchmarks/quantize_memory.py --methods rtn gptq --whole
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

import torch

CHILD = r"""
import json, sys, time, torch
from pathlib import Path
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from mulfree.quant.config import WalkOptions
from mulfree.quant.gptq import GPTQ
from mulfree.quant.rtn import RTN
method = RTN(args["bits"], 128) if args["method"] == "rtn" else GPTQ(args["bits"], 128)
calib = None
if method.needs_stats:
    calib = torch.randint(0, args["vocab"], (args["samples"], args["seqlen"]), generator=torch.Generator().manual_seed(0))
opts = WalkOptions(progress=False, batch_size=args["samples"])
t0 = time.perf_counter()
if args["whole"]:
    import transformers
    from mulfree.quant.walker import quantize_model, save_quantized
    model = transformers.AutoModelForCausalLM.from_pretrained(args["src"], dtype=torch.float32).eval()
    save_quantized(model, None, args["out"], method, quantize_model(model, method, calib, opts), {})
else:
    from mulfree.quant.blockwise import quantize_blockwise
    quantize_blockwise(args["src"], args["out"], method, calib, opts)
wall = time.perf_counter() - t0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss": hwm * 1024, "wall_s": wall}))
"""


def write_random_llama(out: Path, layers: int, hidden: int, inter: int, vocab: int, kv_heads: int) -> int:
    """A random LlamaConfig model in `out` (config.json, one shard per block + index); returns its fp32 bytes."""
    import transformers
    from safetensors.torch import save_file

    from mulfree.quant.shards import INDEX, shard_name

    heads = hidden // 64
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, tie_word_embeddings=False)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    kv = kv_heads * 64
    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
              "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
              "mlp.down_proj.weight": (hidden, inter)}
    weight_map, total, n = {}, 0, layers + 1
    for i in range(layers):
        tensors = {f"model.layers.{i}.{k}": torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
        tensors.update({f"model.layers.{i}.{k}": torch.ones(hidden)
                        for k in ("input_layernorm.weight", "post_attention_layernorm.weight")})
        save_file(tensors, str(out / shard_name(i + 1, n)), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard_name(i + 1, n)))
        total += sum(t.numel() * 4 for t in tensors.values())
    rest = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
            "model.norm.weight": torch.ones(hidden), "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.02}
    save_file(rest, str(out / shard_name(n, n)), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, shard_name(n, n)))
    total += sum(t.numel() * 4 for t in rest.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def run_child(args: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"quantizing subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=["rtn"], choices=["rtn", "gptq"])
    p.add_argument("--samples", type=int, default=2, help="GPTQ calibration windows")
    p.add_argument("--seqlen", type=int, default=64, help="GPTQ calibration tokens per window")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--whole", action="store_true", help="also run the whole-model walk (baseline)")
    p.add_argument("--workdir", default=None, help="where the model is written (default: a temp dir)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.workdir) as work:
        work = Path(work)
        t0 = time.perf_counter()
        fp32 = write_random_llama(work / "src", a.layers, a.hidden, a.intermediate, a.vocab, a.kv_heads)
        write_s = time.perf_counter() - t0
        rows = []
        for method in a.methods:
            for whole in ([False, True] if a.whole else [False]):
                load_before = os.getloadavg()[0]
                res = run_child({"src": str(work / "src"), "out": str(work / f"{method}-{int(whole)}"),
                                 "method": method, "bits": a.bits, "vocab": a.vocab, "samples": a.samples,
                                 "seqlen": a.seqlen, "threads": a.threads, "whole": whole})
                rows.append({"method": method, "path": "whole" if whole else "blockwise", "fp32_bytes": fp32,
                             "peak_rss": res["peak_rss"], "ratio": res["peak_rss"] / fp32, "wall_s": res["wall_s"],
                             "load_before": load_before, "load_after": os.getloadavg()[0]})
    params = fp32 // 4
    print(f"random Llama: {params / 1e9:.2f}B params, fp32 {fp32 / 2**30:.2f} GiB, written in {write_s:.0f} s; "
          f"{os.cpu_count()} CPUs, {a.threads} threads")
    print(f"{'method':8} {'path':10} {'peak RSS GiB':>12} {'/ fp32':>7} {'wall s':>7} {'load 1m':>12}")
    for r in rows:
        print(f"{r['method']:8} {r['path']:10} {r['peak_rss'] / 2**30:12.2f} {r['ratio']:7.1%} {r['wall_s']:7.0f} "
              f"{r['load_before']:5.1f}->{r['load_after']:4.1f}")
    print(json.dumps({"params": params, "layers": a.layers, "hidden": a.hidden, "bits": a.bits, "rows": rows}))


if __name__ == "__main__":
    main()
