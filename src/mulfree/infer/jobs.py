"""One request's choices in the continuous batcher, shared by every endpoint: `Job` submits them (429 when the
queue is full, 503 when the decode loop is down), and `drive` turns the batcher's tokens into text that is safe to
send (stop strings held back), ending, timing out or failing the request as one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from mulfree.infer.batching import QueueFull, SamplingParams
from mulfree.infer.detok import ChoiceText
from mulfree.infer.protocol import ApiError, seed64


class Job:
    """`n` choices for each prompt of `ids` (choice k continues prompt k // n), each with its `budgets` entry as its
    token limit. Sampling as the request gives it (temperature None: 1; top_p None or 1: off); seeds: `seed` for
    choice 0, derived ones for the others."""

    def __init__(self, srv: Any, ids: list[list[int]], budgets: list[int], n: int, *, temperature: float | None,
                 top_k: int | None, top_p: float | None, seed: int, stops: list[str], logprobs: int | None,
                 endpoint: str):
        self.srv, self.ids, self.endpoint = srv, ids, endpoint
        self.total = len(ids) * n
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, int | None]] = asyncio.Queue()
        self.texts: list[ChoiceText] = []
        self.reqs: list[Any] = []
        temperature = 1.0 if temperature is None else temperature
        top_p = top_p if top_p is not None and top_p < 1.0 else None
        try:
            for k in range(self.total):
                params = SamplingParams(max_new_tokens=budgets[k // n], temperature=temperature, top_k=top_k,
                                        top_p=top_p, seed=seed if k == 0 else seed64(seed * 1_000_003 + k),
                                        logprobs=logprobs)
                self.reqs.append(srv.batcher.submit(ids[k // n], params, sink=_sink(loop, self.events, k),
                                                    timeout_s=srv.timeout_s, reserve=self.total - k))
                self.texts.append(ChoiceText(srv.tok, stops))
        except QueueFull as exc:
            self.cancel()
            raise ApiError(429, f"server busy: {exc}", kind="rate_limit_error", code="queue_full") from None
        except RuntimeError as exc:
            self.cancel()
            raise ApiError(503, str(exc), kind="server_error") from None
        self.start = time.monotonic()
        srv.metrics.prompt_tokens.inc(self.prompt_tokens)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.ids)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose prefill the prefix cache skipped (each prompt counted once, as in prompt_tokens)."""
        return sum(self.reqs[k].cached_tokens for k in range(0, self.total, self.total // len(self.ids)))

    def usage(self) -> dict[str, Any]:
        """The `usage` object of a completion or chat completion so far."""
        prompt, done = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    @property
    def completion_tokens(self) -> int:
        """Tokens of the choices' texts so far (a stop string's tokens and those after it do not count)."""
        return sum(t.used for t in self.texts)

    def cancel(self) -> None:
        for r in self.reqs:
            r.cancel()

    async def drive(self) -> AsyncIterator[tuple[int, str, bool]]:
        """(choice index, new text, finished) as text becomes safe to send; ends when every choice is finished."""
        srv, texts, reqs = self.srv, self.texts, self.reqs
        pending, first = set(range(self.total)), True
        deadline = None if srv.timeout_s is None else self.start + srv.timeout_s + 5.0  # the batcher's bound + slack
        try:
            while pending:
                left = None if deadline is None else deadline - time.monotonic()
                try:
                    k, token = await asyncio.wait_for(self.events.get(), left)
                except TimeoutError:
                    raise ApiError(504, "the request timed out", kind="server_error", code="timeout") from None
                if k not in pending:
                    continue
                t = texts[k]
                if token is None:
                    pending.discard(k)
                    reason = reqs[k].finish_reason
                    if t.finish is None and reason in ("timeout", "abort", "error"):
                        raise ApiError({"timeout": 504, "abort": 503, "error": 500}[reason], f"generation ended: {reason}"
                                       + (f" ({reqs[k].error})" if reqs[k].error else ""), kind="server_error")
                    t.flush("length" if reason in (None, "cancelled") else reason)
                else:
                    t.feed(token)
                    if t.finish is not None:  # a stop string: no more tokens for this choice
                        reqs[k].cancel()
                        pending.discard(k)
                    if first:
                        srv.metrics.ttft.observe(time.monotonic() - self.start)
                        first = False
                chunk, done = t.ready(), t.finish is not None and k not in pending
                if chunk or done:
                    yield k, chunk, done
        finally:
            self.cancel()
            srv.metrics.completion_tokens.inc(self.completion_tokens)
            srv.metrics.latency.labels(self.endpoint).observe(time.monotonic() - self.start)

    async def run_watched(self, request: Any) -> None:
        """Drive to the end without streaming, cancelling every choice if the client goes away meanwhile."""
        watcher = asyncio.create_task(_watch_disconnect(request, self))
        try:
            async for _ in self.drive():
                pass
        finally:
            watcher.cancel()


def prompt_logprobs(step_model: Any, ids: list[int], top: int) -> list[tuple[float | None, list | None]]:
    """Each prompt token's (log-probability given the tokens before it, the `top` most likely [(id, logprob)]), the
    first token (None, None): what `echo` with `logprobs` reports for the prompt."""
    entries: list[tuple[float | None, list | None]] = [(None, None)]
    for logits in step_model.logits(ids):
        lp = torch.log_softmax(logits, dim=-1)[: len(ids) - len(entries)]  # the last row predicts past the prompt
        targets = torch.tensor(ids[len(entries):len(entries) + len(lp)])
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        best = lp.topk(min(top, lp.shape[1])) if top else None
        for j, value in enumerate(chosen):
            entries.append((value, [] if best is None else list(zip(best.indices[j].tolist(), best.values[j].tolist()))))
    return entries


def _sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, k: int):
    """The batcher-thread callback that hands choice k's tokens (None at the end) to the event loop."""
    return lambda token: loop.call_soon_threadsafe(events.put_nowait, (k, token))


async def _watch_disconnect(request: Any, job: Job) -> None:
    """Cancel `job` when the client goes away while a non-streamed answer is being generated."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return
