"""`mulfree serve`: an OpenAI-compatible completion server with continuous batching."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from mulfree.commands.flags import MODEL_HELP, add_flags, from_args
from mulfree.errors import ConfigError

MAX_BATCH = 1024  # sequences decoded together: each holds a state and a sampling generator
# Memory of a KV model's decode steps over its caches' size (docs/integration.md): a padded batch holds the caches,
# their padded copy, the grown copy and attention's temporaries; rows' own caches (`rows_kv`) are at most copied once
# into a buffer with room, whose unwritten part takes no memory.
KV_PEAK = {"padded": 3.5, "rows": 2.0}
API_KEY_ENV = "MULFREE_API_KEY"


@dataclass
class ServeConfig:
    """Where `mulfree serve` listens and how many sequences it decodes together."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback only by default)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    max_batch: int = field(default=8, metadata={"help": "most sequences decoded together"})
    engine: Literal["auto", "packed", "torch"] = field(default="auto", metadata={
        "help": "auto: the packed engine for MMfree dirs (packed, or packed in memory), torch otherwise"})
    threads: int = field(default=0, metadata={"help": "packed engine threads (0: the engine's default)",
                                              "min": 0, "max": 1024})
    seed: int | None = field(default=None, metadata={
        "help": "fixed sampling seed for requests that give none (default: a fresh random seed per request)"})
    max_queue: int = field(default=256, metadata={"help": "most requests waiting for a batch slot (more: 429)",
                                                  "min": 1, "max": 1 << 20})
    prefill_chunk: int = field(default=128, metadata={
        "help": "prompt tokens fed per step beside the decode tokens (a long prompt never stalls running streams)",
        "min": 1,
        "max": 1 << 20})
    prefix_cache_mb: int = field(default=256, metadata={
        "help": "MiB kept for prompts that start alike (a chat's next turn, a shared system prompt: their prefill "
                "is skipped): recurrent states at block ends, or KV blocks; 0: off", "min": 0, "max": 1 << 20})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body accepted (more: 413)",
                                                           "min": 1024, "max": 1 << 30})
    max_prompt_tokens: int = field(default=8192, metadata={
        "help": "longest prompt in tokens (and never past the model's context)", "min": 1, "max": 1 << 24})
    max_tokens: int = field(default=256, metadata={"help": "max_tokens of requests that give none (clipped to the "
                                                           "context)", "min": 1, "max": 1 << 20})
    max_tokens_limit: int = field(default=4096, metadata={"help": "largest max_tokens a request may ask for",
                                                          "min": 1, "max": 1 << 24})
    request_timeout: float = field(default=600.0, metadata={"help": "seconds a request may take, queue included",
                                                            "gt": 0, "max": 86400})
    limit_concurrency: int = field(default=16384, metadata={
        "help": "most open HTTP connections, idle ones included (more: 503; clipped to the open-files limit)",
        "min": 1, "max": 1 << 20})
    header_timeout: float = field(default=10.0, metadata={
        "help": "seconds a connection has to send a request head (after opening or a response) before it is "
                "closed, and a request its body (408)", "gt": 0, "max": 3600})
    keep_alive: float = field(default=5.0, metadata={"help": "seconds an idle keep-alive connection stays open",
                                                     "gt": 0, "max": 3600})
    shutdown_timeout: float = field(default=30.0, metadata={
        "help": "seconds SIGTERM waits for running requests before it ends them (503)", "min": 0, "max": 3600})
    served_model_name: str | None = field(default=None, metadata={
        "help": "the model's name in the API, which requests must give (default: the --model dir's name)"})
    allowed_origins: tuple[str, ...] = field(default=(), metadata={
        "help": "web origins whose pages may call the API from a browser (CORS), e.g. https://chat.example.com, or "
                "'*' for any (default: none)", "nargs": "*"})
    log_level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata={
        "help": "the server's log level (warning: no line per request)"})
    access_log: bool = field(default=True, metadata={"help": "no line per request in the log (errors still are)"})
    api_key: str | None = field(default=None, metadata={
        "help": f"require 'Authorization: Bearer KEY' on the /v1 routes (401 otherwise; default: ${API_KEY_ENV} if "
                "set, which keeps the key out of the process list; /health and /metrics stay open)"})

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= MAX_BATCH or not 0 < self.port < 65536:
            raise ConfigError(f"--max-batch must be in 1..{MAX_BATCH} and --port in 1..65535", "fix the arguments")
        if self.seed is not None and not 0 <= self.seed < 1 << 63:
            raise ConfigError(f"--seed {self.seed} is out of range", "use 0..2^63-1")
        if not valid_host(self.host):
            raise ConfigError(f"--host {self.host!r} is not an IP address or host name", "e.g. --host 127.0.0.1")
        if self.api_key is not None:
            check_api_key(self.api_key, "--api-key")
        if self.served_model_name is not None:
            check_sendable(self.served_model_name, f"--served-model-name {self.served_model_name[:100]!a}", 256,
                           "e.g. --served-model-name mmfree-1.3b")
        for origin in self.allowed_origins:
            if origin != "*" and not valid_origin(origin):
                raise ConfigError(f"--allowed-origins {origin!r} is not a web origin", "give scheme://host[:port] "
                                  "without a path, e.g. https://chat.example.com, or '*'")


