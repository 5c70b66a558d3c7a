"""Serving speed of `mulfree serve` on the packed engine: streaming completions from the official `openai`
client at several concurrency levels on loopback, beside `PackedModel.generate` called directly.

    python benchmarks/serve.py                                  # 1.3b shape, 1 8 32 64 clients
    python benchmarks/serve.py --shape tiny --requests-per-client 2 --max-tokens 16   # smoke run
    python benchmarks/serve.py --shape 1.3b --clients 1 8 32 --requests-per-client 1 --torch-clients 0

Weights are random (speed does not depend on values); the model dir is written to a temp dir with a
tokenizer of the shape's vocab (BPE on the bundled corpus, padded with added words) that has no
`<|endoftext|>` token, so greedy decoding of random weights never stops early: every request runs to
--max-tokens, one streamed chunk per token. The server runs as a subprocess
(`python -m mulfree serve`, 127.0.0.1, a free port) and is always killed at the end.

Per level: aggregate decode tok/s (completion tokens of all requests / wall time of the level; the
headline), the same with prompt tokens counted (+prompt: all the tokens the engine ran), time to first token
p50/p99 and inter-token latency p50/p99 (gaps between streamed chunks of one request).
Baselines in this process, before the server starts: one stream of `PackedModel.generate` (tok/s) and the
engine's own 128-token prefill rate, best of --rounds each. The one-stream level sends as many requests in turn
(at least --rounds) and its best request's rate is set against the best direct run. Then the same server on
`--engine torch` (the torch MMfree model) over a random unpacked dir of the same shape, at --torch-clients streams
(one request each; 0 skips it).
The client runs on the same host as the server, so at high concurrency it competes for the same cores.
Prints a table, the ratios, the 1-minute load average and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from decode import SHAPES, cpu_model, random_packed_model

from mulfree.data.text import bundled_text_files
from mulfree.kernels import backend as best_backend

PROMPT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate:"


def make_tokenizer(vocab_size: int):
    """A tokenizer of exactly `vocab_size` ids: a character-level (Metaspace) BPE of up to 2048 ids trained on a
    slice of the bundled corpus, then plain added words (" w<i>") up to `vocab_size`, so every id the random
    model can pick decodes to text. No special tokens, so the server has no end-of-text id to stop on (every
    request runs to max_tokens); no byte tokens, so each streamed token reaches the client as its own chunk
    (a byte-level tokenizer's lone high bytes, or ids past its vocab, would hold text back and make chunks,
    TTFT and ITL bursty)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in bundled_text_files()[:4])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 2048), special_tokens=[], show_progress=False)
    tok.train_from_iterator((text[i:i + 65536] for i in range(0, len(text), 65536)), trainer=trainer)
    base = tok.get_vocab_size()
    tok.add_tokens([AddedToken(f" w{i}", normalized=False) for i in range(vocab_size - base)])
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(f"error: tokenizer has {tok.get_vocab_size()} ids, the model {vocab_size}")
    return tok


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct_baseline(pm, tok, max_tokens: int, prefill: int, rounds: int) -> dict:
    """One stream of PackedModel.generate (greedy, the benchmark's prompt) and the engine's prefill rate; best of
    `rounds` each."""
    ids = tok.encode(PROMPT).ids
    pm.generate(ids, 4)  # warm up
    gen = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = len(pm.generate(ids, max_tokens))
        gen = max(gen, n / (time.perf_counter() - t0))
    pre_ids = torch.randint(0, pm.config["vocab_size"], (prefill,))
    pre = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        pm.prefill_state(pre_ids)
        pre = max(pre, prefill / (time.perf_counter() - t0))
    return {"direct_generate_tok_s": gen, "prefill_tok_s": pre, "prompt_tokens": len(ids)}


def wait_health(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before /health answered")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"/health did not answer within {timeout:.0f} s")


async def one_request(client, model: str, max_tokens: int, req_timeout: float) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             timeout=req_timeout)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage
    t1 = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else len(stamps)
    return {"start": t0, "end": t1, "ttft": (stamps[0] - t0) if stamps else float("nan"),
            "itl": [b - a for a, b in itertools.pairwise(stamps)], "tokens": tokens,
            "prompt_tokens": usage.prompt_tokens if usage is not None else 0}


async def run_level(base_url: str, model: str, clients: int, per_client: int, max_tokens: int,
                    budget: float) -> dict:
    """`clients` concurrent streaming clients, each sending `per_client` requests in turn, within `budget` s."""
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    client = AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0,
                         http_client=httpx.AsyncClient(limits=limits, timeout=budget))
    results: list[dict] = []

    async def worker() -> None:
        for _ in range(per_client):
            results.append(await one_request(client, model, max_tokens, budget))

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), timeout=budget)
    finally:
        await client.close()
    wall, client_cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(r["tokens"] for r in results)
    prompt = sum(r["prompt_tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "prompt_tokens": prompt, "wall_s": wall,
            "processed_tok_s": (tokens + prompt) / wall,
            "chunks": sum(len(r["itl"]) + 1 for r in results), "client_cpu_s": client_cpu,
            "tok_s": tokens / wall, "per_stream_tok_s": tokens / wall / clients,
            "best_request_tok_s": max((r["tokens"] / (r["end"] - r["start"]) for r in results), default=0.0),
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99)}


