"""`mulfree train`, `generate` and `eval`: thin handlers over `mulfree.train`, `mulfree.generation`
and `mulfree.evaluate`, with flags made from `mulfree.settings`. Heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mulfree.atomic import dumps_strict
from mulfree.commands.flags import MODEL_HELP, add_flags, from_args
from mulfree.errors import CheckpointError, ConfigError, DataError

MAX_PROMPT_BYTES = 16 << 20  # --prompt-file: a bound on what is read (a device or a huge file is refused)


def register(sub: argparse._SubParsersAction) -> None:
    from mulfree.models import registry
    from mulfree.settings import GenerationConfig, PerplexityConfig, TokenizeConfig, TrainConfig

    p = sub.add_parser("train", help="train an MMfree or Transformer++ LM on text",
                       description="Train a language model (tokenizer trained on the data and saved with it).")
    p.add_argument("--config", default="tiny", help="preset (tiny, small, 370m, 1.3b, 2.7b) or a config .json; "
                   "a JSON may hold a \"train\" object with run settings")
    p.add_argument("--model", type=registry.canonical, choices=registry.NAMES, default="mmfree",
                   help="model family (default mmfree)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files or folders of *.txt "
                   "(default: the bundled Shakespeare corpus)")
    p.add_argument("--shards", metavar="DIR", help="train on the token shards of `mulfree tokenize` (streamed "
                   "from disk; their tokenizer; no validation split) instead of --data")
    p.add_argument("--out", required=True, help="output directory (model, tokenizer, checkpoints, metrics.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly (same data; "
                   "only --steps may change)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (the old contents stay "
                   "until the new run is complete)")
    add_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    t = sub.add_parser("tokenize", help="tokenize a corpus into memory-mapped token shards for training",
                       description="Tokenize text files, JSON Lines (\"text\" field) and `datasets` dirs into "
                       "flat token shards (`mulfree train --shards`); resumes an interrupted run of the same command.")
    t.add_argument("--data", nargs="+", metavar="PATH", required=True,
                   help="text / .jsonl files, folders of them, or `datasets.save_to_disk` dirs")
    t.add_argument("--out", required=True, help="output directory of the shards")
    t.add_argument("--tokenizer", metavar="DIR", help="a dir with tokenizer.json (e.g. a trained model); default: "
                   "train a BPE of --vocab-size on the data")
    t.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    add_flags(t, TokenizeConfig)
    t.set_defaults(func=cmd_tokenize)

    g = sub.add_parser("generate", help="generate text from a trained model (streamed)",
                       description="Continue a prompt; greedy at temperature 0, sampling otherwise.")
    g.add_argument("--model", required=True, help=MODEL_HELP)
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text to continue")
    source.add_argument("--prompt-file", metavar="PATH", help="continue the UTF-8 text of this file ('-': standard "
                        f"input; at most {MAX_PROMPT_BYTES >> 20} MiB)")
    g.add_argument("--engine", choices=("auto", "torch", "packed"), default="auto",
                   help="auto: the packed 2-bit engine for MMfree and packed dirs, torch otherwise")
    add_flags(g, GenerationConfig)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="perplexity of a trained model on text",
                       description="Perplexity over windows of the given text (default: the bundled "
                       "corpus' validation plays).")
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--data", nargs="+", metavar="PATH", help="text files or folders (default: validation split)")
    add_flags(e, PerplexityConfig)
    e.set_defaults(func=cmd_eval)


# ---------------------------------------------------------------- train


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
    if not isinstance(train_settings, dict):
        raise ConfigError(f"config file '{spec}': \"train\" must be a JSON object of run settings",
                          "write it as \"train\": {\"steps\": 100, ...}")
    return data, train_settings


def _data_files(paths: list[str] | None) -> dict[str, str]:
    """Content fingerprint of the training text: resolved path -> xxh3 digest of every file read."""
    from mulfree.data.text import bundled_text_files, expand_paths
    from mulfree.integrity import digest_file

    files = bundled_text_files() if paths is None else expand_paths(paths)
    return {str(f.resolve()): digest_file(f) for f in files}


def _check_same_data(out: Path, saved: dict, current: dict[str, str]) -> None:
    """DataError naming the first file that was added, removed or changed since the run started."""
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) != current.get(name):
            how = "is new" if name not in saved else "is gone" if name not in current else "changed"
            raise DataError(f"data file '{name}' {how} since the run in '{out}' started",
                            "resume with the data the run started with, or start a new run")


def _resumed_run(args, out: Path):
    """(model config, train config, tokenizer, data fingerprint) of the run saved in `out`; only
    --steps (and how the run executes: --device, --threads, --fsdp, --no-progress) may differ from the saved
    settings."""
    from mulfree.data.text import load_tokenizer
    from mulfree.models import registry
    from mulfree.train import TrainConfig, checkpoint_state

    state = checkpoint_state(out)
    model_dict = state.get("model_config")
    family = registry.find(model_dict or {})
    if family is None:
        raise CheckpointError(f"checkpoint in '{out}' has no model config", "start a new run")
    saved = TrainConfig.from_dict(dict(state["train_config"])).to_dict()
    given = from_args(TrainConfig, args, base=saved).to_dict()
    free = ("steps", "device", "threads", "fsdp", "progress")
    changed = [k for k in saved if k not in free and given[k] != saved[k]]
    if changed:
        name = changed[0]
        raise ConfigError(f"--{name.replace('_', '-')} {given[name]} differs from the resumed run's {saved[name]}",
                          "leave it out: a resumed run keeps its settings (only --steps may change)")
    saved.update({k: given[k] for k in free if k != "progress"}, progress=args.progress is not False)
    extra = state.get("extra", {})
    if extra.get("shards") is not None or args.shards is not None:
        _check_same_shards(args, out, extra)
        files = None
    else:
        saved_data = extra.get("data")
        if args.data is None:
            args.data = saved_data
        elif saved_data is not None and [str(Path(p).resolve()) for p in args.data] != saved_data:
            raise DataError(f"--data differs from the data of the run in '{out}'", "leave --data out to reuse it")
        files = _data_files(args.data)
        if isinstance(extra.get("data_files"), dict):
            _check_same_data(out, extra["data_files"], files)
    return family.config_cls.from_dict(model_dict), TrainConfig.from_dict(saved), load_tokenizer(out), files


def _check_same_shards(args, out: Path, extra: dict) -> None:
    """A resumed --shards run reads the same shard dir, unchanged (its index digest); sets args.shards."""
    from mulfree.integrity import digest_file

    saved = extra.get("shards")
    if saved is None or args.data is not None:
        raise DataError(f"the run in '{out}' was not trained on --shards" if saved is None else
                        f"the run in '{out}' was trained on --shards", "resume with the data the run started with")
    if args.shards is None:
        args.shards = saved
    elif str(Path(args.shards).resolve()) != saved:
        raise DataError(f"--shards differs from the shards of the run in '{out}'", "leave --shards out to reuse them")
    index = Path(saved) / "index.json"
    if not index.is_file() or digest_file(index) != extra.get("shard_index"):
        raise DataError(f"the shards in '{saved}' changed since the run in '{out}' started",
                        "resume with the shards the run started with, or start a new run")


def _new_run(args):
    """(model config, train config) from --config, --model and the train flags."""
    from mulfree.models import registry
    from mulfree.train import TrainConfig

    model_dict, train_settings = _read_config_spec(args.config)
    family = registry.get(args.model)
    if model_dict is None:
        return family.config_cls.from_preset(args.config), from_args(TrainConfig, args, base=train_settings)
    model_type = model_dict.pop("model_type", family.name)
    found = registry.find({"model_type": model_type})
    if found is not family:
        raise ConfigError(f"config '{args.config}' is for model_type {model_type!r}",
                          f"pass --model {found.name}" if found else f"use a config for {' or '.join(registry.NAMES)}")
    return family.config_cls.from_dict(model_dict), from_args(TrainConfig, args, base=train_settings)


def cmd_train(args) -> int:
    from mulfree.data.text import encode, load_corpus, train_tokenizer
    from mulfree.settings import check_device
    from mulfree.train import check_run_dir

    out = Path(args.out)
    check_run_dir(out, args.resume, args.overwrite)  # before the corpus and tokenizer work
    if args.shards is not None and args.data is not None:
        raise ConfigError("pass --data or --shards, not both", "tokenized shards carry their own text")
    if args.resume:
        model_config, train_cfg, tokenizer, files = _resumed_run(args, out)
    else:
        (model_config, train_cfg), tokenizer = _new_run(args), None
        files = _data_files(args.data) if args.shards is None else None
    check_device(train_cfg.device)
    if args.shards is not None:
        return _train_on_shards(args, out, model_config, train_cfg, tokenizer)
    corpus = load_corpus(args.data)
    if tokenizer is None:
        tokenizer = train_tokenizer(corpus.train_text, model_config.vocab_size)
        model_config = type(model_config).from_dict({**model_config.to_dict(),
                                                     "vocab_size": tokenizer.get_vocab_size()})
    train_ids, val_ids = encode(tokenizer, corpus.train_text), encode(tokenizer, corpus.val_text)
    if val_ids.numel() <= train_cfg.seq_len:
        val_ids = None
    data = None if args.data is None else [str(Path(p).resolve()) for p in args.data]
    return _build_and_train(args, out, model_config, train_cfg, tokenizer,
                            f"{train_ids.numel()} train tokens, validation: {', '.join(corpus.val_docs)}",
                            train_ids=train_ids, val_ids=val_ids, extra={"data": data, "data_files": files})


def _build_and_train(args, out: Path, model_config, train_cfg, tokenizer, data_line: str, train_ids=None,
                     val_ids=None, **train_kwargs) -> int:
    """Build the model from `model_config` (seeded), report its size and `data_line`, train, print the result."""
    import torch

    from mulfree.models import registry
    from mulfree.train import train

    torch.manual_seed(train_cfg.seed)
    model = registry.get(model_config.model_type).model_cls(model_config)
    main_process = os.environ.get("RANK", "0") == "0"
    if main_process:
        print(f"{model_config.model_type}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{data_line}", file=sys.stderr)
    result = train(model, train_ids, val_ids, train_cfg, out, resume=args.resume, tokenizer=tokenizer,
                   overwrite=args.overwrite, **train_kwargs)
    if main_process:
        print(dumps_strict({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


def cmd_tokenize(args) -> int:
    from mulfree.data.shards import PIECE_BYTES, sources, tokenize_corpus, units
    from mulfree.data.text import load_tokenizer, train_tokenizer
    from mulfree.settings import TokenizeConfig

    cfg = from_args(TokenizeConfig, args)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:  # a BPE trained on the first 8 MiB of the sources
        sample, size = [], 0
        for unit in units(sources(args.data)):
            sample.append(unit.text)
            size += unit.size
            if size >= 8 * PIECE_BYTES:
                break
        tokenizer = train_tokenizer("".join(sample), cfg.vocab_size)
    index = tokenize_corpus(args.data, tokenizer, args.out, cfg.shard_tokens, args.overwrite, cfg.progress)
    print(dumps_strict({"tokens": index["tokens"], "shards": len(index["shards"]), "dtype": index["dtype"],
                        "vocab_size": index["vocab_size"], "out": args.out}))
    return 0


def _train_on_shards(args, out: Path, model_config, train_cfg, tokenizer) -> int:
    """`mulfree train --shards DIR`: windows streamed from the memory-mapped shards (`data.shards`)."""
    from mulfree.data.shards import ShardWindows
    from mulfree.data.text import load_tokenizer
    from mulfree.integrity import digest_file

    shards = Path(args.shards).resolve()
    batch_fn = ShardWindows(shards, train_cfg.batch_size, train_cfg.seq_len)  # reads and checks the index once
    index = batch_fn.index
    if tokenizer is None:
        tokenizer = load_tokenizer(shards)
        model_config = type(model_config).from_dict({**model_config.to_dict(), "vocab_size": index["vocab_size"]})
    return _build_and_train(args, out, model_config, train_cfg, tokenizer,
                            f"{index['tokens']} tokens in {len(index['shards'])} shards", batch_fn=batch_fn,
                            extra={"shards": str(shards), "shard_index": digest_file(shards / "index.json")})


# ---------------------------------------------------------------- generate / eval


def _read_prompt(path: str) -> str:
    """The text of --prompt-file `path` ('-': standard input), at most MAX_PROMPT_BYTES of UTF-8."""
    from mulfree.data.text import decode_utf8

    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_PROMPT_BYTES + 1)
    except OSError as exc:
        raise DataError(f"cannot read --prompt-file '{path}' ({exc.strerror or exc})",
                        "pass a readable text file") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise DataError(f"--prompt-file '{path}' holds more than {MAX_PROMPT_BYTES >> 20} MiB", "pass a shorter prompt")
    return decode_utf8(data, Path("<stdin>" if path == "-" else path))


def cmd_generate(args) -> int:
    from mulfree.generation import TextStreamer, check_lengths, generate
    from mulfree.models.resolve import resolve
    from mulfree.settings import GenerationConfig

    cfg = from_args(GenerationConfig, args)
    prompt = args.prompt if args.prompt_file is None else _read_prompt(args.prompt_file)
    loaded = resolve(args.model, args.engine)
    ids = loaded.encode(prompt)
    check_lengths(loaded.context_limit, ids.numel(), cfg.max_new_tokens)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stream(prompt)
    streamer = TextStreamer(loaded.tokenizer, stream)
    sampling = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed}
    if loaded.packed:
        loaded.model.generate(ids, cfg.max_new_tokens, on_token=streamer, **sampling)
    else:
        generate(loaded.model, ids, cfg.max_new_tokens, callback=streamer, **sampling)
    streamer.flush()
    stream("\n")
    return 0


def cmd_eval(args) -> int:
    from mulfree.data.text import load_corpus, load_text
    from mulfree.evaluate import perplexity
    from mulfree.models.resolve import resolve
    from mulfree.settings import PerplexityConfig

    cfg = from_args(PerplexityConfig, args)
    text = load_text(args.data) if args.data else load_corpus().val_text
    loaded = resolve(args.model, engine="torch", scoring=True)  # whole windows: the torch interface
    model, ids = loaded.model, loaded.encode(text, limit=cfg.max_tokens or None)
    if ids.numel() < 2:
        raise DataError("the evaluation text has fewer than 2 tokens", "pass more text")
    window = min(cfg.window, getattr(model.config, "max_position_embeddings", cfg.window))
    ppl = perplexity(model, ids, window, cfg.stride)
    print(dumps_strict({"perplexity": round(ppl, 4), "tokens": ids.numel(), "window": window}))
    return 0
