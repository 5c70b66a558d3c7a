"""OpenAI-compatible HTTP API (FastAPI on uvicorn) over the continuous batcher: `/v1/models[/{id}]`,
`/v1/completions`, `/v1/chat/completions`, `/v1/responses` (SSE streaming), `/health`, `/metrics`. Run it with
`mulfree serve`.

Every bad input is a 4xx OpenAI-style JSON error; bodies are size-checked while they arrive; a client that
goes away cancels its sequences before the next decode step; tokens cross from the batcher thread to the
event loop through `call_soon_threadsafe` (no thread per token)."""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mulfree.infer.batching import ContinuousBatcher
from mulfree.infer.jobs import Job, prompt_logprobs
from mulfree.infer.metrics import Metrics
from mulfree.infer.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    chat_logprobs,
    chat_prompt,
    completion_logprobs,
    describe_error,
    error_body,
    logprob_count,
    seed64,
)
from mulfree.infer.responses import Reply, ResponsesRequest

MAX_CHOICES = 64  # completions one request may ask for (prompts x n)
T = TypeVar("T")


def shown(value: str, limit: int = 100) -> str:
    """A client's value as an error message repeats it, cut to `limit` characters (a 100 KB path is not sent back)."""
    return value if len(value) <= limit else value[:limit] + "..."


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status)


