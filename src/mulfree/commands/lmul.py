"""`mulfree lmul error-table` and `mulfree lmul eval`: L-Mul accuracy per product and inside an HF LM."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from mulfree.commands.flags import add_flags, from_args
from mulfree.errors import ConfigError

DEFAULT_METHODS = "fp32,bf16,fp8_e4m3,fp8_e5m2,lmul7,lmul4,lmul3"
MAX_SAMPLES = 10_000_000  # ~2 GB of float64 temporaries in error_table


@dataclass
class ErrorTableConfig:
    """Which products `mulfree lmul error-table` measures."""

    samples: int = field(default=1_000_000, metadata={"help": "product pairs per distribution"})
    no_model: bool = field(default=False, metadata={"help": "skip the SmolLM2 weight x activation distribution"})
    seed: int = field(default=0, metadata={"help": "seed of the sampled pairs"})

    def __post_init__(self) -> None:
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise ConfigError(f"--samples {self.samples} is out of range", f"use 1..{MAX_SAMPLES:,}")
        if not 0 <= self.seed < 1 << 63:
            raise ConfigError(f"--seed {self.seed} is out of range", "use 0..2^63-1")


@dataclass
class LMulEvalConfig:
    """Which products `mulfree lmul eval` swaps into the model, where, on how much text."""

    where: str = field(default="attention", metadata={
        "choices": ("attention", "linear", "all"),
        "help": "attention: Q·Kᵀ and softmax·V; linear: every linear layer but lm_head; all: both"})
    methods: str = field(default=DEFAULT_METHODS, metadata={
        "help": "comma list of fp32, bf16, fp8_e4m3, fp8_e5m2, lmulK"})
    windows: int = field(default=2, metadata={"help": "number of held-out windows"})
    window: int = field(default=512, metadata={"help": "tokens per window"})

    def __post_init__(self) -> None:
        if not 1 <= self.windows <= 100_000:
            raise ConfigError(f"--windows {self.windows} is out of range", "use 1..100000")
        if not 2 <= self.window <= 1 << 20:
            raise ConfigError(f"--window {self.window} is out of range", "a window needs 2..2^20 tokens")


def _write_json(path: str, data: dict) -> None:
    from mulfree.atomic import atomic_write_json

    atomic_write_json(Path(path), data)


def _check_outputs(args: argparse.Namespace) -> None:
    """--png / --json must name files (checked before any work)."""
    from mulfree.atomic import prepare_file

    for flag in ("png", "json"):
        if getattr(args, flag, None):
            prepare_file(getattr(args, flag), f"--{flag}", kind=flag)


def _load(model: str):
    from mulfree.models.pretrained import load_hf_causal_lm, load_smollm2

    return load_smollm2() if model == "smollm2" else load_hf_causal_lm(model)


def error_table(x, y, ks=range(2, 8), scale_fp8: bool = False) -> dict[str, float]:
    """Mean relative error vs the exact float64 product of L-Mul (k mantissa bits) and of fp8 e4m3 / e5m2
    and bf16 (inputs and output rounded; with `scale_fp8` each tensor is first scaled into fp8 range)."""
    import torch

    from mulfree.ops.lmul import lmul
    from mulfree.quant.lmul_apply import _fp8_round

    x, y = x.float(), y.float()
    exact = x.double() * y.double()
    keep = exact != 0

    def mre(approx: torch.Tensor) -> float:
        return ((approx.double() - exact).abs()[keep] / exact.abs()[keep]).mean().item()

    out = {f"lmul{k}": mre(lmul(x, y, mantissa_bits=k)) for k in ks}
    for name, dt in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        rnd = (lambda t: _fp8_round(t, dt)) if scale_fp8 else (lambda t: t.to(dt).float())  # noqa: B023
        out[name] = mre(rnd(rnd(x) * rnd(y)))
    out["bf16"] = mre((x.bfloat16() * y.bfloat16()).float())
    return out


def _smollm2_pairs(n: int, gen):
    """n (weight, activation) pairs sampled from every linear layer of SmolLM2-135M and its inputs on
    256 tokens of held-out text."""
    import torch

    from mulfree.data.text import load_corpus

    model, tok = _load("smollm2")
    acts = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: acts.append(inp[0].detach().flatten()))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.tensor(tok(load_corpus().val_text[:4000])["input_ids"][:256])[None]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    w = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])
    a = torch.cat(acts)
    return (w[torch.randint(0, w.numel(), (n,), generator=gen)], a[torch.randint(0, a.numel(), (n,), generator=gen)])


def run_error_table(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    cfg = from_args(ErrorTableConfig, args)
    _check_outputs(args)
    gen = torch.Generator().manual_seed(cfg.seed)
    dists = {"N(0,1) x N(0,1)": (torch.randn(cfg.samples, generator=gen), torch.randn(cfg.samples, generator=gen))}
    if not cfg.no_model:
        dists["SmolLM2 weight x activation"] = _smollm2_pairs(cfg.samples, gen)
    # N(0,1) fits fp8 as is; real weights (~1e-2) would flush, so those get per-tensor fp8 scaling
    tables = {name: error_table(*xy, scale_fp8=name.startswith("SmolLM2")) for name, xy in dists.items()}
    cols = list(next(iter(tables.values())))
    print(f"mean relative error of one product, {cfg.samples:,} pairs per distribution")
    print(f"{'distribution':<28} " + " ".join(f"{c:>9}" for c in cols))
    for name, t in tables.items():
        print(f"{name:<28} " + " ".join(f"{100 * t[c]:>8.2f}%" for c in cols))
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = list(range(2, 8))
    for i, (name, t) in enumerate(tables.items()):
        color = f"C{i}"
        ax.plot(ks, [100 * t[f"lmul{k}"] for k in ks], "o-", color=color, label=f"L-Mul, {name}")
        for ref, style in (("fp8_e4m3", "--"), ("fp8_e5m2", ":"), ("bf16", "-.")):
            ax.axhline(100 * t[ref], color=color, ls=style, lw=1, label=f"{ref}, {name}")
    ax.set_xlabel("L-Mul operand mantissa bits k")
    ax.set_ylabel("mean relative error (%)")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    ax.set_title("L-Mul vs fp8 / bf16 per-product error")
    fig.tight_layout()
    from mulfree.atomic import atomic_write

    atomic_write(Path(args.png), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    print(f"plot: {args.png}")
    if args.json:
        _write_json(args.json, {"samples": cfg.samples, "seed": cfg.seed, "mre": tables})
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import copy

    import torch

    from mulfree.data.text import load_corpus
    from mulfree.evaluate import perplexity
    from mulfree.quant.lmul_apply import Product, apply_products

    cfg = from_args(LMulEvalConfig, args)
    _check_outputs(args)
    try:
        products = [Product.parse(m.strip()) for m in cfg.methods.split(",") if m.strip()]
    except ValueError as exc:
        raise ConfigError(str(exc), f"e.g. --methods {DEFAULT_METHODS}") from exc
    model, tok = _load(args.model)
    model.eval()
    window = min(cfg.window, getattr(model.config, "max_position_embeddings", None) or cfg.window)
    text = load_corpus(args.data).val_text
    ids = torch.tensor(tok(text)["input_ids"][: cfg.windows * window])
    if ids.numel() < 2:
        raise ConfigError("the held-out text has fewer than 2 tokens", "pass a larger --data file")
    print(f"{args.model}: products in {cfg.where}, {ids.numel()} held-out tokens, windows of {window}")
    rows = []
    for product in products:
        m = copy.deepcopy(model)
        counts = apply_products(m, product, cfg.where)
        with torch.no_grad():
            ppl = perplexity(m, ids, window=window, progress=False)
        rows.append({"method": product.name, "ppl": ppl, **counts})
        print(f"  {product.name:<9} ppl {ppl:9.4f}", flush=True)
        del m
    base = {r["method"]: r["ppl"] for r in rows}
    print(f"{'method':<9} {'ppl':>9} {'vs fp32':>8} {'vs bf16':>8}")

    def rel(row: dict, ref: str) -> str:
        return f"{100 * (row['ppl'] / base[ref] - 1):+7.2f}%" if ref in base else f"{'-':>8}"

    for r in rows:
        print(f"{r['method']:<9} {r['ppl']:>9.4f} {rel(r, 'fp32')} {rel(r, 'bf16')}")
    if args.json:
        _write_json(args.json, {"model": args.model, "where": cfg.where, "tokens": ids.numel(),
                                "window": window, "rows": rows})
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lmul", help="L-Mul (multiplication as one integer add): error table, LM evaluation")
    lsub = p.add_subparsers(dest="lmul_command", metavar="SUBCOMMAND")

    e = lsub.add_parser("error-table", help="per-product error of L-Mul at k = 2..7 mantissa bits vs fp8 and bf16; PNG plot")
    add_flags(e, ErrorTableConfig)
    e.add_argument("--png", default="lmul_error.png", help="where to write the plot")
    e.add_argument("--json", help="also write the table as JSON")
    e.set_defaults(func=run_error_table)

    v = lsub.add_parser("eval", help="perplexity of an HF causal LM with L-Mul / bf16 / fp8 products in attention or linears")
    v.add_argument("--model", default="smollm2", help="'smollm2' (bundled SmolLM2-135M) or a local HF dir / .gguf")
    add_flags(v, LMulEvalConfig)
    v.add_argument("--data", nargs="*", help="text files for held-out text (default: bundled corpus)")
    v.add_argument("--json", help="also write the table as JSON")
    v.set_defaults(func=run_eval)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
