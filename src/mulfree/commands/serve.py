"""`mulfree serve`: an OpenAI-compatible completion server with continuous batching."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from mulfree.commands.flags import add_flags, from_args
from mulfree.errors import ConfigError

MAX_BATCH = 1024  # sequences decoded together: each holds a state and a sampling generator


@dataclass
class ServeConfig:
    """Where `mulfree serve` listens and how many sequences it decodes together."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback only by default)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    max_batch: int = field(default=8, metadata={"help": "most sequences decoded together"})
    seed: int = field(default=0, metadata={"help": "default sampling seed for requests that give none"})

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= MAX_BATCH or not 0 < self.port < 65536:
            raise ConfigError(f"--max-batch must be in 1..{MAX_BATCH} and --port in 1..65535", "fix the arguments")
        if not 0 <= self.seed < 1 << 63:
            raise ConfigError(f"--seed {self.seed} is out of range", "use 0..2^63-1")
        if not valid_host(self.host):
            raise ConfigError(f"--host {self.host!r} is not an IP address or host name", "e.g. --host 127.0.0.1")


def valid_host(host: str) -> bool:
    """An IPv4/IPv6 address or a DNS host name (RFC 1123 labels)."""
    import ipaddress
    import re

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return 0 < len(host) <= 253 and all(re.fullmatch(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", label) for label in labels)


def check_bind(host: str, port: int) -> None:
    """The address resolves and the port can be bound now (in use, privileged or unknown: one line)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r} does not resolve ({exc})", "e.g. --host 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                              "choose another --port or --host") from None


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
    from mulfree.generation import context_limit
    from mulfree.infer.batching import ContinuousBatcher, TorchStepModel
    from mulfree.infer.server import App
    from mulfree.models.io import load_model

    cfg = from_args(ServeConfig, args)
    try:
        import uvicorn
    except ImportError as exc:
        raise MulfreeError("uvicorn is not installed", "pip install 'mulfree[serve]'") from exc
    check_bind(cfg.host, cfg.port)
    model, tok = load_model(args.model)
    if tok is None:
        raise CheckpointError(f"{args.model} has no tokenizer.json", "serve a dir written by `mulfree train`")
    eos = tok.token_to_id("<|endoftext|>")
    batcher = ContinuousBatcher(TorchStepModel(model), max_batch=cfg.max_batch, eos_token_id=eos)
    app = App(batcher, tok, Path(args.model).name, context_limit(model), default_seed=cfg.seed)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    return 0