async def read_json(request: Request, limit: int, timeout_s: float) -> Any:
    """The body as JSON, refusing one over `limit` bytes before reading it all (413), one that has not arrived
    within `timeout_s` (408), bad UTF-8 or JSON (400)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="body_timeout") from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected while sending the body", code="client_disconnected") from None
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError:  # Python's limit on integer digits (4300): a number no field could take anyway
        raise ApiError(400, "body has a number too long to read (over 4300 digits)") from None
    except RecursionError:
        raise ApiError(400, "body is nested too deeply to read") from None


class Server:
    """The app's state: batcher, tokenizer, limits and metrics."""

    def __init__(self, batcher: ContinuousBatcher, tokenizer: Any, model_name: str, context_limit: int | None = None,
                 max_prompt_tokens: int | None = None, max_body_bytes: int = 1 << 20,
                 request_timeout_s: float | None = 600.0, default_max_tokens: int = 256,
                 fixed_seed: int | None = None, max_new_tokens: int = 4096, chat_template: Any = None,
                 body_timeout_s: float = 10.0, api_key: str | None = None):
        self.batcher, self.tok, self.model_name = batcher, tokenizer, model_name
        self.context_limit, self.max_prompt_tokens = context_limit, max_prompt_tokens
        self.max_body_bytes, self.timeout_s, self.body_timeout_s = max_body_bytes, request_timeout_s, body_timeout_s
        self.default_max_tokens, self.fixed_seed = min(default_max_tokens, max_new_tokens), fixed_seed
        self.max_new_tokens = max_new_tokens
        self.chat_template = chat_template or chat_prompt  # messages -> prompt text
        self.created = int(time.time())
        self.vocab = tokenizer.get_vocab_size()
        self.metrics = Metrics(batcher)
        self.api_key = api_key  # None: no key asked for

    def authorize(self, request: Request) -> None:
        """401 unless the request carries 'Authorization: Bearer <the key>' (compared in constant time), when a key
        is set; before the body is read."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "no API key: send it as 'Authorization: Bearer KEY' (the OpenAI clients' api_key)",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode("latin-1"), self.api_key.encode("ascii")):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def seed(self, asked: int | None) -> int:
        """The first choice's sampling seed: the request's, else the server's fixed one, else a fresh random one."""
        seed = asked if asked is not None else self.fixed_seed
        return seed64(seed) if seed is not None else secrets.randbits(63)

    def token_text(self, token: int) -> str:
        """One token as text for logprobs; a partial UTF-8 sequence as its (unique) vocabulary entry."""
        text = self.tok.decode([token])
        return text if "\ufffd" not in text else self.tok.id_to_token(token) or text

    def check_model(self, body: Any) -> None:
        if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"] != self.model_name:
            raise ApiError(404, f"The model '{shown(body['model'])}' does not exist", param="model", code="model_not_found")

    async def encode(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids of each prompt (tokenized off the event loop), within the prompt-token limit."""
        texts = [p for p in prompts if isinstance(p, str)]
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # JSON can escape lone UTF-16 surrogates ("\\ud800"); no tokenizer takes them
                raise ApiError(400, f"the prompt is not valid Unicode (a lone surrogate, U+{ord(text[exc.start]):04X}, "
                               f"at character {exc.start})", param="prompt") from None
        encoded = iter(await run_in_threadpool(lambda: [e.ids for e in self.tok.encode_batch(texts)]) if texts else [])
        out = []
        for p in prompts:
            ids = next(encoded) if isinstance(p, str) else p
            if not ids:
                raise ApiError(400, "a prompt is empty", param="prompt")
            if any(i >= self.vocab for i in ids):
                raise ApiError(400, f"token ids must be below the vocabulary size {self.vocab}", param="prompt")
            if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
                raise ApiError(400, f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}",
                               param="prompt", code="context_length_exceeded")
            out.append(ids)
        return out

    def budget(self, asked: int | None, prompt_len: int, name: str = "max_tokens") -> int:
        """The token limit for one prompt: as asked in field `name` (it must fit the context) or the default clipped
        to fit."""
        room = None if self.context_limit is None else self.context_limit - prompt_len
        if asked is not None:
            if asked > self.max_new_tokens:
                raise ApiError(400, f"{name} ({asked}) is above this server's limit of {self.max_new_tokens}",
                               param=name)
            if room is not None and asked > room:
                raise ApiError(400, f"prompt ({prompt_len} tokens) + {name} ({asked}) exceeds the model's limit of "
                               f"{self.context_limit}", param=name, code="context_length_exceeded")
            return asked
        if room is not None and room <= 0:
            raise ApiError(400, f"the prompt ({prompt_len} tokens) fills the model's context of {self.context_limit}",
                           param="prompt", code="context_length_exceeded")
        return self.default_max_tokens if room is None else min(self.default_max_tokens, room)


async def read_request(srv: Server, request: Request, parse: Callable[[Any], T]) -> T:
    """`parse` of the request's JSON body (the model it names checked first); a body that fails validation, or a
    prompt the chat template refuses, is a 400 naming the problem."""
    raw = await read_json(request, srv.max_body_bytes, srv.body_timeout_s)
    srv.check_model(raw)
    try:
        return parse(raw)
    except ValidationError as exc:
        message, param = describe_error(exc)
        raise ApiError(400, message, param=param) from None
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


async def complete(srv: Server, request: Request, chat: bool) -> Response:
    def parse(raw: Any) -> tuple[CompletionRequest | ChatRequest, list]:
        body = (ChatRequest if chat else CompletionRequest).model_validate(raw)
        return body, [srv.chat_template(body.messages)] if chat else body.prompts()  # type: ignore[union-attr]

    body, prompts = await read_request(srv, request, parse)
    if len(prompts) * body.n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n={body.n} is more than {MAX_CHOICES} completions", param="n")
    ids = await srv.encode(prompts)
    asked, name = getattr(body, "max_completion_tokens", None), "max_completion_tokens"
    if asked is None:
        asked, name = body.max_tokens, "max_tokens"
    budgets = [srv.budget(asked, len(p), name) for p in ids]
    echo = getattr(body, "echo", False)
    top = logprob_count(body)
    scored = ([await run_in_threadpool(prompt_logprobs, srv.batcher.model, p, top) for p in ids]
              if echo and top is not None else None)
    job = Job(srv, ids, budgets, body.n, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
              seed=srv.seed(body.seed), stops=body.stops, logprobs=logprob_count(body),
              endpoint="chat" if chat else "completions")
    texts, reqs, total = job.texts, job.reqs, job.total
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    meta = {"id": rid, "created": int(time.time()), "model": srv.model_name}

    want_lp = logprob_count(body) is not None
    lp_sent = [0] * total  # tokens of each choice whose logprobs went out already
    lp_chars = [0] * total  # and the characters of their pieces (a completion's text_offset goes on from there)

    def logprobs(k: int) -> dict | None:
        """The logprobs of choice k's tokens not reported yet (up to where its text ends)."""
        if not want_lp:
            return None
        a, b = lp_sent[k], texts[k].used
        lp_sent[k] = b
        tokens, entries, piece = reqs[k].tokens[a:b], reqs[k].logprobs[a:b], srv.token_text
        if chat:
            return chat_logprobs(tokens, entries, piece)
        out = completion_logprobs(tokens, entries, piece, lp_chars[k])
        lp_chars[k] += sum(len(t) for t in out["tokens"])
        return out

    def choice(k: int, text: str, finish: str | None, delta: bool) -> dict:
        if not chat:
            return {"index": k, "text": text, "logprobs": logprobs(k), "finish_reason": finish}
        content = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
        return {"index": k, "delta" if delta else "message": content, "logprobs": logprobs(k), "finish_reason": finish}

    kind = "chat.completion" if chat else "text_completion"
    if not body.stream:
        await job.run_watched(request)
        choices = [choice(k, t.text, t.finish, False) for k, t in enumerate(texts)]
        if echo:
            _echo(srv, choices, prompts, ids, scored, job, body.n)
        return JSONResponse({**meta, "object": kind, "choices": choices, "usage": job.usage()})
    with_usage = body.stream_options is not None and body.stream_options.include_usage
    chunk_kind = kind + ".chunk" if chat else kind

    def frame(choices: list[dict], use: dict | None = None) -> str:
        payload = {**meta, "object": chunk_kind, "choices": choices}
        if with_usage:
            payload["usage"] = use
        return f"data: {json.dumps(payload)}\n\n"

    async def sse() -> AsyncIterator[str]:
        if chat:
            yield frame([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for k in range(total)])
        try:
            async for k, text, done in job.drive():
                if text:
                    yield frame([choice(k, text, None, True)])
                if done:
                    yield frame([choice(k, "", texts[k].finish, True)])
        except ApiError as exc:
            yield f"data: {json.dumps(error_body(str(exc), exc.kind, None, exc.code))}\n\n"
        if with_usage:
            yield f"data: {json.dumps({**meta, 'object': chunk_kind, 'choices': [], 'usage': job.usage()})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


def _echo(srv: Server, choices: list[dict], prompts: list, ids: list[list[int]], scored: list | None, job: Job,
          n: int) -> None:
    """`echo`: each completion choice's text and logprobs start with its prompt's (the prompt's scored by the model,
    its first token's None, as OpenAI's)."""
    for k, c in enumerate(choices):
        p, used = k // n, job.texts[k].used
        c["text"] = (prompts[p] if isinstance(prompts[p], str) else srv.tok.decode(prompts[p])) + c["text"]
        if scored is not None:
            c["logprobs"] = completion_logprobs(ids[p] + job.reqs[k].tokens[:used],
                                                scored[p] + job.reqs[k].logprobs[:used], srv.token_text)


async def respond(srv: Server, request: Request) -> Response:
    """`POST /v1/responses`: one text reply to a conversation (infer/responses.py), whole or as stream events."""
    def parse(raw: Any) -> tuple[ResponsesRequest, str]:
        body = ResponsesRequest.model_validate(raw)
        return body, srv.chat_template(body.messages())

    body, prompt = await read_request(srv, request, parse)
    ids = await srv.encode([prompt])
    want_lp = body.logprob_count()
    job = Job(srv, ids, [srv.budget(body.max_output_tokens, len(ids[0]), "max_output_tokens")], 1,
              temperature=body.temperature, top_k=None, top_p=body.top_p, seed=srv.seed(None), stops=[],
              logprobs=want_lp, endpoint="responses")
    reply, text, req = Reply(body, srv.model_name), job.texts[0], job.reqs[0]

    def status() -> str:
        return "completed" if text.finish == "stop" else "incomplete"  # else the token limit ended it

    def logprobs(start: int = 0) -> list | None:
        """The logprobs of the text's tokens from `start` (None when not asked for)."""
        if want_lp is None:
            return None
        return chat_logprobs(req.tokens[start:text.used], req.logprobs[start:text.used], srv.token_text)["content"]

    def usage() -> tuple[int, int, int]:
        return job.prompt_tokens, job.completion_tokens, job.cached_tokens

    if not body.stream:
        await job.run_watched(request)
        return JSONResponse(reply.response(status(), text.text, usage(), logprobs()))

    def frame(event: dict) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    async def sse() -> AsyncIterator[str]:
        for event in reply.opening():
            yield frame(event)
        sent = 0  # tokens whose logprobs went out already
        try:
            async for _, piece, _done in job.drive():
                if piece:
                    yield frame(reply.delta(piece, logprobs(sent)))
                    sent = text.used
        except ApiError as exc:
            yield frame(reply.event("error", code=exc.code or exc.kind, message=str(exc), param=None))
            return
        for event in reply.closing(text.text, status(), usage(), logprobs()):
            yield frame(event)

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


def build_app(srv: Server, allowed_origins: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app over `srv`; its shutdown closes the batcher. Browser pages from `allowed_origins` ("*": any)
    may call it (CORS); by default none, as a browser enforces for a server that says nothing."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(srv.batcher.close, 10.0)

    app = FastAPI(title="mulfree", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(srv.metrics.middleware)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "HEAD", "POST"],
                           allow_headers=["authorization", "content-type"], max_age=600)
    app.state.server = srv

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        response = error_response(exc.status, str(exc), exc.kind, exc.param, exc.code)
        if exc.status == 408:  # the rest of the body may still arrive: not a connection to keep
            response.headers["connection"] = "close"
        elif exc.status == 401:
            response.headers["www-authenticate"] = "Bearer"  # RFC 6750
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, f"{exc.detail}: {shown(request.method)} {shown(request.url.path)}",
                              code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    card = ModelCard(id=srv.model_name, created=srv.created)
    keyed = [Depends(srv.authorize)]  # the /v1 routes; /health and /metrics stay open to probes and scrapers

    @app.api_route("/v1/models", methods=["GET", "HEAD"], dependencies=keyed)
    async def models() -> dict:
        return ModelList(data=[card]).model_dump()

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"], dependencies=keyed)
    async def model(model_id: str) -> dict:
        if model_id != srv.model_name:
            raise ApiError(404, f"The model '{shown(model_id)}' does not exist", param="model", code="model_not_found")
        return card.model_dump()

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request) -> Response:
        return await complete(srv, request, chat=False)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: Request) -> Response:
        return await complete(srv, request, chat=True)

    @app.post("/v1/responses", dependencies=keyed)
    async def responses(request: Request) -> Response:
        return await respond(srv, request)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' and monitors' probes
    async def health() -> Response:
        if not srv.batcher.alive:
            why = f" ({type(srv.batcher.error).__name__}: {srv.batcher.error})" if srv.batcher.error else ""
            return error_response(503, "the decode loop is not running" + why, "server_error")
        return JSONResponse({"status": "ok", "live": srv.batcher.live, "queued": srv.batcher.queue_depth})

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics() -> Response:
        return srv.metrics.response()

    return app
