"""Peer benchmark: llama.cpp TQ2_0 / TQ1_0 vs the packed ternary engine on the same model shape, in one run.

    python benchmarks/llamacpp_peer.py --build            # build llama.cpp once (cached), then measure
    python benchmarks/llamacpp_peer.py --llama-cpp DIR    # DIR/bin/llama-bench and DIR/bin/llama-quantize
    python benchmarks/llamacpp_peer.py --build --shape tiny --reps 1 --rounds 1   # smoke run

llama.cpp is the copy vendored in llama-cpp-python 0.3.36's sdist (PyPI), built with GGML_NATIVE=ON (a local
baseline only). Its model is a random Llama of the MMfree shape (MHA, head dim 128) written with `gguf`, weights
{-1, 0, 1} x scale in F16, quantized by llama-quantize. llama-bench runs pp/tg tests at each thread count; our
engine (benchmarks/decode.py helpers, random packed MMfree model) runs the same prefill / decode lengths right
after, and the whole comparison repeats `--rounds` times. Prints a table (with the 1-minute load average after each
row: the host may be shared), the ratios ours / llama.cpp, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from decode import SHAPES, random_packed_model, time_packed

from mulfree.atomic import atomic_write
from mulfree.infer.engine import PackedModel
from mulfree.kernels import backend as best_backend
from mulfree.kernels import cpu_module

LCPP_PYPI_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LCPP_PYPI_VERSION}"
DEFAULT_CACHE = Path.home() / ".cache" / "mulfree" / f"llama.cpp-{LCPP_PYPI_VERSION}"
CMAKE_FLAGS = ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
NICE = ["nice", "-n", "10"]
HEAD_DIM = 128
WEIGHT_SCALE = 0.02
# name: (llama-quantize type, extra llama-quantize flags, label)
FORMATS = {
    "tq2_0": ("TQ2_0", [], "llama.cpp TQ2_0"),
    "tq2_0_all": ("TQ2_0", ["--output-tensor-type", "tq2_0", "--token-embedding-type", "tq2_0"],
                  "llama.cpp TQ2_0 everywhere"),
    "tq1_0": ("TQ1_0", [], "llama.cpp TQ1_0"),
}


def host_info() -> dict:
    """CPU model name and widest x86 vector ISA, from /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    isa = "AVX-512" if "avx512f" in flags else "AVX2-only" if "avx2" in flags else "no AVX2"
    return {"cpu": model, "isa": isa, "avx512_vnni": "avx512_vnni" in flags, "cpus": os.cpu_count()}


def fetch_sdist(cache: Path, sdist: Path | None) -> Path:
    """The llama-cpp-python sdist: `sdist` if given, else the cached copy, else `pip download` it into `cache`."""
    if sdist is not None:
        return sdist
    path = cache / f"{SDIST_NAME}.tar.gz"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LCPP_PYPI_VERSION}", "-d", str(cache)], check=True)
    return path