def valid_origin(origin: str) -> bool:
    """scheme://host[:port], as a browser sends it in an Origin header."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(origin)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and port_ok and not parts.path
            and not parts.query and not parts.fragment and not parts.username and origin == origin.strip())


def check_sendable(value: str, source: str, limit: int, hint: str) -> None:
    """A value a client sends back as is (a header, a JSON string): 1 to `limit` visible ASCII characters; the
    ConfigError names the first character that is not one."""
    if not re.fullmatch(rf"[\x21-\x7e]{{1,{limit}}}", value):
        bad = re.search(r"[^\x21-\x7e]", value)
        got = f"{bad.group()!a} at character {bad.start() + 1}" if bad else f"{len(value)} characters"
        raise ConfigError(f"{source} must be 1 to {limit} visible ASCII characters (no spaces), got {got}", hint)


def check_api_key(key: str, source: str) -> None:
    """A key a client can send in a header as is."""
    check_sendable(key, source, 1024, "e.g. a key from `python -c 'import secrets; print(secrets.token_urlsafe())'`")


def api_key(cfg: ServeConfig, environ: Mapping[str, str]) -> str | None:
    """The key clients must send: --api-key, else $MULFREE_API_KEY (set but empty is an error, not 'no key')."""
    if cfg.api_key is not None or API_KEY_ENV not in environ:
        return cfg.api_key
    check_api_key(environ[API_KEY_ENV], f"${API_KEY_ENV}")
    return environ[API_KEY_ENV]


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface only."""
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.rstrip(".").lower() == "localhost"


