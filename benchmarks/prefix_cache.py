"""Multi-turn chat through `mulfree serve` with the prefix cache on and off: what caching prompt prefixes saves.

    python benchmarks/prefix_cache.py                         # 1.3b shape, 8 conversations x 4 turns, 2 rounds
    python benchmarks/prefix_cache.py --shape tiny --rounds 1 # smoke run
    python benchmarks/prefix_cache.py --model smollm2         # a KV-cache model: the pretrained SmolLM2-135M

Every conversation starts with the same system prompt (--system-tokens of the bundled plays) and a question of
its own; each turn resends the whole conversation with the model's reply and a new question, as chat clients do.
The conversations run concurrently, their turns one after another, streamed from the official `openai` client
(greedy, --max-tokens a reply). The same model is served with `--prefix-cache-mb 256` and `--prefix-cache-mb 0`, alternating, --rounds
times each: a random packed model (1.3b shape by default, weights random: speed does not depend on values;
recurrent states cached), or --model, any model reference `mulfree serve` takes, with its own tokenizer (for a
Transformer or Llama-family model the cache keeps KV blocks). Per mode: time to first token p50 / p99 of first turns and of later turns, the wall time of the
whole workload, prompt tokens sent and the share the cache served (`usage.prompt_tokens_details.cached_tokens`).
Prints a table, the ratios (off / on), the 1-minute load average and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from decode import SHAPES, cpu_model, random_packed_model
from serve import make_tokenizer, percentile, running_server

from mulfree.data.text import bundled_text_files
from mulfree.kernels import backend as best_backend


def workload(tok, system_tokens: int, conversations: int, turns: int) -> tuple[str, list[list[str]]]:
    """The shared system prompt (about `system_tokens` tokens) and each conversation's questions, from the plays."""
    lines = [ln.strip() for ln in bundled_text_files()[0].read_text(encoding="utf-8").splitlines() if len(ln) > 30]
    system, i = "", 0
    while len(tok.encode(system).ids) < system_tokens:
        system, i = system + lines[i] + " ", i + 1
    questions = lines[i:]
    return system, [[questions[(c * turns + t) % len(questions)] for t in range(turns)] for c in range(conversations)]


async def conversation(client, model: str, system: str, questions: list[str], max_tokens: int) -> list[dict]:
    """One chat, a turn at a time; per turn its time to first token and token counts."""
    messages, out = [{"role": "system", "content": system}], []
    for turn, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        t0, first, reply, usage = time.perf_counter(), None, "", None
        stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                reply += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
        messages.append({"role": "assistant", "content": reply})
        details = usage.prompt_tokens_details
        out.append({"turn": turn, "ttft": (first or time.perf_counter()) - t0, "prompt": usage.prompt_tokens,
                    "cached": details.cached_tokens if details is not None else 0})
    return out


async def run_workload(base: str, model: str, system: str, chats: list[list[str]], max_tokens: int) -> dict:
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=len(chats) + 4, max_keepalive_connections=len(chats) + 4)
    client = AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0,
                         http_client=httpx.AsyncClient(limits=limits, timeout=600))
    t0 = time.perf_counter()
    try:
        turns = [t for chat in await asyncio.gather(*(conversation(client, model, system, q, max_tokens)
                                                       for q in chats)) for t in chat]
    finally:
        await client.close()
    wall = time.perf_counter() - t0
    first = [t["ttft"] for t in turns if t["turn"] == 0]
    later = [t["ttft"] for t in turns if t["turn"] > 0]
    prompt, cached = sum(t["prompt"] for t in turns), sum(t["cached"] for t in turns)
    return {"wall_s": wall, "prompt_tokens": prompt, "cached_tokens": cached, "cached_share": cached / prompt,
            "first_ttft_p50_ms": 1e3 * percentile(first, 50), "first_ttft_p99_ms": 1e3 * percentile(first, 99),
            "later_ttft_p50_ms": 1e3 * percentile(later, 50), "later_ttft_p99_ms": 1e3 * percentile(later, 99)}


