"""`mulfree serve`: an OpenAI-compatible completion server with continuous batching."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from mulfree.commands.flags import add_flags, from_args
from mulfree.errors import ConfigError


@dataclass
class ServeConfig:
    """Where `mulfree serve` listens and how many sequences it decodes together."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback only by default)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    max_batch: int = field(default=8, metadata={"help": "most sequences decoded together"})
    seed: int = field(default=0, metadata={"help": "default sampling seed for requests that give none"})

    def __post_init__(self) -> None:
        if self.max_batch < 1 or not 0 < self.port < 65536:
            raise ConfigError("--max-batch must be >= 1 and --port in 1..65535", "fix the arguments")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serves /v1/models, /v1/completions and /v1/chat/completions (streaming with \"stream\": true). "
        "MMfree models decode all live requests in one batched step (continuous batching).",
    )
    p.add_argument("--model", required=True, help="model dir written by `mulfree train`")
    add_flags(p, ServeConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mulfree.errors import CheckpointError, MulfreeError
    from mulfree.infer.batching import ContinuousBatcher, TorchStepModel
    from mulfree.infer.server import App
    from mulfree.models.io import load_model

    cfg = from_args(ServeConfig, args)
    try:
        import uvicorn
    except ImportError as exc:
        raise MulfreeError("uvicorn is not installed", "pip install 'mulfree[serve]'") from exc
    model, tok = load_model(args.model)
    if tok is None:
        raise CheckpointError(f"{args.model} has no tokenizer.json", "serve a dir written by `mulfree train`")
    eos = tok.token_to_id("<|endoftext|>")
    batcher = ContinuousBatcher(TorchStepModel(model), max_batch=cfg.max_batch, eos_token_id=eos)
    app = App(batcher, tok, Path(args.model).name, model.config.max_position_embeddings, default_seed=cfg.seed)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    return 0