def valid_host(host: str) -> bool:
    """An IPv4/IPv6 address or a DNS host name (RFC 1123 labels)."""
    import ipaddress

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
        description="Serves /v1/models, /v1/completions, /v1/chat/completions and /v1/responses (streaming with "
        "\"stream\": true), "
        "/health and /metrics (Prometheus). MMfree models decode all live requests in one batched step "
        "(continuous batching).",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    add_flags(p, ServeConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import os
    import signal
    import sys
    from pathlib import Path

    from mulfree.errors import MulfreeError
    from mulfree.infer.batching import ContinuousBatcher
    from mulfree.infer.prefix_cache import PrefixCache
    from mulfree.infer.protocol import load_chat_template
    from mulfree.infer.server import Server, build_app
    from mulfree.infer.transport import guarded_protocol, raise_fd_limit, serve_draining
    from mulfree.models.schema import check_memory

    cfg = from_args(ServeConfig, args)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise MulfreeError(f"{exc.name} is not installed", "pip install 'mulfree[serve]'") from exc
    key = api_key(cfg, os.environ)
    check_bind(cfg.host, cfg.port)
    check_memory(cfg.prefix_cache_mb << 20, f"--prefix-cache-mb {cfg.prefix_cache_mb}", "the prefix cache at its "
                 "fullest", "give it less (256 holds ~1,300 states of the 1.3B shape), or 0 for no cache")
    if key is None and not is_loopback(cfg.host):
        print(f"warning: serving on {cfg.host} without an API key: anyone who reaches port {cfg.port} can use the "
              f"model (set ${API_KEY_ENV} or --api-key)", file=sys.stderr)
    step_model, loaded, token_bytes = _load(args.model, cfg)
    if not step_model.recurrent:
        longest = cfg.max_prompt_tokens + cfg.max_tokens_limit
        longest = min(longest, loaded.context_limit) if loaded.context_limit else longest
        peak = KV_PEAK["rows" if getattr(loaded.model, "rows_kv", False) else "padded"]
        check_memory(int(peak * cfg.max_batch * longest * token_bytes) + (cfg.prefix_cache_mb << 20),
                     f"--max-batch {cfg.max_batch}", f"a decode step over the key/value caches of {cfg.max_batch} "
                     f"sequences of {longest} tokens ({token_bytes / 1024:.0f} KiB a token), beside the prefix cache,",
                     "lower --max-batch, --max-prompt-tokens, --max-tokens-limit or --prefix-cache-mb")
    cache = (PrefixCache(cfg.prefix_cache_mb << 20, step_model.copy_state,
                         join=None if step_model.recurrent else step_model.join_states)
             if cfg.prefix_cache_mb else None)
    batcher = ContinuousBatcher(step_model, max_batch=cfg.max_batch, eos_token_id=loaded.eos_token_id,
                                max_queue=cfg.max_queue, prefill_chunk=cfg.prefill_chunk, prefix_cache=cache)
    srv = Server(batcher, loaded.tokenizer, cfg.served_model_name or Path(args.model).name,
                 context_limit=loaded.context_limit,
                 max_prompt_tokens=cfg.max_prompt_tokens, max_body_bytes=cfg.max_body_bytes,
                 request_timeout_s=cfg.request_timeout, default_max_tokens=cfg.max_tokens, fixed_seed=cfg.seed,
                 max_new_tokens=cfg.max_tokens_limit, chat_template=load_chat_template(loaded.files_dir),
                 body_timeout_s=cfg.header_timeout, api_key=key)
    files = raise_fd_limit()
    # uvicorn drains on SIGTERM, then re-raises it: exit 0 rather than die of the signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config = uvicorn.Config(
        build_app(srv, cfg.allowed_origins), host=cfg.host, port=cfg.port, log_level=cfg.log_level,
        access_log=cfg.access_log, timeout_keep_alive=cfg.keep_alive,
        limit_concurrency=min(cfg.limit_concurrency, files - 64) if files > 128 else cfg.limit_concurrency,
        h11_max_incomplete_event_size=64 * 1024, http=guarded_protocol(cfg.header_timeout))
    serve_draining(config, lambda: batcher.close(10.0), cfg.shutdown_timeout)
    return 0


def _load(model_ref: str, cfg: ServeConfig):
    """(step model, `Resolved`, bytes of one token's state) for any model reference, on the engine `cfg.engine`
    picks for it."""
    from mulfree.infer.batching import PackedStepModel, TorchStepModel
    from mulfree.infer.prefix_cache import state_bytes
    from mulfree.models.resolve import resolve

    loaded = resolve(model_ref, cfg.engine, threads=cfg.threads)
    step = (PackedStepModel if loaded.packed else TorchStepModel)(loaded.model)
    # One one-token step before the port opens, so that the first request does not pay the model's lazy set-up
    # (the dense weights of quantized layers, kernel layouts, thread pools: 5 s for a 3-bit ShiftAdd SmolLM2).
    _, (state,) = step.step([[0]], [step.new_state()])
    return step, loaded, state_bytes(state)
