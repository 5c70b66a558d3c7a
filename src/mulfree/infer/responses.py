"""The OpenAI Responses API (`POST /v1/responses`, `client.responses.create`) for text: its request schema, the
`response` object and the streamed events, over the same batcher job as chat completions.

A request is a chat: `instructions` become a system message ahead of the `input` messages (a string `input` is one
user message), rendered with the model's chat template. What this server cannot do is a 400, never ignored:
stored responses (`store: true`, `previous_response_id`, `background`), tools, reasoning, structured output,
images and files. Logprobs come with `include: ["message.output_text.logprobs"]` or `top_logprobs`."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from mulfree.infer.protocol import ChatMessage, Finite

LOGPROBS = "message.output_text.logprobs"  # the one `include` value this server knows


class InputText(BaseModel):
    type: Literal["input_text", "output_text"]  # an assistant turn given back carries output_text parts
    text: StrictStr
    model_config = ConfigDict(extra="allow")  # annotations, logprobs of an earlier output


class InputMessage(BaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: StrictStr | list[InputText]
    model_config = ConfigDict(extra="allow")  # id, status of an earlier output item

    def as_chat(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(role=self.role, content=text)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # user, safety_identifier, prompt_cache_key: no effect here

    model: StrictStr
    input: StrictStr | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: StrictStr | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Finite, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] | None = None
    stream: StrictBool = False
    metadata: dict[str, StrictStr] | None = None
    store: StrictBool | None = None
    previous_response_id: StrictStr | None = None
    background: StrictBool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    include: list[StrictStr] | None = None
    truncation: Literal["disabled", "auto"] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ResponsesRequest:
        if self.store or self.previous_response_id is not None or self.background:
            raise ValueError("responses are not stored here: send store: false, without previous_response_id or "
                             "background, and pass the whole conversation as input")
        if self.tools or self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tools are not supported")
        if self.reasoning:
            raise ValueError("reasoning is not supported")
        fmt = (self.text or {}).get("format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise ValueError("text.format other than {\"type\": \"text\"} is not supported")
        if self.truncation == "auto":
            raise ValueError("truncation: auto is not supported: a conversation longer than the context is a 400")
        other = set(self.include or []) - {LOGPROBS}
        if other:
            raise ValueError(f"include {sorted(other)} is not supported (only {LOGPROBS!r})")
        return self

    def logprob_count(self) -> int | None:
        """Alternatives per token to report (None: no logprobs): asked by `include` or `top_logprobs`."""
        if LOGPROBS not in (self.include or []) and not self.top_logprobs:
            return None
        return self.top_logprobs or 0

    def messages(self) -> list[ChatMessage]:
        """The conversation: instructions as a system message, then the input."""
        turns = [ChatMessage(role="user", content=self.input)] if isinstance(self.input, str) else [
            m.as_chat() for m in self.input]
        return ([ChatMessage(role="system", content=self.instructions)] if self.instructions else []) + turns


class Reply:
    """One response's identity, echoed settings and state, as the `response` object and its stream events."""

    def __init__(self, body: ResponsesRequest, model: str):
        self.body, self.model = body, model
        self.id, self.item_id = "resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.sequence = 0

    def response(self, status: str, text: str | None, usage: tuple[int, int, int] | None,
                 logprobs: list | None = None) -> dict[str, Any]:
        """The `response` object: in progress (no output yet), completed, or incomplete at max_output_tokens."""
        b = self.body
        incomplete = status == "incomplete"
        out = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "metadata": b.metadata or {},
            "temperature": 1.0 if b.temperature is None else b.temperature, "top_p": 1.0 if b.top_p is None else b.top_p,
            "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "store": False, "truncation": "disabled",
            "text": {"format": {"type": "text"}},
            "output": [] if text is None else [self.message(text, status, logprobs)],
            "top_logprobs": b.top_logprobs,
            "usage": None,
        }
        if status != "in_progress":
            out["completed_at"] = int(time.time())
        if usage is not None:
            prompt, done, cached = usage
            out["usage"] = {"input_tokens": prompt,
                            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                            "output_tokens": done, "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": prompt + done}
        return out

    def message(self, text: str, status: str, logprobs: list | None = None) -> dict[str, Any]:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant",
                "content": [] if status == "in_progress" else [self.part(text, logprobs)]}

    @staticmethod
    def part(text: str, logprobs: list | None = None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """One stream event, numbered in order."""
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def opening(self) -> list[dict[str, Any]]:
        """The events before the first text delta."""
        at = {"item_id": self.item_id, "output_index": 0}
        return [self.event("response.created", response=self.response("in_progress", None, None)),
                self.event("response.in_progress", response=self.response("in_progress", None, None)),
                self.event("response.output_item.added", output_index=0, item=self.message("", "in_progress")),
                self.event("response.content_part.added", **at, content_index=0, part=self.part(""))]

    def delta(self, text: str, logprobs: list | None = None) -> dict[str, Any]:
        """A text delta with the logprobs of its tokens (when asked for)."""
        return self.event("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                          delta=text, logprobs=logprobs or [])

    def closing(self, text: str, status: str, usage: tuple[int, int, int],
                logprobs: list | None = None) -> list[dict[str, Any]]:
        """The events after the last delta: the text, part and item done, then the whole response."""
        at = {"item_id": self.item_id, "output_index": 0}
        final = self.response(status, text, usage, logprobs)
        return [self.event("response.output_text.done", **at, content_index=0, text=text, logprobs=logprobs or []),
                self.event("response.content_part.done", **at, content_index=0, part=self.part(text, logprobs)),
                self.event("response.output_item.done", output_index=0, item=self.message(text, status, logprobs)),
                self.event("response.completed" if status == "completed" else "response.incomplete", response=final)]
