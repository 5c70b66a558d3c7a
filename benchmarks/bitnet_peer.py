"""Peer benchmark: bitnet.cpp I2_S vs the packed ternary engine on the same model shape, in one run.

    python benchmarks/bitnet_peer.py --source DIR --build   # configure + build bitnet.cpp from DIR, then measure
    python benchmarks/bitnet_peer.py --source DIR           # reuse the build; DIR is needed to make the model once
    python benchmarks/bitnet_peer.py --rounds 1 --threads 2 # build and model both cached: no --source needed

Source: no package vendors bitnet.cpp, and upstream microsoft/BitNet's llama.cpp submodule (a fork) is not
reachable. The public repository ygqdan/BitNet-linux (commit 6d113cd) bundles the January 2026 tree (reported as
microsoft/BitNet 1876a3e8, with the November 2025 parallel I2_S kernels) with the submodule inlined: clone it, or
export a bare mirror with `git --git-dir=MIRROR archive HEAD | tar -x -C ~/.cache/mulfree/bitnet-src` (a partial
mirror may lack a few blobs, e.g. other vocab GGUFs: export the tree file by file, skipping them; only
models/ggml-vocab-llama-spm.gguf is needed), and pass that directory as --source. Nothing is downloaded here. The
bundle lacks 3rdparty/llama.cpp/common/cmake/build-info-gen-cpp.cmake; --build writes a two-line stand-in (build
info "unknown") into the source tree when it is missing.
Toolchain (Debian 12): `apt-get install -y clang-19 libomp-19-dev`; --build runs cmake with clang-19,
-DBITNET_X86_TL2=OFF (I2_S only; TL2 needs its per-shape code generation first), GGML_NATIVE, and builds only
llama-bench + llama-quantize (-j2, niced) into --build-dir.

Model: the source's utils/generate-dummy-bitnet-model.py (its "bitnet" architecture: Llama-style MHA with sub-norms,
ternary absmean-quantized F16 matrices, a tied head) run with the shape added (hidden 2048, 24 layers, FFN 5632, 16
heads) and the vocabulary (32000 tokens) of llama.cpp's models/ggml-vocab-llama-spm.gguf from the same tree, then
llama-quantize to I2_S twice: the tied head/embedding as shipped (F16) and as its src/README.md recommends
(--token-embedding-type Q6_K). Models are cached under --models and made once.
llama-bench runs pp/tg at each thread count (mean of --reps); our engine (benchmarks/decode.py's random packed
MMfree model: same matrix shapes, MLGRU token mixer instead of attention) runs the same prefill / decode lengths
right after; the comparison repeats --rounds times. Prints a table per round and the median over rounds, with the
load average after each row (the host may be shared), the ratios ours / bitnet.cpp, and one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from decode import SHAPES
from llamacpp_peer import (
    NICE,
    OURS_LABELS,
    add_bench_args,
    host_info,
    packed_models,
    run_llama_bench,
    run_ours,
)

from mulfree.atomic import atomic_write
from mulfree.kernels import backend as best_backend
from mulfree.kernels import cpu_module

CACHE = Path.home() / ".cache" / "mulfree"
CMAKE_FLAGS = ["-DCMAKE_C_COMPILER=clang-19", "-DCMAKE_CXX_COMPILER=clang++-19", "-DBITNET_X86_TL2=OFF",
               "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_EXAMPLES=ON",
               "-DLLAMA_BUILD_TESTS=OFF"]
TOOLS = ("llama-bench", "llama-quantize")
HEAD_DIM = 128  # 16 heads at 1.3b, as in llamacpp_peer
VOCAB_FILE = Path("3rdparty/llama.cpp/models/ggml-vocab-llama-spm.gguf")
BUILD_INFO_GEN = Path("3rdparty/llama.cpp/common/cmake/build-info-gen-cpp.cmake")
# name: (extra llama-quantize flags, label)
FORMATS = {
    "i2_s": ([], "bitnet.cpp I2_S, F16 head"),
    "i2_s_q6k": (["--token-embedding-type", "Q6_K"], "bitnet.cpp I2_S, Q6_K head"),
}

# Runs in a child with the source's gguf-py first on sys.path (it knows I2_S / TL2 and the bitnet arch).
GENERATE = r"""
import importlib.util, json, sys, tempfile, types
from pathlib import Path
sys.modules.setdefault("sentencepiece", types.SimpleNamespace(SentencePieceProcessor=None))  # imported, unused
import gguf, torch
src, vocab_file, out, shape = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
spec = importlib.util.spec_from_file_location("gen", src / "utils" / "generate-dummy-bitnet-model.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)
gen.model_config[shape["name"]] = {k: shape[k] for k in
                                   ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
cls = gen.Model.from_model_architecture("BitnetForCausalLM")

def set_vocab(self):  # the vocabulary read by the parent (this tree's GGUFReader needs numpy 1)
    v = json.loads(Path(vocab_file).read_text())
    assert len(v["tokens"]) == shape["vocab_size"], len(v["tokens"])
    w = self.gguf_writer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(v["tokens"])
    w.add_token_scores(v["scores"])
    w.add_token_types(v["types"])
    w.add_bos_token_id(v["bos"])
    w.add_eos_token_id(v["eos"])
    w.add_unk_token_id(v["unk"])

orig = cls.generate_tensors
def generate_tensors(self):  # its embedding has 32002 rows: keep the vocabulary's
    for name, t in orig(self):
        yield name, (t[:shape["vocab_size"]] if name == "model.embed_tokens.weight" else t)

cls.set_vocab, cls.generate_tensors = set_vocab, generate_tensors
torch.manual_seed(shape["seed"])
with tempfile.TemporaryDirectory() as d:
    (Path(d) / "config.json").write_text(json.dumps(shape["config"]))
    with torch.inference_mode():
        m = cls(Path(d), gen.ftype_map["f16"], out, False, False)
        m.set_params(shape["name"])
        m.set_gguf_parameters()
        m.set_vocab()
        m.write()
"""


def build_bitnet(source: Path, build: Path) -> None:
    """Configure + build llama-bench and llama-quantize from `source` into `build` (niced, -j2)."""
    gen = source / BUILD_INFO_GEN
    if not gen.exists():  # missing from the bundle; the stand-in fills common/build-info.cpp from its template
        gen.parent.mkdir(parents=True, exist_ok=True)
        gen.write_text("include(${CMAKE_CURRENT_SOURCE_DIR}/cmake/build-info.cmake)\n"
                       "configure_file(${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp.in "
                       "${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp)\n")
    print(f"building bitnet.cpp in {build} (nice -n 10, -j2; takes a while)", flush=True)
    subprocess.run(NICE + ["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS], check=True)
    subprocess.run(NICE + ["cmake", "--build", str(build), "--target", *TOOLS, "-j2"], check=True)


def make_dummy(source: Path, out: Path, shape: str, seed: int) -> None:
    """The F16 dummy BitNet GGUF of `shape` via the source's generator (see GENERATE)."""
    vocab, d, layers, inter = SHAPES[shape]
    heads = d // HEAD_DIM
    spec = {"name": shape, "vocab_size": vocab, "hidden_size": d, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "seed": seed,
            "config": {"architectures": ["BitnetForCausalLM"], "vocab_size": vocab, "hidden_size": d,
                       "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
                       "num_key_value_heads": heads, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                       "rope_theta": 10000.0}}
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(source / "3rdparty/llama.cpp/gguf-py"),
                                                       os.environ.get("PYTHONPATH", "")])}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as vocab_json:
        json.dump(read_vocab(source / VOCAB_FILE), vocab_json)
        vocab_json.flush()
        cmd = [sys.executable, "-c", GENERATE, str(source), vocab_json.name, str(out), json.dumps(spec)]
        if subprocess.run(NICE + cmd, check=False, env=env).returncode != 0:
            raise SystemExit(f"error: generating {out} with {source / 'utils/generate-dummy-bitnet-model.py'} failed")


