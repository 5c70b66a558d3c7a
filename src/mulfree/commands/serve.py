"""`mulfree serve`: an OpenAI-compatible completion server with continuous batching."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serves /v1/models, /v1/completions and /v1/chat/completions (streaming with \"stream\": true). "
        "MMfree models decode all live requests in one batched step (continuous batching).",
    )
    p.add_argument("--model", required=True, help="model dir written by `mulfree train`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="most sequences decoded together")
    p.add_argument("--seed", type=int, default=0, help="default sampling seed for requests that give none")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mulfree.errors import CheckpointError, MulfreeError
    from mulfree.infer.batching import ContinuousBatcher, TorchStepModel
    from mulfree.infer.server import App
    from mulfree.models.io import load_model

    if args.max_batch < 1 or not 0 < args.port < 65536:
        raise MulfreeError("--max-batch must be >= 1 and --port in 1..65535", "fix the arguments")
    try:
        import uvicorn
    except ImportError as exc:
        raise MulfreeError("uvicorn is not installed", "pip install 'mulfree[serve]'") from exc
    model, tok = load_model(args.model)
    if tok is None:
        raise CheckpointError(f"{args.model} has no tokenizer.json", "serve a dir written by `mulfree train`")
    eos = tok.token_to_id("<|endoftext|>")
    batcher = ContinuousBatcher(TorchStepModel(model), max_batch=args.max_batch, eos_token_id=eos)
    app = App(batcher, tok, Path(args.model).name, model.config.max_position_embeddings, default_seed=args.seed)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
