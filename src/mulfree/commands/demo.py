"""`mulfree demo`: a tiny MMfree LM and an equal-size Transformer++ trained side by side on the bundled
Shakespeare with equal tokens; prints both validation perplexities, plots the losses, samples."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from mulfree.commands.flags import add_flags, from_args
from mulfree.settings import check_fields

DEMO_FILE = "demo.json"
# What a demo output dir holds: an earlier demo is replaced without --overwrite.
DEMO_ENTRIES = {"mmfree", "transformerpp", "loss_curves.png", DEMO_FILE}


@dataclass
class DemoConfig:
    """Model sizes and learning rates of the two demo runs (their run settings are a TrainConfig)."""

    hidden_size: int = field(default=256, metadata={"help": "model width (both models)", "min": 1, "max": 2**14})
    layers: int = field(default=4, metadata={"help": "layers (both models)", "min": 1, "max": 256})
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size", "min": 1, "max": 2**18})
    mmfree_lr: float = field(default=4e-3, metadata={"help": "peak LR of the ternary model", "gt": 0})
    transformer_lr: float = field(default=1e-3, metadata={"help": "peak LR of Transformer++", "gt": 0})
    eval_tokens: int = field(default=16384, metadata={"help": "validation tokens for the final perplexity",
                                                      "min": 1, "max": 2**24})
    overwrite: bool = field(default=False, metadata={"help": "replace what --out holds (kept until the new demo "
                                                     "is complete; an earlier demo output is replaced anyway)"})

    def __post_init__(self) -> None:
        check_fields(self)


def register(sub: argparse._SubParsersAction) -> None:
    from mulfree.settings import TrainConfig

    d = sub.add_parser("demo", help="train tiny MMfree and Transformer++ side by side, compare, sample",
                       description="Trains an MMfree LM and an equal-size Transformer++ on the bundled "
                       "Shakespeare with equal tokens, prints both validation perplexities, plots loss "
                       "curves and prints a sample.")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    add_flags(d, TrainConfig, only=("steps", "batch_size", "seq_len", "seed"),
              defaults={"steps": 220, "batch_size": 16, "seq_len": 128, "seed": 0})
    add_flags(d, DemoConfig)
    d.set_defaults(func=cmd_demo)


def _plot_losses(runs: dict[str, Path], png: Path) -> None:
    """Training loss (moving average) and validation loss of each run, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mulfree.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, run_dir), color in zip(runs.items(), ("tab:red", "tab:blue")):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        k = max(1, len(train) // 50)
        smooth = [sum(v for _, v in train[max(0, i - k + 1) : i + 1]) / len(train[max(0, i - k + 1) : i + 1])
                  for i in range(len(train))]
        ax.plot([s for s, _ in train], smooth, color=color, label=f"{name} train")
        ax.plot([s for s, _ in val], [v for _, v in val], "o--", color=color, label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Tiny MMfree vs Transformer++ on Shakespeare (equal tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _is_demo_output(out: Path) -> bool:
    """True for a directory an earlier `mulfree demo` wrote (nothing in it but the demo's own entries)."""
    entries = {p.name for p in out.iterdir()} if out.is_dir() else set()
    return bool(entries) and entries <= DEMO_ENTRIES


def cmd_demo(args) -> int:
    import time

    from mulfree.atomic import atomic_dir, dumps_strict, prepare_output
    from mulfree.settings import TrainConfig

    demo = from_args(DemoConfig, args)
    run = from_args(TrainConfig, args, eval_batches=4, save_every=0, warmup=max(1, args.steps // 10),
                    eval_every=max(1, args.steps // 6))
    t_start = time.perf_counter()
    out = Path(args.out)
    overwrite = demo.overwrite or _is_demo_output(out)
    prepare_output(out, "demo", overwrite)
    with atomic_dir(out, overwrite, kind="demo") as tmp:
        summary = _run_demo(demo, run, tmp, out)
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(dumps_strict(summary))
    return 0


def _train_side_by_side(jobs: list, train_ids, val_ids, tmp: Path, tokenizer) -> list[dict]:
    """Train each (family, model, cfg) of `jobs` into tmp / family.name, all at once in threads; a failure or
    Ctrl-C in one place ends every run after its current step and is raised here."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from mulfree.train import train

    stop = threading.Event()

    def run_one(job) -> dict:
        family, model, cfg = job
        t0 = time.perf_counter()
        res = train(model, train_ids, val_ids, cfg, tmp / family.name, tokenizer=tokenizer, stop_event=stop)
        return {"params": sum(p.numel() for p in model.parameters()), "tokens": res["tokens"],
                "train_loss": res["loss"], "wall_s": time.perf_counter() - t0}

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [pool.submit(run_one, job) for job in jobs]
            try:
                return [f.result() for f in futures]
            except BaseException:
                stop.set()
                raise
    finally:
        torch.set_num_threads(threads)  # each run set one thread for itself


def _run_demo(demo: DemoConfig, run, tmp: Path, out: Path) -> dict:
    """Train both models into `tmp` (renamed to `out` afterwards), print the comparison and a sample."""
    import torch

    from mulfree.atomic import atomic_write_json
    from mulfree.data.text import decode, encode, load_corpus, train_tokenizer
    from mulfree.evaluate import perplexity
    from mulfree.generation import generate
    from mulfree.models import registry

    corpus = load_corpus()
    tokenizer = train_tokenizer(corpus.train_text, demo.vocab_size)
    train_ids, val_ids = encode(tokenizer, corpus.train_text), encode(tokenizer, corpus.val_text)
    eval_ids = val_ids[: demo.eval_tokens]
    print(f"corpus: {len(corpus.train_docs)} training texts ({train_ids.numel()} tokens), validation "
          f"{', '.join(corpus.val_docs)} ({val_ids.numel()} tokens); BPE vocab {tokenizer.get_vocab_size()}")
    families = (registry.get("mmfree"), registry.get("transformerpp"))
    jobs = []  # (family, model, cfg), the models built in order from the seed
    for family, lr in zip(families, (demo.mmfree_lr, demo.transformer_lr)):
        cfg_cls = family.config_cls
        config = cfg_cls.from_preset("tiny", hidden_size=demo.hidden_size, num_hidden_layers=demo.layers,
                                     vocab_size=tokenizer.get_vocab_size(), intermediate_size=None,
                                     **cfg_cls.preset_extras(demo.hidden_size))
        torch.manual_seed(run.seed)
        model = family.model_cls(config)
        # One torch thread each, the two runs side by side: two independent runs use two cores better than one
        # run's parallel regions do, and keep using the half core a busy machine leaves.
        cfg = dataclasses.replace(run, lr=lr, min_lr=lr / 10, threads=1)
        print(f"training {config.model_type} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
              f"lr {lr:g}, {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens)")
        jobs.append((family, model, cfg))

    results = _train_side_by_side(jobs, train_ids, val_ids, tmp, tokenizer)
    for (family, model, cfg), r in zip(jobs, results):
        r["val_ppl"] = perplexity(model, eval_ids, window=cfg.seq_len, progress=False)
    runs = {model.config.model_type: tmp / family.name for family, model, _ in jobs}
    models = [model for _, model, _ in jobs]
    _plot_losses(runs, tmp / "loss_curves.png")
    mm, tf = results
    mm_name, tf_name = (f.label for f in families)
    print()
    print(f"{'':24}{mm_name:>14}{tf_name:>16}")
    print(f"{'parameters':24}{mm['params']:>14,}{tf['params']:>16,}")
    print(f"{'training tokens':24}{mm['tokens']:>14,}{tf['tokens']:>16,}")
    print(f"{'final train loss':24}{mm['train_loss']:>14.3f}{tf['train_loss']:>16.3f}")
    print(f"{'validation perplexity':24}{mm['val_ppl']:>14.2f}{tf['val_ppl']:>16.2f}")
    print(f"{'training time (s)':24}{mm['wall_s']:>14.1f}{tf['wall_s']:>16.1f}")
    ratio = mm["val_ppl"] / tf["val_ppl"]
    print(f"{mm_name} / {tf_name} validation perplexity: {ratio:.3f} ({'within' if ratio <= 1.2 else 'outside'} 1.2x)")
    print(f"loss curves: {out / 'loss_curves.png'}")
    prompt = "ROMEO.\n"
    ids = generate(models[0], encode(tokenizer, prompt), 80, temperature=0.8, top_k=40, seed=run.seed)
    print(f"\n{mm_name} sample (temperature 0.8, top-k 40):\n" + decode(tokenizer, ids[0]))
    summary = {"mmfree_val_ppl": round(mm["val_ppl"], 3), "transformer_val_ppl": round(tf["val_ppl"], 3),
               "ratio": round(ratio, 4), "params": [mm["params"], tf["params"]], "tokens": mm["tokens"]}
    atomic_write_json(tmp / DEMO_FILE, summary)
    return summary
