"""Pydantic models of the OpenAI completion and chat request/response schemas (the parts we serve).

Validation is strict where OpenAI's is: `stop: 5`, NaN/inf sampling values and wrong types fail here and
become 400 JSON errors; fields we accept but cannot honour (`echo`, penalties, `logit_bias`, tools) are
refused rather than silently ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from mulfree.errors import ConfigError

Finite = Annotated[float, Field(allow_inf_nan=False)]
TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Common(BaseModel):
    """Sampling fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we have no use for (user, metadata)

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    temperature: Annotated[Finite, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = None  # any integer: see `seed64`
    presence_penalty: Annotated[Finite, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[Finite, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> _Common:
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (leave them 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("response_format other than {\"type\": \"text\"} is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @model_validator(mode="after")
    def _unsupported_completion(self) -> CompletionRequest:
        if self.echo and self.stream:
            raise ValueError("echo is supported without stream only")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of strings or token-id lists (one completion set per prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("'prompt' is empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    modalities: list[StrictStr] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _unsupported_chat(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tools or self.functions:
            raise ValueError("tools are not supported")
        if self.audio is not None or (self.modalities is not None and set(self.modalities) != {"text"}):
            raise ValueError("only text output is supported (modalities: [\"text\"], no audio)")
        if self.web_search_options is not None:
            raise ValueError("web search is not supported")
        return self


# What each union-typed field takes, for a value that fits none of its alternatives (pydantic then reports one
# type error per alternative, the first of which, "should be a valid string", would mislead).
ACCEPTS = {
    "prompt": "a string, a list of strings, a list of token ids (integers >= 0) or a list of such lists",
    "stop": "a string or a list of at most 4 strings",
    "content": 'a string, a list of text parts ({"type": "text", "text": ...}) or null',
    "input": 'a string or a list of messages ({"role": ..., "content": a string or a list of '
             '{"type": "input_text", "text": ...} parts})',
}


class ApiError(Exception):
    """An error answered as {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """An OpenAI error object, {"error": {message, type, param, code}}: the body of every 4xx / 5xx answer and of
    a stream's error event."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def describe_error(exc: ValidationError) -> tuple[str, str | None]:
    """(message, param) for a request that fails validation. Where a union field's value fits one alternative's
    type but breaks its constraint (a negative token id, a fifth stop string) that error is the one reported;
    where it fits none, what the field takes. The alternatives' tags are left out of the param."""
    errors = exc.errors()
    err = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
    loc, union = [], None
    for i, part in enumerate(err["loc"]):
        if i > 0 and err["loc"][i - 1] in ACCEPTS and isinstance(part, str):
            union = err["loc"][i - 1]  # the alternative's tag ("str", "list[str]", ...)
            continue
        loc.append(str(part))
    param = ".".join(loc) or None
    if union is not None and err["type"].endswith("_type") and loc[-1] == union:
        return f"{param}: should be {ACCEPTS[union]}", param
    msg = str(err["ctx"]["error"]) if err["type"] == "value_error" and "ctx" in err else err["msg"]  # no "Value error, "
    return (f"{param}: {msg}" if param else msg), param


def chat_prompt(messages: list[ChatMessage]) -> str:
    """Plain-text chat template for models trained without one: 'role: content' lines, then 'assistant:'. A content
    that starts with white space follows the colon as it is, so a reply the model wrote after 'assistant:' and a
    client resends reads back as it was generated (the next turn's prompt extends this one's, token for token)."""
    return "\n".join(f"{m.role}:{'' if m.text()[:1].isspace() else ' '}{m.text()}" for m in messages) + "\nassistant:"


def load_chat_template(model_dir: str | Path) -> Callable[[list[ChatMessage]], str] | None:
    """The dir's chat template (`chat_template` of tokenizer_config.json, else `chat_template.jinja`, where
    transformers 5 saves it) rendered as transformers does (sandboxed Jinja, add_generation_prompt=True,
    bos/eos tokens); None when there is none. A file that cannot be read or a template that does not compile is
    a ConfigError (not a silent fall back to the plain template)."""
    path = Path(model_dir) / "tokenizer_config.json"
    jinja = Path(model_dir) / "chat_template.jinja"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        cfg = cfg if isinstance(cfg, dict) else {}
        template = cfg.get("chat_template")
        if template is None and jinja.is_file():
            path, template = jinja, jinja.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the chat template in {path} ({exc})",
                          "fix the file or remove its chat_template") from None
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(template, str) or not template:
        return None
    from jinja2 import TemplateError, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # Jinja's own escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3 templates date their prompt
    try:
        compiled = env.from_string(template)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"the chat template in {path} does not compile (line {exc.lineno}: {exc.message})",
                          "fix the template") from None
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k in ("bos_token", "eos_token")
               if isinstance(v := cfg.get(k), (str, dict))}

    def render(messages: list[ChatMessage]) -> str:
        try:
            return compiled.render(messages=[{"role": m.role, "content": m.text()} for m in messages],
                                   add_generation_prompt=True, **special)
        except TemplateError as exc:
            raise ValueError(f"the model's chat template rejects these messages ({exc})") from None

    return render


def logprob_count(body: CompletionRequest | ChatRequest) -> int | None:
    """How many alternatives per token to report (None: no logprobs)."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    return (body.top_logprobs or 0) if body.logprobs else None


def completion_logprobs(tokens: list[int], entries: list, piece: Any, offset: int = 0) -> dict:
    """The completions `logprobs` object for tokens with their (logprob, [(id, logprob)]) entries."""
    strings = [piece(t) for t in tokens]
    offsets = []
    for s in strings:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": strings, "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [None if tops is None else {piece(i): v for i, v in tops} for _, tops in entries],
            "text_offset": offsets}


def chat_logprobs(tokens: list[int], entries: list, piece: Any) -> dict:
    """The chat `logprobs` object ({"content": [{token, logprob, bytes, top_logprobs}]})."""
    def one(i: int, lp: float) -> dict:
        s = piece(i)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in tops]}
                        for t, (lp, tops) in zip(tokens, entries)], "refusal": None}


def seed64(seed: int) -> int:
    """Any integer -> a torch seed in [0, 2^63): small non-negative seeds as they are, others hashed."""
    if 0 <= seed < 1 << 63:
        return seed
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mulfree"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
