"""`mulfree train`, `generate`, `eval` and `demo`: thin handlers over `mulfree.train`,
`mulfree.generation` and `mulfree.evaluate`. Heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mulfree.errors import CheckpointError, ConfigError, DataError, MulfreeError

MODEL_FAMILIES = ("mmfree", "transformer")
TRAIN_FLAGS = ("steps", "batch_size", "seq_len", "lr", "min_lr", "warmup", "weight_decay", "grad_clip",
               "grad_accum", "eval_every", "eval_batches", "save_every", "device")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an MMfree or Transformer++ LM on text",
                       description="Train a language model (tokenizer trained on the data and saved with it).")
    p.add_argument("--config", default="tiny", help="preset (tiny, small, 370m, 1.3b, 2.7b) or a config .json; "
                   "a JSON may hold a \"train\" object with run settings")
    p.add_argument("--model", choices=MODEL_FAMILIES, default="mmfree", help="model family (default mmfree)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files or folders of *.txt "
                   "(default: the bundled Shakespeare corpus)")
    p.add_argument("--out", required=True, help="output directory (model, tokenizer, checkpoints, metrics.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch per process")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay")
    p.add_argument("--warmup", type=int, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--eval-every", type=int, help="validate every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text from a trained model (streamed)",
                       description="Continue a prompt; greedy at temperature 0, sampling otherwise.")
    g.add_argument("--model", required=True, help="model directory written by `mulfree train`")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--engine", choices=("torch", "packed"), default="torch",
                   help="torch (reference) or packed (2-bit ternary runtime, MMfree only)")
    g.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="perplexity of a trained model on text",
                       description="Perplexity over windows of the given text (default: the bundled "
                       "corpus' validation plays).")
    e.add_argument("--model", required=True, help="a mulfree model dir, a `mulfree quantize` output dir, a Hugging "
                   "Face model dir or .gguf file, or 'smollm2'")
    e.add_argument("--data", nargs="+", metavar="PATH", help="text files or folders (default: validation split)")
    e.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    e.add_argument("--stride", type=int, default=None, help="window stride (default: the window)")
    e.add_argument("--max-tokens", type=int, default=65536, help="score at most this many tokens (0: all)")
    e.add_argument("--seed", type=int, default=0, help="unused by perplexity (deterministic); accepted for uniformity")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="train tiny MMfree and Transformer++ side by side, compare, sample",
                       description="Trains an MMfree LM and an equal-size Transformer++ on the bundled "
                       "Shakespeare with equal tokens, prints both validation perplexities, plots loss "
                       "curves and prints a sample.")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--steps", type=int, default=300, help="optimizer steps per model")
    d.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    d.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    d.add_argument("--hidden-size", type=int, default=256, help="model width (both models)")
    d.add_argument("--layers", type=int, default=4, help="layers (both models)")
    d.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    d.add_argument("--mmfree-lr", type=float, default=4e-3, help="peak LR of the ternary model")
    d.add_argument("--transformer-lr", type=float, default=1e-3, help="peak LR of Transformer++")
    d.add_argument("--eval-tokens", type=int, default=16384, help="validation tokens for the final perplexity")
    d.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")
    d.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------- train


def _model_classes(family: str):
    if family == "mmfree":
        from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM

        return MMFreeConfig, MMFreeForCausalLM
    from mulfree.models.transformer import TransformerConfig, TransformerForCausalLM

    return TransformerConfig, TransformerForCausalLM


def _family_of(model_type: str) -> str:
    return "mmfree" if model_type == "mmfree" else "transformer"


def _read_config_spec(spec: str) -> tuple[dict | None, dict]:
    """(model config dict or None for a preset, train settings) from --config."""
    if not spec.endswith(".json"):
        return None, {}
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"config file '{spec}' does not exist", "pass a preset name or an existing .json file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file '{spec}' is not valid JSON ({exc.msg})", "fix the file") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{spec}' must hold a JSON object", "see `mulfree train --help`")
    train_settings = data.pop("train", {})
    return data, train_settings


def _train_config(args, base: dict):
    from mulfree.train import TrainConfig

    settings = dict(base)
    for name in TRAIN_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if getattr(args, "bf16", False):
        settings["bf16"] = True
    settings["seed"] = args.seed
    if getattr(args, "no_progress", False):
        settings["progress"] = False
    return TrainConfig.from_dict(settings)


def cmd_train(args) -> int:
    import torch

    from mulfree.data.text import encode, load_corpus, load_tokenizer, train_tokenizer
    from mulfree.train import CHECKPOINT_POINTER, checkpoint_state, train

    out = Path(args.out)
    if not args.resume and (out / CHECKPOINT_POINTER).exists():
        raise CheckpointError(f"'{out}' already holds a training run",
                              "pass --resume to continue it or choose a new --out")
    if args.resume:
        state = checkpoint_state(out)
        model_dict = state.get("model_config")
        if model_dict is None:
            raise CheckpointError(f"checkpoint in '{out}' has no model config", "start a new run")
        cfg_cls, model_cls = _model_classes(_family_of(model_dict.get("model_type", "")))
        model_config = cfg_cls.from_dict(model_dict)
        saved = dict(state["train_config"])
        if args.steps is not None:
            saved["steps"] = args.steps
        saved["progress"] = not args.no_progress
        from mulfree.train import TrainConfig

        train_cfg = TrainConfig.from_dict(saved)
        tokenizer = load_tokenizer(out)
        saved_data = state.get("extra", {}).get("data")
        if args.data is None:
            args.data = saved_data
        elif saved_data is not None and [str(Path(p).resolve()) for p in args.data] != saved_data:
            raise DataError(f"--data differs from the data of the run in '{out}'", "leave --data out to reuse it")
    else:
        model_dict, train_settings = _read_config_spec(args.config)
        cfg_cls, model_cls = _model_classes(args.model)
        if model_dict is not None and model_dict.get("model_type", cfg_cls.model_type) != cfg_cls.model_type:
            raise ConfigError(f"config '{args.config}' is for model_type {model_dict['model_type']!r}",
                              f"pass --model {_family_of(model_dict['model_type'])} or another config")
        model_config = cfg_cls.from_dict(model_dict) if model_dict is not None else cfg_cls.from_preset(args.config)
        train_cfg = _train_config(args, train_settings)
        tokenizer = None
    corpus = load_corpus(args.data)
    if tokenizer is None:
        tokenizer = train_tokenizer(corpus.train_text, model_config.vocab_size)
        model_config = type(model_config).from_dict({**model_config.to_dict(),
                                                     "vocab_size": tokenizer.get_vocab_size()})
    train_ids, val_ids = encode(tokenizer, corpus.train_text), encode(tokenizer, corpus.val_text)
    if val_ids.numel() <= train_cfg.seq_len:
        val_ids = None
    torch.manual_seed(train_cfg.seed)
    model = model_cls(model_config)
    n_params = sum(p.numel() for p in model.parameters())
    main_process = os.environ.get("RANK", "0") == "0"
    if main_process:
        print(f"{model_config.model_type}: {n_params / 1e6:.2f}M parameters, "
              f"{train_ids.numel()} train tokens, validation: {', '.join(corpus.val_docs)}", file=sys.stderr)
    data = None if args.data is None else [str(Path(p).resolve()) for p in args.data]
    result = train(model, train_ids, val_ids, train_cfg, out, resume=args.resume, tokenizer=tokenizer,
                   extra={"data": data})
    if main_process:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


# ---------------------------------------------------------------- generate / eval


def _load(model_dir: str):
    from mulfree.models.io import load_model

    model, tokenizer = load_model(model_dir)
    if tokenizer is None:
        raise CheckpointError(f"model dir '{model_dir}' has no tokenizer.json", "train it with `mulfree train`")
    return model, tokenizer


def cmd_generate(args) -> int:
    from mulfree.data.text import encode
    from mulfree.generation import TextStreamer, check_lengths, context_limit, generate

    if args.temperature < 0:
        raise MulfreeError(f"--temperature must be >= 0, got {args.temperature}", "use 0 for greedy decoding")
    if args.top_k is not None and args.top_k < 0:
        raise MulfreeError(f"--top-k must be >= 0, got {args.top_k}", "use a positive k or leave it out")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise MulfreeError(f"--top-p must be in (0, 1], got {args.top_p}", "use e.g. 0.9")
    if args.max_new_tokens < 0:
        raise MulfreeError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}",
                           "pass 0 or a positive count")
    if args.engine == "packed":
        from mulfree.infer.engine import PackedModel

        runner = PackedModel.load(args.model)
        tokenizer, limit = runner.tokenizer, runner.config.get("max_position_embeddings")
        if tokenizer is None:
            raise CheckpointError(f"model dir '{args.model}' has no tokenizer.json", "pack a trained model")
    else:
        model, tokenizer = _load(args.model)
        limit = context_limit(model)
    ids = encode(tokenizer, args.prompt)
    check_lengths(limit, ids.numel(), args.max_new_tokens)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stream(args.prompt)
    streamer = TextStreamer(tokenizer, stream)
    if args.engine == "packed":
        runner.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, on_token=streamer)
    else:
        generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, seed=args.seed, callback=streamer)
    streamer.flush()
    stream("\n")
    return 0


def _load_for_eval(model_ref: str):
    """(model, encode) for our model dirs, quantized dirs, Hugging Face dirs/GGUF files and 'smollm2'."""
    import torch

    from mulfree.data.text import encode
    from mulfree.models.io import MODEL_CLASSES, read_config

    path = Path(model_ref)
    cfg = read_config(path) if path.is_dir() else {}
    if cfg.get("model_type") in MODEL_CLASSES:
        model, tokenizer = _load(model_ref)
        return model, lambda text: encode(tokenizer, text)
    if "quant_method" in cfg:
        from mulfree.quant.walker import load_quantized

        model, tokenizer = load_quantized(path)
    else:
        from mulfree.models.pretrained import load_hf_causal_lm

        model, tokenizer = load_hf_causal_lm(model_ref)
    if tokenizer is None:
        raise CheckpointError(f"'{model_ref}' has no tokenizer", "save the tokenizer with the model")
    return model, lambda text: torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def cmd_eval(args) -> int:
    from mulfree.data.text import load_corpus, load_text
    from mulfree.evaluate import perplexity

    if args.window < 2:
        raise MulfreeError(f"--window must be >= 2, got {args.window}", "use e.g. 256")
    if args.stride is not None and not 0 < args.stride <= args.window:
        raise MulfreeError(f"--stride must be in (0, window], got {args.stride}", "use e.g. half the window")
    if args.max_tokens < 0:
        raise MulfreeError(f"--max-tokens must be >= 0, got {args.max_tokens}", "use 0 for all tokens")
    text = load_text(args.data) if args.data else load_corpus().val_text
    model, encode_text = _load_for_eval(args.model)
    ids = encode_text(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if ids.numel() < 2:
        raise DataError("the evaluation text has fewer than 2 tokens", "pass more text")
    window = min(args.window, getattr(model.config, "max_position_embeddings", args.window))
    ppl = perplexity(model, ids, window, args.stride)
    print(json.dumps({"perplexity": round(ppl, 4), "tokens": ids.numel(), "window": window}))
    return 0


# ---------------------------------------------------------------- demo


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


def cmd_demo(args) -> int:
    import time

    import torch

    from mulfree.data.text import decode, encode, load_corpus, train_tokenizer
    from mulfree.evaluate import perplexity
    from mulfree.generation import generate
    from mulfree.train import TrainConfig, train

    for name in ("steps", "batch_size", "seq_len", "hidden_size", "layers", "vocab_size", "eval_tokens"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive", "pass a positive number")
    t_start = time.perf_counter()
    out = Path(args.out)
    corpus = load_corpus()
    tokenizer = train_tokenizer(corpus.train_text, args.vocab_size)
    train_ids, val_ids = encode(tokenizer, corpus.train_text), encode(tokenizer, corpus.val_text)
    eval_ids = val_ids[: args.eval_tokens]
    print(f"corpus: {len(corpus.train_docs)} training texts ({train_ids.numel()} tokens), validation "
          f"{', '.join(corpus.val_docs)} ({val_ids.numel()} tokens); BPE vocab {tokenizer.get_vocab_size()}")
    results, runs, models = {}, {}, {}
    for family, lr in (("mmfree", args.mmfree_lr), ("transformer", args.transformer_lr)):
        cfg_cls, model_cls = _model_classes(family)
        config = cfg_cls.from_preset("tiny", hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                                     vocab_size=tokenizer.get_vocab_size(), intermediate_size=None,
                                     **cfg_cls.preset_extras(args.hidden_size))
        torch.manual_seed(args.seed)
        model = model_cls(config)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr,
                          min_lr=lr / 10, warmup=max(1, args.steps // 10), eval_every=max(1, args.steps // 6),
                          eval_batches=4, save_every=0, seed=args.seed)
        print(f"training {config.model_type} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
              f"lr {lr:g}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens)")
        t0 = time.perf_counter()
        res = train(model, train_ids, val_ids, cfg, out / family, tokenizer=tokenizer, overwrite=True)
        wall = time.perf_counter() - t0
        ppl = perplexity(model, eval_ids, window=args.seq_len, progress=False)
        results[family] = {"params": sum(p.numel() for p in model.parameters()), "tokens": res["tokens"],
                           "val_ppl": ppl, "train_loss": res["loss"], "wall_s": wall}
        runs[config.model_type] = out / family
        models[family] = model
    png = out / "loss_curves.png"
    _plot_losses(runs, png)
    mm, tf = results["mmfree"], results["transformer"]
    print()
    print(f"{'':24}{'MMfree':>14}{'Transformer++':>16}")
    print(f"{'parameters':24}{mm['params']:>14,}{tf['params']:>16,}")
    print(f"{'training tokens':24}{mm['tokens']:>14,}{tf['tokens']:>16,}")
    print(f"{'final train loss':24}{mm['train_loss']:>14.3f}{tf['train_loss']:>16.3f}")
    print(f"{'validation perplexity':24}{mm['val_ppl']:>14.2f}{tf['val_ppl']:>16.2f}")
    print(f"{'training time (s)':24}{mm['wall_s']:>14.1f}{tf['wall_s']:>16.1f}")
    ratio = mm["val_ppl"] / tf["val_ppl"]
    print(f"MMfree / Transformer++ validation perplexity: {ratio:.3f} ({'within' if ratio <= 1.2 else 'outside'} 1.2x)")
    print(f"loss curves: {png}")
    prompt = "ROMEO.\n"
    ids = generate(models["mmfree"], encode(tokenizer, prompt), 80, temperature=0.8, top_k=40, seed=args.seed)
    print("\nMMfree sample (temperature 0.8, top-k 40):\n" + decode(tokenizer, ids[0]))
    summary = {"mmfree_val_ppl": round(mm["val_ppl"], 3), "transformer_val_ppl": round(tf["val_ppl"], 3),
               "ratio": round(ratio, 4), "params": [mm["params"], tf["params"]], "tokens": mm["tokens"],
               "wall_s": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(summary))
    return 0