def random_torch_dir(shape: str, tok, out: Path, seed: int) -> None:
    """A random MMfree torch model of `shape` (its own init) saved with `tok` for `serve --engine torch`."""
    from mulfree.models.io import save_model
    from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM

    vocab, d, layers, inter = SHAPES[shape]
    torch.manual_seed(seed)
    model = MMFreeForCausalLM(MMFreeConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
                                           intermediate_size=inter))
    save_model(model, out, tok)


# Runs the server command (argv[2:]) after asking Linux for SIGTERM when this benchmark process dies, even by
# SIGKILL (PR_SET_PDEATHSIG, kept across exec), so a killed benchmark never leaves a server behind (one kept a core
# and 6 GB busy for 20 minutes); a parent already gone ends it at once.
END_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                   "os.getppid() == int(sys.argv[1]) or sys.exit(1); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


@contextlib.contextmanager
def running_server(model_dir: Path | str, flags: list[str], log_path: Path, deadline: float) -> Iterator[tuple[str, str]]:
    """`mulfree serve --model model_dir FLAGS` on a free loopback port, ended with this process and stopped on exit;
    yields (base URL, the served model's id) once /health answers."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = ["-m", "mulfree", "serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), *flags]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", END_WITH_PARENT, str(os.getpid()), *cmd], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_health(base, proc, min(600.0, deadline - time.monotonic()))
            yield base, json.loads(urllib.request.urlopen(base + "/v1/models", timeout=10).read())["data"][0]["id"]
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
            if proc.returncode not in (0, None, -signal.SIGTERM):
                print(f"server exit {proc.returncode}; log tail:\n" + "\n".join(log_path.read_text().splitlines()[-20:]))


def serve_levels(model_dir: Path, engine: str, clients: list[int], per_client: int, args, deadline: float,
                 log_path: Path) -> list[dict]:
    """Start `mulfree serve --engine engine` on model_dir, run each client level, stop the server."""
    flags = ["--max-batch", str(args.max_batch), "--engine", engine, "--threads", str(args.threads),
             "--prefill-chunk", str(args.prefill_chunk), "--max-queue", str(max(256, 2 * max(clients))),
             "--request-timeout", str(max(60.0, deadline - time.monotonic()))]
    levels: list[dict] = []
    with running_server(model_dir, flags, log_path, deadline) as (base, model):
        asyncio.run(run_level(base + "/v1", model, 1, 1, 2, max(5.0, deadline - time.monotonic())))  # warm up
        for c in clients:
            left = deadline - time.monotonic()
            if left < 5:
                print(f"global timeout: skipped {c} clients ({engine})")
                break
            n = max(per_client, args.rounds) if c == 1 else per_client  # as many tries as the direct side
            lv = asyncio.run(run_level(base + "/v1", model, c, n, args.max_tokens, left))
            levels.append(lv)
            print(f"  {engine} {c:>3} clients: {lv['tok_s']:8.1f} tok/s in {lv['wall_s']:.1f} s", flush=True)
    return levels


def print_levels(title: str, levels: list[dict]) -> None:
    print(title)
    print(f"{'clients':>7}{'reqs':>6}{'tokens':>8}{'prompt':>8}{'tok/s':>9}{'+prompt':>9}"
          f"{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}  (ms)")
    for lv in levels:
        print(f"{lv['clients']:>7}{lv['requests']:>6}{lv['tokens']:>8}{lv['prompt_tokens']:>8}{lv['tok_s']:>9.1f}"
              f"{lv['processed_tok_s']:>9.1f}"
              f"{lv['ttft_p50_ms']:>10.0f}{lv['ttft_p99_ms']:>10.0f}{lv['itl_p50_ms']:>9.1f}{lv['itl_p99_ms']:>9.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.3b", choices=sorted(SHAPES))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="packed engine threads (server and direct baseline)")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens of the engine's prefill-rate baseline")
    p.add_argument("--rounds", type=int, default=3, help="direct baseline: best of this many runs")
    p.add_argument("--timeout", type=float, default=900.0, help="global limit in seconds (the whole run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill-chunk", type=int, default=128, help="the server's prompt tokens per step")
    p.add_argument("--torch-clients", type=int, default=32, help="streams of the torch-engine server level (0: skip)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` or `kill`: stop the server, remove the temp
    if (not 1 <= args.requests_per_client <= 1000 or not all(1 <= c <= 1024 for c in args.clients)
            or not 0 <= args.torch_clients <= 1024):
        raise SystemExit("error: --clients in 1..1024, --torch-clients in 0..1024, --requests-per-client in 1..1000")
    deadline = time.monotonic() + args.timeout
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # sampling / argmax only: leave the cores to the engine's pool
    vocab, d, layers, inter = SHAPES[args.shape]
    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs, kernel backend {best_backend()}, "
          f"load average {os.getloadavg()[0]:.2f}")

    tmp = Path(tempfile.mkdtemp(prefix="mulfree-serve-bench-"))
    model_dir = tmp / f"random-{args.shape}"
    res: dict = {"benchmark": "serve", "shape": args.shape, "host": cpu_model(), "cpus": os.cpu_count(),
                 "backend": best_backend(), "threads": args.threads, "max_tokens": args.max_tokens,
                 "requests_per_client": args.requests_per_client, "max_batch": args.max_batch,
                 "prefill_chunk": args.prefill_chunk, "levels": [], "torch_levels": []}
    try:
        t0 = time.perf_counter()
        tok = make_tokenizer(vocab)
        pm = random_packed_model(vocab, d, layers, inter, threads=args.threads, seed=args.seed)
        pm.tokenizer = tok
        pm.save(model_dir)
        print(f"wrote {model_dir} ({sum(f.stat().st_size for f in model_dir.iterdir()) / 1e6:.0f} MB) "
              f"in {time.perf_counter() - t0:.1f} s")
        res.update(direct_baseline(pm, tok, args.max_tokens, args.prefill, args.rounds))
        print(f"direct PackedModel.generate, 1 stream: {res['direct_generate_tok_s']:.1f} tok/s; "
              f"{args.prefill}-token prefill {res['prefill_tok_s']:.1f} tok/s")
        del pm
        gc.collect()
        res["levels"] = serve_levels(model_dir, "packed", args.clients, args.requests_per_client, args, deadline,
                                     tmp / "server.log")
        shutil.rmtree(model_dir)
        if args.torch_clients and deadline - time.monotonic() > 60:
            torch_dir = tmp / f"random-{args.shape}-torch"
            random_torch_dir(args.shape, tok, torch_dir, args.seed)
            gc.collect()
            res["torch_levels"] = serve_levels(torch_dir, "torch", [args.torch_clients], 1, args, deadline,
                                               tmp / "server-torch.log")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print_levels(f"\n[{args.shape}] mulfree serve, packed engine, {args.threads} threads, --max-batch "
                 f"{args.max_batch}, {args.requests_per_client} req/client x {args.max_tokens} tokens", res["levels"])
    if res["torch_levels"]:
        print_levels("mulfree serve --engine torch (the torch MMfree model), 1 req/client", res["torch_levels"])
    by = {lv["clients"]: lv for lv in res["levels"]}
    if 1 in by:  # best request against best direct run, as the direct side is timed; the level's aggregate beside
        res["server_1_vs_direct"] = by[1]["best_request_tok_s"] / res["direct_generate_tok_s"]
        res["server_1_level_vs_direct"] = by[1]["tok_s"] / res["direct_generate_tok_s"]
        print(f"1 stream through the server: {res['server_1_vs_direct']:.2f}x PackedModel.generate direct "
              f"({by[1]['best_request_tok_s']:.1f} against {res['direct_generate_tok_s']:.1f} tok/s, best of each; "
              f"the level's aggregate {res['server_1_level_vs_direct']:.2f}x)")
    top = max(by) if by else None
    for c in sorted(by):
        if c > 1 and 1 in by:
            res[f"x_{c}_vs_1"] = by[c]["tok_s"] / by[1]["tok_s"]
        if c > 1:
            res[f"x_{c}_vs_prefill"] = by[c]["tok_s"] / res["prefill_tok_s"]
            res[f"x_{c}_processed_vs_prefill"] = by[c]["processed_tok_s"] / res["prefill_tok_s"]
    if top is not None and top > 1:
        msg = f" = {res[f'x_{top}_vs_1']:.2f}x 1 stream" if 1 in by else ""
        print(f"{top} streams: {by[top]['tok_s']:.1f} tok/s{msg}, {res[f'x_{top}_vs_prefill']:.2f}x the "
              f"{args.prefill}-token prefill rate ({res['prefill_tok_s']:.1f} tok/s); with prompt tokens "
              f"{by[top]['processed_tok_s']:.1f} tok/s = {res[f'x_{top}_processed_vs_prefill']:.2f}x")
    if 32 in by and 1 in by and top != 32:
        print(f"32 streams: {res['x_32_vs_1']:.2f}x 1 stream, {res['x_32_vs_prefill']:.2f}x prefill")
    for lv in res["torch_levels"]:
        c = lv["clients"]
        if c in by:
            res[f"x_{c}_vs_torch_server"] = by[c]["tok_s"] / lv["tok_s"]
            print(f"{c} streams: packed server {res[f'x_{c}_vs_torch_server']:.1f}x the torch-engine server "
                  f"({lv['tok_s']:.2f} tok/s); TTFT p50 {by[c]['ttft_p50_ms']:.0f} ms vs {lv['ttft_p50_ms']:.0f} ms")
    res["loadavg_1m"] = os.getloadavg()[0]
    print(f"load average (1 min): {res['loadavg_1m']:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
