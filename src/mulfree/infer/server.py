"""OpenAI-compatible HTTP API (ASGI) over the continuous batcher: `/v1/models`, `/v1/completions`,
`/v1/chat/completions`, with server-sent-event streaming. Run it with `mulfree serve` (uvicorn)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from mulfree.infer.batching import ContinuousBatcher, SamplingParams


class BadRequest(ValueError):
    """A request the API rejects with HTTP 400 and an OpenAI-style error body."""


def chat_prompt(messages: list[dict[str, Any]]) -> str:
    """Plain-text chat template for models trained without one: 'role: content' lines, then 'assistant:'."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    lines = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadRequest("each message needs a string 'content'")
        lines.append(f"{m.get('role', 'user')}: {m['content']}")
    return "\n".join(lines) + "\nassistant:"


def _params(body: dict[str, Any]) -> tuple[SamplingParams, list[str]]:
    def number(name, kind, default, lo=None, hi=None):
        value = body.get(name, default)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or (kind is int and value != int(value)):
            raise BadRequest(f"'{name}' must be a {kind.__name__}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise BadRequest(f"'{name}' must be in [{lo}, {hi}]")
        return kind(value)

    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings")
    params = SamplingParams(
        max_new_tokens=number("max_tokens", int, 64, 0, 4096),
        temperature=number("temperature", float, 1.0, 0.0, 10.0),
        top_k=number("top_k", int, None, 0, None),
        top_p=number("top_p", float, None, 0.0, 1.0) or None,
        seed=number("seed", int, None),
    )
    return params, stop


class App:
    """The ASGI application. `tokenizer` is a `tokenizers.Tokenizer`."""

    def __init__(self, batcher: ContinuousBatcher, tokenizer: Any, model_name: str, max_prompt_tokens: int | None,
                 default_seed: int | None = None):
        self.batcher = batcher
        self.default_seed = default_seed
        self.tok = tokenizer
        self.model_name = model_name
        self.max_prompt_tokens = max_prompt_tokens

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.batcher.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        route = (scope["method"], scope["path"])
        try:
            if route == ("GET", "/v1/models"):
                return await self._json(send, 200, {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "mulfree"}]})
            if route in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
                try:
                    request = json.loads(body or b"{}")
                except json.JSONDecodeError as exc:
                    raise BadRequest(f"body is not valid JSON ({exc.msg})") from exc
                if not isinstance(request, dict):
                    raise BadRequest("body must be a JSON object")
                return await self._complete(send, request, chat=route[1].endswith("chat/completions"))
            return await self._json(send, 404, {"error": {"message": f"no route {scope['method']} {scope['path']}", "type": "not_found"}})
        except BadRequest as exc:
            return await self._json(send, 400, {"error": {"message": str(exc), "type": "invalid_request_error"}})

    async def _json(self, send, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def _complete(self, send, body: dict, chat: bool) -> None:
        prompt = chat_prompt(body.get("messages")) if chat else body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string")
        params, stop = _params(body)
        if params.seed is None:
            params.seed = self.default_seed
        ids = self.tok.encode(prompt).ids
        if self.max_prompt_tokens is not None and len(ids) + params.max_new_tokens > self.max_prompt_tokens:
            raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the model's limit of {self.max_prompt_tokens}")
        req = self.batcher.submit(ids, params)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            key = "delta" if delta else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}

        stream = bool(body.get("stream"))
        if stream:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        text, sent, finish, got = "", 0, None, []
        loop = asyncio.get_running_loop()
        tokens = req.stream()
        while (token := await loop.run_in_executor(None, next, tokens, None)) is not None:
            got.append(token)
            text = self.tok.decode(got)
            hit = min((text.find(s) for s in stop if s in text), default=-1)
            if hit >= 0:
                text, finish = text[:hit], "stop"
                req.cancel()
            if stream and not text.endswith("\ufffd") and len(text) > sent:
                chunk = {"id": rid, "object": kind + ".chunk", "created": created, "model": self.model_name,
                         "choices": [choice(text[sent:], None, True)]}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(), "more_body": True})
                sent = len(text)
            if finish:
                req.result()
                break
        finish = finish or req.finish_reason
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(req.tokens), "total_tokens": len(ids) + len(req.tokens)}
        if stream:
            last = {"id": rid, "object": kind + ".chunk", "created": created, "model": self.model_name,
                    "choices": [choice(text[sent:], finish, True)], "usage": usage}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode()})
            return
        await self._json(send, 200, {"id": rid, "object": kind, "created": created, "model": self.model_name,
                                     "choices": [choice(text, finish, False)], "usage": usage})