def model_under_test(args, tmp: Path) -> tuple:
    """(tokenizer, model reference to serve): --model as given, else a random packed model of --shape saved in tmp."""
    if args.model:
        from mulfree.models.resolve import resolve

        return resolve(args.model, "torch").tokenizer, args.model
    torch.manual_seed(args.seed)
    vocab, d, layers, inter = SHAPES[args.shape]
    tok = make_tokenizer(vocab)
    pm = random_packed_model(vocab, d, layers, inter, threads=args.threads, seed=args.seed)
    pm.tokenizer = tok
    pm.save(tmp / "model")
    return tok, tmp / "model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.3b", choices=sorted(SHAPES))
    p.add_argument("--model", help="serve this model reference instead of a random packed model of --shape")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens of each reply")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternating")
    p.add_argument("--timeout", type=float, default=1800.0, help="global limit in seconds")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not (1 <= args.conversations <= 256 and 1 <= args.turns <= 64 and 1 <= args.rounds <= 10):
        raise SystemExit("error: --conversations in 1..256, --turns in 1..64, --rounds in 1..10")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server, remove the temp dir
    deadline = time.monotonic() + args.timeout
    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs, kernel backend {best_backend()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    tmp = Path(tempfile.mkdtemp(prefix="mulfree-prefix-bench-"))
    res: dict = {"benchmark": "prefix_cache", "shape": args.shape, "model": args.model, "host": cpu_model(),
                 "backend": best_backend(),
                 "threads": args.threads, "conversations": args.conversations, "turns": args.turns,
                 "system_tokens": args.system_tokens, "max_tokens": args.max_tokens, "on": [], "off": []}
    try:
        tok, model_ref = model_under_test(args, tmp)
        system, chats = workload(tok, args.system_tokens, args.conversations, args.turns)
        for r in range(args.rounds):
            for mode, mb in (("on", 256), ("off", 0)):
                flags = ["--threads", str(args.threads), "--max-batch", str(max(8, args.conversations)),
                         "--prefix-cache-mb", str(mb), "--max-prompt-tokens", str(1 << 16),
                         "--request-timeout", str(max(60.0, deadline - time.monotonic()))]
                with running_server(model_ref, flags, tmp / f"server-{mode}.log", deadline) as (base, model):
                    got = asyncio.run(asyncio.wait_for(run_workload(base, model, system, chats, args.max_tokens),
                                                       max(5.0, deadline - time.monotonic())))
                res[mode].append(got)
                print(f"  round {r + 1} cache {mode:>3}: {got['wall_s']:6.1f} s, later turns' TTFT p50 "
                      f"{got['later_ttft_p50_ms']:.0f} ms, cached {got['cached_share']:.0%} of "
                      f"{got['prompt_tokens']} prompt tokens", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n[{args.model or args.shape}] {args.conversations} chats x {args.turns} turns, a {args.system_tokens}-token system "
          f"prompt, {args.max_tokens}-token replies, {args.threads} threads")
    print(f"{'cache':>5} {'wall s':>14} {'1st TTFT p50/p99 ms':>22} {'later TTFT p50/p99 ms':>24} {'cached':>8}")
    for mode in ("on", "off"):
        runs = res[mode]

        def span(key: str, runs=runs) -> str:
            return f"{min(r[key] for r in runs):.0f}-{max(r[key] for r in runs):.0f}"

        print(f"{mode:>5} {span('wall_s'):>14} {span('first_ttft_p50_ms') + ' / ' + span('first_ttft_p99_ms'):>22} "
              f"{span('later_ttft_p50_ms') + ' / ' + span('later_ttft_p99_ms'):>24} "
              f"{sum(r['cached_share'] for r in runs) / len(runs):>8.0%}")
    for key in ("wall_s", "first_ttft_p50_ms", "later_ttft_p50_ms", "later_ttft_p99_ms"):
        ratios = [off[key] / on[key] for on, off in zip(res["on"], res["off"])]
        res[f"off_over_on_{key}"] = ratios
        print(f"{key}: off / on {min(ratios):.2f}-{max(ratios):.2f}x")
    res["loadavg_1m"] = os.getloadavg()[0]
    print(f"load average (1 min): {res['loadavg_1m']:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