def read_vocab(path: Path) -> dict:
    """Tokens, scores, types and special ids of a llama.cpp vocab-only GGUF (read with the installed gguf)."""
    import gguf

    f = gguf.GGUFReader(path).fields

    def items(key: str) -> list:
        return [f[key].parts[i] for i in f[key].data]

    return {"tokens": [bytes(t).decode("utf-8") for t in items("tokenizer.ggml.tokens")],
            "scores": [float(x[0]) for x in items("tokenizer.ggml.scores")],
            "types": [int(x[0]) for x in items("tokenizer.ggml.token_type")],
            **{k: int(f[f"tokenizer.ggml.{n}_token_id"].parts[-1][0])
               for k, n in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"))}}


def quantize(build: Path, src: Path, dst: Path, extra: list[str]) -> str:
    """llama-quantize `src` to I2_S into `dst`; returns the type its (tied) head got."""
    cmd = NICE + [str(build / "bin" / "llama-quantize"), *extra, str(src), str(dst), "I2_S", "2"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    m = re.search(r"token_embd\.weight.*?converting to (\w+)", proc.stdout + proc.stderr)
    return m.group(1) if m else "?"


def prepare_models(source: Path | None, build: Path, models: Path, shape: str, formats: list[str],
                   seed: int) -> tuple[dict[str, Path], dict[str, str]]:
    """The F16 dummy and its I2_S variants under `models` (made once), and each variant's head type."""
    f16 = models / f"dummy-bitnet-{shape}-f16.gguf"
    heads_file = models / f"dummy-bitnet-{shape}-heads.json"
    heads = json.loads(heads_file.read_text()) if heads_file.exists() else {}
    out = {}
    for fmt in formats:
        out[fmt] = path = models / f"dummy-bitnet-{shape}-{fmt}.gguf"
        if path.exists():
            continue
        if not f16.exists():
            if source is None:
                raise SystemExit(f"error: {f16} is missing; pass --source DIR to generate it")
            print(f"writing {f16}", flush=True)
            models.mkdir(parents=True, exist_ok=True)
            atomic_write(f16, lambda tmp: make_dummy(source, tmp, shape, seed))
        print(f"quantizing {path.name}", flush=True)

        def write(tmp: Path, fmt: str = fmt) -> None:
            heads[fmt] = quantize(build, f16, tmp, FORMATS[fmt][0])

        atomic_write(path, write)
        heads_file.write_text(json.dumps(heads))
    return out, heads


def source_commit(source: Path | None, given: str | None) -> str:
    if given or source is None or not (source / ".git").exists():
        return given or "unknown"
    proc = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], check=False, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def median_round(rounds: list[dict]) -> dict:
    """Each number's median over the rounds (a round disturbed by a neighbour on the 2-core host drops out)."""
    def med(path: list[str]) -> dict:
        rows = [functools.reduce(dict.__getitem__, path, r) for r in rounds]
        return {k: (statistics.median(r[k] for r in rows) if isinstance(v, (int, float)) else
                    [statistics.median(r[k][j] for r in rows) for j in range(len(v))] if isinstance(v, list) else v)
                for k, v in rows[0].items()}
    return {"bitnet": {f: med(["bitnet", f]) for f in rounds[0]["bitnet"]}, "ours": med(["ours"]),
            "ratios": {f: med(["ratios", f]) for f in rounds[0]["ratios"]}}


def print_round(title: str, rnd: dict, formats: list[str], threads: list[int], prompt: int, gen: int,
                ours: str) -> None:
    cols = [(f"prefill_{t}t", f"pp{prompt} {t}T") for t in threads] + [(f"decode_{t}t", f"tg{gen} {t}T")
                                                                       for t in threads]
    print(f"\n{title} (tok/s)\n{'engine':<30}{'MiB':>8}" + "".join(f"{c[1]:>11}" for c in cols)
          + f"{'load 1/5/15 min':>18}")
    for label, r in [(FORMATS[f][1], rnd["bitnet"][f]) for f in formats] + [(ours, rnd["ours"])]:
        print(f"{label:<30}{r['size_mib']:>8.1f}" + "".join(f"{r[k]:>11.1f}" for k, _ in cols)
              + "{:>8.2f}{:>5.2f}{:>5.2f}".format(*r["loadavg"]))
    for f in formats:
        print(f"{'ours / ' + FORMATS[f][1].removeprefix('bitnet.cpp '):<30}{'':>8}"
              + "".join(f"{rnd['ratios'][f][k]:>10.2f}x" for k, _ in cols))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, help="bitnet.cpp source tree (needed for --build and to make the model)")
    p.add_argument("--build", action="store_true", help="configure + build llama-bench/llama-quantize first")
    p.add_argument("--build-dir", type=Path, default=CACHE / "bitnet-build", help="default: %(default)s")
    p.add_argument("--models", type=Path, default=CACHE / "bitnet-models", help="GGUF cache (default: %(default)s)")
    p.add_argument("--commit", help="label for the source's commit (default: git rev-parse in --source)")
    p.add_argument("--shape", default="1.3b", choices=[s for s in SHAPES if SHAPES[s][0] == 32000],
                   help="a shape with the vocabulary's 32000 tokens")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    add_bench_args(p, rounds=1)
    args = p.parse_args()
    if cpu_module() is None:
        raise SystemExit("error: the compiled extension is missing; reinstall mulfree")
    if args.build:
        if args.source is None:
            raise SystemExit("error: --build needs --source DIR")
        build_bitnet(args.source, args.build_dir)
    missing = [b for b in TOOLS if not (args.build_dir / "bin" / b).exists()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not in {args.build_dir / 'bin'}; pass --source DIR --build")
    host = host_info()
    print(f"host: {host['cpu']}, {host['isa']}, {host['cpus']} CPUs; mulfree kernel backend {best_backend()}")
    ggufs, heads = prepare_models(args.source, args.build_dir, args.models, args.shape, args.formats, args.seed)
    ours_models, ours_mib = packed_models(args.shape, args.threads, args.seed, args.ours_format)
    rounds = []
    for i in range(args.rounds):
        bn = {f: run_llama_bench(args.build_dir, ggufs[f], args.threads, args.prompt, args.gen, args.reps)
              | {"loadavg": list(os.getloadavg())} for f in args.formats}
        ours = run_ours(ours_models, args.prompt, args.gen, args.reps) | {"size_mib": ours_mib,
                                                                           "loadavg": list(os.getloadavg())}
        keys = [k for k in ours if k.startswith(("prefill_", "decode_"))]
        ratios = {f: {k: ours[k] / bn[f][k] for k in keys} for f in args.formats}
        rounds.append({"bitnet": bn, "ours": ours, "ratios": ratios})
        print_round(f"round {i + 1}", rounds[-1], args.formats, args.threads, args.prompt, args.gen,
                    OURS_LABELS[args.ours_format])
    median = median_round(rounds) if len(rounds) > 1 else None
    if median:
        print_round(f"median of {len(rounds)} rounds", median, args.formats, args.threads, args.prompt, args.gen,
                    OURS_LABELS[args.ours_format])
    print(json.dumps({"benchmark": "bitnet_peer", "host": host, "backend": best_backend(), "shape": args.shape,
                      "ours_format": args.ours_format, "bitnet": {"source": str(args.source or args.build_dir),
                                 "commit": source_commit(args.source, args.commit), "heads": heads},
                      "prompt": args.prompt, "gen": args.gen, "reps": args.reps, "rounds": rounds,
                      "median": median}))


if __name__ == "__main__":
    main()