def build_llama_cpp(cache: Path, sdist: Path | None) -> Path:
    """Unpack the sdist into `cache` and build llama-bench + llama-quantize there (reused when present)."""
    build = cache / "build"
    if all((build / "bin" / b).exists() for b in ("llama-bench", "llama-quantize")):
        return build
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / SDIST_NAME / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        with tarfile.open(fetch_sdist(cache, sdist)) as tar:
            tar.extractall(cache, filter="data")
    print(f"building llama.cpp in {build} (nice -n 10, -j2; takes a while)", flush=True)
    subprocess.run(NICE + ["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], check=True)
    subprocess.run(NICE + ["cmake", "--build", str(build), "--target", "llama-bench", "llama-quantize", "-j2"],
                   check=True)
    return build


def vendored_commit(cache: Path) -> str | None:
    """The llama.cpp commit the sdist vendors (its git submodule HEAD), if the unpacked sdist is in `cache`."""
    head = cache / SDIST_NAME / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    return head.read_text().strip() if head.exists() else None


def gguf_tensor_specs(vocab: int, d: int, layers: int, inter: int) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF names and numpy shapes ([out, in]; 1-D = norm) of a Llama with this shape."""
    specs: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab, d))]
    for n in range(layers):
        b = f"blk.{n}."
        specs += [(b + "attn_norm.weight", (d,)), (b + "attn_q.weight", (d, d)), (b + "attn_k.weight", (d, d)),
                  (b + "attn_v.weight", (d, d)), (b + "attn_output.weight", (d, d)), (b + "ffn_norm.weight", (d,)),
                  (b + "ffn_gate.weight", (inter, d)), (b + "ffn_up.weight", (inter, d)),
                  (b + "ffn_down.weight", (d, inter))]
    return specs + [("output_norm.weight", (d,)), ("output.weight", (vocab, d))]


def write_random_gguf(path: Path, shape: str, seed: int) -> None:
    """An F16 Llama GGUF: matrices random {-1, 0, 1} x WEIGHT_SCALE, norms ones, a dummy SPM vocab; streamed."""
    import gguf

    vocab, d, layers, inter = SHAPES[shape]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"random-ternary-llama-{shape}")
    w.add_context_length(2048)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(d // HEAD_DIM)
    w.add_head_count_kv(d // HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    n_words = vocab - len(tokens)
    tokens += [f"\u2581w{i}" for i in range(n_words)]
    types += [gguf.TokenType.NORMAL] * n_words
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(vocab)])
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    specs = gguf_tensor_specs(vocab, d, layers, inter)
    for name, shp in specs:
        dt = np.dtype(np.float32 if len(shp) == 1 else np.float16)
        w.add_tensor_info(name, shp, dt, int(np.prod(shp)) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, shp in specs:
        if len(shp) == 1:
            w.write_tensor_data(np.ones(shp, np.float32))
        else:
            w.write_tensor_data(rng.integers(-1, 2, size=shp, dtype=np.int8).astype(np.float16)
                                * np.float16(WEIGHT_SCALE))
    w.close()


def quantize(build: Path, src: Path, dst: Path, qtype: str, extra: list[str]) -> None:
    """llama-quantize `src` into `dst` (2 threads, niced); its log is kept only on failure."""
    cmd = NICE + [str(build / "bin" / "llama-quantize"), *extra, str(src), str(dst), qtype, "2"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def prepare_models(build: Path, cache: Path, shape: str, formats: list[str], seed: int) -> dict[str, Path]:
    """The F16 GGUF and its quantized variants, cached under `cache/models` (made once)."""
    models = cache / "models"
    f16 = models / f"random-llama-{shape}-f16.gguf"
    if not f16.exists():
        print(f"writing {f16}", flush=True)
        atomic_write(f16, lambda tmp: write_random_gguf(tmp, shape, seed))
    out = {}
    for fmt in formats:
        qtype, extra, _ = FORMATS[fmt]
        path = models / f"random-llama-{shape}-{fmt}.gguf"
        if not path.exists():
            print(f"quantizing {path.name}", flush=True)
            atomic_write(path, lambda tmp, q=qtype, x=extra: quantize(build, f16, tmp, q, x))
        out[fmt] = path
    return out


def run_llama_bench(build: Path, model: Path, threads: list[int], prompt: int, gen: int, reps: int) -> dict:
    """llama-bench pp/tg tok/s (avg_ts) per thread count, plus its build commit and the model size."""
    cmd = [str(build / "bin" / "llama-bench"), "-m", str(model), "-p", str(prompt), "-n", str(gen),
           "-t", ",".join(map(str, threads)), "-r", str(reps), "-o", "json"]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    res: dict = {}
    for test in json.loads(proc.stdout):
        kind = "prefill" if test["n_gen"] == 0 else "decode"
        res[f"{kind}_{test['n_threads']}t"] = test["avg_ts"]
        res[f"{kind}_{test['n_threads']}t_sd"] = test["stddev_ts"]
        res["build_commit"], res["size_mib"] = test["build_commit"], test["model_size"] / 2**20
    return res


OURS_LABELS = {"t2": "mulfree packed 2-bit", "t1": "mulfree packed 1.6-bit"}


def run_ours(models: dict[int, PackedModel], prompt: int, gen: int, reps: int) -> dict:
    """Packed-engine decode and prefill tok/s per thread count, each the mean of `reps` timings."""
    res = {}
    for threads, pm in models.items():
        runs = [time_packed(pm, gen, prompt) for _ in range(reps)]
        res[f"decode_{threads}t"] = sum(r[0] for r in runs) / reps
        res[f"prefill_{threads}t"] = sum(r[1] for r in runs) / reps
    return res


def print_round(i: int, rnd: dict, formats: list[str], threads: list[int], prompt: int, gen: int, ours: str) -> None:
    cols = [(f"prefill_{t}t", f"pp{prompt} {t}T") for t in threads] + [(f"decode_{t}t", f"tg{gen} {t}T")
                                                                       for t in threads]
    head = f"{'engine':<30}{'MiB':>8}" + "".join(f"{c[1]:>11}" for c in cols) + f"{'load':>7}"
    print(f"\nround {i + 1} (tok/s)\n{head}")
    rows = [(FORMATS[f][2], rnd["llama_cpp"][f]) for f in formats] + [(ours, rnd["ours"])]
    for label, r in rows:
        print(f"{label:<30}{r['size_mib']:>8.1f}" + "".join(f"{r[k]:>11.1f}" for k, _ in cols)
              + f"{r['load_1min']:>7.1f}")
    for f in formats:
        print(f"{'ours / ' + FORMATS[f][2].removeprefix('llama.cpp '):<30}{'':>8}" + "".join(f"{rnd['ratios'][f][k]:>10.2f}x"
                                                                        for k, _ in cols))


def packed_models(shape: str, threads: list[int], seed: int, fmt: str = "t2") -> tuple[dict[int, PackedModel], float]:
    """Our random packed model of `shape` in format `fmt`, one PackedModel per thread count sharing its tensors,
    and its MiB."""
    vocab, d, layers, inter = SHAPES[shape]
    pm = random_packed_model(vocab, d, layers, inter, threads=max(threads), seed=seed, fmt=fmt)
    models = {t: pm if t == max(threads) else PackedModel(pm.config, pm.tensors, backend=pm.backend, threads=t,
                                                          fmt=pm.format.name) for t in threads}
    return models, sum(v.numel() * v.element_size() for v in pm.tensors.values()) / 2**20


def add_bench_args(p: argparse.ArgumentParser, rounds: int) -> None:
    """The llama-bench side's flags, shared by the peer benchmarks."""
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--prompt", type=int, default=128, help="prefill tokens (llama-bench -p)")
    p.add_argument("--gen", type=int, default=64, help="decode tokens (llama-bench -n)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per test (llama-bench -r; ours: mean of reps)")
    p.add_argument("--rounds", type=int, default=rounds, help="back-to-back repeats of the whole comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours-format", default="t2", choices=list(OURS_LABELS),
                   help="our packed format: t2 (2 bits per weight) or t1 (1.6)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--llama-cpp", type=Path, help="existing llama.cpp build dir holding bin/llama-bench and "
                     "bin/llama-quantize")
    src.add_argument("--build", action="store_true", help=f"build llama.cpp from llama-cpp-python "
                     f"{LCPP_PYPI_VERSION}'s sdist into --cache (reused when already built)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="build + GGUF cache (default: %(default)s)")
    p.add_argument("--sdist", type=Path, help="a local llama-cpp-python sdist to build from instead of pip download")
    p.add_argument("--shape", default="1.3b", choices=sorted(SHAPES))
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    add_bench_args(p, rounds=2)
    args = p.parse_args()
    if cpu_module() is None:
        raise SystemExit("error: the compiled extension is missing; reinstall mulfree")
    if args.llama_cpp is not None:
        build = args.llama_cpp
    elif args.build:
        build = build_llama_cpp(args.cache, args.sdist)
    else:
        build = args.cache / "build"
    missing = [b for b in ("llama-bench", "llama-quantize") if not (build / "bin" / b).exists()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not in {build / 'bin'}; pass --build or --llama-cpp DIR")
    host = host_info()
    print(f"host: {host['cpu']}, {host['isa']}, {host['cpus']} CPUs; mulfree kernel backend {best_backend()}")
    ggufs = prepare_models(build, args.cache, args.shape, args.formats, args.seed)
    ours_models, ours_mib = packed_models(args.shape, args.threads, args.seed, args.ours_format)
    rounds = []
    for i in range(args.rounds):
        lc = {f: run_llama_bench(build, ggufs[f], args.threads, args.prompt, args.gen, args.reps)
              | {"load_1min": os.getloadavg()[0]} for f in args.formats}
        ours = run_ours(ours_models, args.prompt, args.gen, args.reps) | {"size_mib": ours_mib,
                                                                           "load_1min": os.getloadavg()[0]}
        keys = [k for k in ours if k != "size_mib"]
        ratios = {f: {k: ours[k] / lc[f][k] for k in keys} for f in args.formats}
        rounds.append({"llama_cpp": lc, "ours": ours, "ratios": ratios})
        print_round(i, rounds[-1], args.formats, args.threads, args.prompt, args.gen, OURS_LABELS[args.ours_format])
    commit = vendored_commit(args.cache) if args.llama_cpp is None else None
    if not commit and rounds:
        commit = rounds[0]["llama_cpp"][args.formats[0]]["build_commit"]
    print(json.dumps({"benchmark": "llamacpp_peer", "host": host, "backend": best_backend(), "shape": args.shape,
                      "ours_format": args.ours_format,
                      "llama_cpp": {"source": f"llama-cpp-python {LCPP_PYPI_VERSION} sdist" if commit else str(build),
                                    "commit": commit or "unknown"},
                      "prompt": args.prompt, "gen": args.gen, "reps": args.reps, "rounds": rounds}))


if __name__ == "__main__":
    main()
