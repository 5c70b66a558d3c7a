"""Continuous batching: requests join and leave the decode batch at any step.

An MMfree sequence is fully described by its per-layer recurrent state h [1, D] (no KV cache that grows
with length), so the batch for one decode step is just the concatenation of the live sequences' states,
whatever their prompt lengths or ages. A new request is prefilled on its own and joins at the next step;
a finished, cancelled or timed-out one is dropped before the next step without touching the others.
Models with a KV cache (Transformer++) are served through the same interface one sequence at a time.

The loop never dies of one request: an error while prefilling or sampling finishes that request with
finish_reason "error"; a failing batched step finishes the sequences in it. `alive` turns False only when
the loop itself has stopped (closed, or an unexpected error, kept in `error`) — `/health` reports it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mulfree.models import registry
from mulfree.ops.sampling import sample_next

_DONE = object()


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (the server answers 429)."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # 0 <= seed < 2^64; None draws from torch's global generator
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely


@dataclass
class Request:
    """One generation in flight. Iterate `stream()` for token ids as they come, or call `result()`.

    `sink`, when set, is also called (from the batcher thread) with each token id and finally with None.
    """

    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[int | None], None] | None = None
    deadline: float | None = None  # time.monotonic() after which the request is finished as "timeout"
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # per token, if asked
    finish_reason: str | None = None
    error: str | None = None
    _out: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def stream(self):
        while (item := self._out.get()) is not _DONE:
            yield item

    def result(self) -> list[int]:
        for _ in self.stream():
            pass
        return self.tokens

    def cancel(self) -> None:
        """Stop generating before the next step (a stop string was seen or the client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _push(self, item: Any) -> None:
        self._out.put(item)
        if self.sink is not None:
            try:
                self.sink(None if item is _DONE else item)
            except Exception:  # noqa: BLE001, S110 - a closed event loop on the other side must not reach the batcher
                pass


class TorchStepModel:
    """Prefill/decode on one of our torch models (`logits, state = model(ids, state)`)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        family = registry.find(model)
        self.batchable = family is not None and family.recurrent  # per-sequence states stack into one batch

    @torch.no_grad()
    def prefill(self, ids: list[int], state: list | None = None) -> tuple[torch.Tensor, list]:
        """Feed `ids` after `state` (None: a fresh sequence); returns (last logits [V], new state)."""
        logits, state = self.model(torch.tensor([ids]), state)
        return logits[0, -1], state

    @torch.no_grad()
    def decode(self, tokens: list[int], states: list[list]) -> tuple[torch.Tensor, list[list]]:
        """One token for each sequence: tokens [B], states B × per-layer state -> (logits [B, V], new states)."""
        if not self.batchable:
            outs = [self.model(torch.tensor([[t]]), s) for t, s in zip(tokens, states)]
            return torch.stack([lg[0, -1] for lg, _ in outs]), [s for _, s in outs]
        batched = [torch.cat(layer, dim=0) for layer in zip(*states)]
        logits, new = self.model(torch.tensor(tokens)[:, None], batched)
        return logits[:, -1], [[layer[b : b + 1] for layer in new] for b in range(len(tokens))]


class PackedStepModel:
    """Prefill/decode on the packed engine (`PackedModel`): a sequence's state is fp32 [L, d]; one step gathers
    the live states into a contiguous [B, L, d] for `decode_batch` (every linear once over the B tokens) and
    hands each sequence its row back."""

    batchable = True

    def __init__(self, packed: Any):
        self.packed = packed

    @torch.no_grad()
    def prefill(self, ids: list[int], state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.packed.prefill_state(ids, state)

    @torch.no_grad()
    def decode(self, tokens: list[int], states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        batch = torch.stack(states)  # [B, L, d], contiguous; updated in place by the engine
        logits = self.packed.decode_batch(tokens, batch)
        return logits, list(batch.unbind(0))


_Live = tuple[Request, Any, "torch.Generator | None"]


@dataclass
class _Prefill:
    """A request whose prompt is being fed, `prefill_chunk` tokens per step at most."""

    req: Request
    gen: torch.Generator | None
    state: Any = None
    pos: int = 0


class ContinuousBatcher:
    """Runs a background thread that admits, steps and retires requests (at most `max_batch` live,
    at most `max_queue` waiting)."""

    def __init__(self, step_model: Any, max_batch: int = 8, eos_token_id: int | None = None,
                 max_queue: int = 1024, prefill_chunk: int = 512):
        self.model = step_model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.eos_token_id = eos_token_id
        self.prefill_chunk = prefill_chunk  # prompt tokens fed per step: a long prompt never stalls the others
        self._prefilling: list[_Prefill] = []  # loop thread only
        self.steps = 0  # decode steps taken (for tests and metrics)
        self.max_live = 0
        self.live = 0  # sequences in the current batch (metrics)
        self.error: BaseException | None = None  # what killed the loop, if anything did
        self._waiting: queue.Queue[Request | None] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="mulfree-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def queue_depth(self) -> int:
        return self._waiting.qsize()

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable | None = None,
               timeout_s: float | None = None, reserve: int = 1) -> Request:
        """Queue one request; QueueFull when `reserve` more would pass the bound, RuntimeError when dead."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if not self.alive:
            raise RuntimeError("the decode loop is not running")
        with self._lock:
            if self._waiting.qsize() + reserve > self.max_queue:
                raise QueueFull(f"{self._waiting.qsize()} requests are waiting (limit {self.max_queue})")
            deadline = time.monotonic() + timeout_s if timeout_s else None
            req = Request(list(prompt_ids), params, sink=sink, deadline=deadline)
            self._waiting.put(req)
        return req

    def close(self, timeout: float | None = 30.0) -> None:
        self._stop.set()
        self._waiting.put(None)  # wake the loop
        self._thread.join(timeout)

    def _finish(self, req: Request, reason: str | None = None, error: str | None = None) -> None:
        if reason is not None:
            req.finish_reason = reason
        if error is not None:
            req.error = error
        req._push(_DONE)

    def _emit(self, req: Request, logits: torch.Tensor, gen: torch.Generator | None, token: int | None = None) -> bool:
        """Sample (unless `token` is the greedy pick already) the next token of `req`; False once it is finished."""
        p = req.params
        if token is None:
            token = int(sample_next(logits[None], p.temperature, p.top_k, p.top_p, gen)[0])
        if p.logprobs is not None:  # of the model's distribution (before temperature / top-k / top-p)
            lp = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(lp, min(p.logprobs, lp.numel())) if p.logprobs else None
            req.logprobs.append((float(lp[token]), [] if top is None else
                                 [(int(i), float(v)) for v, i in zip(top.values, top.indices)]))
        req.tokens.append(token)
        req._push(token)
        if token in p.stop_token_ids or token == self.eos_token_id:
            req.finish_reason = "stop"
        elif len(req.tokens) >= p.max_new_tokens:
            req.finish_reason = "length"
        return req.finish_reason is None

    def _gone(self, req: Request, now: float) -> bool:
        """Finish a cancelled or timed-out request; True when it must leave the batch."""
        if req.cancelled:
            self._finish(req, "cancelled")
            return True
        if req.deadline is not None and now > req.deadline:
            self._finish(req, "timeout")
            return True
        return False

    def _admit(self, req: Request) -> None:
        """Queue a new request for prefill (or finish it at once)."""
        if self._gone(req, time.monotonic()):
            return
        if req.params.max_new_tokens <= 0:
            self._finish(req, "length")
            return
        try:
            gen = torch.Generator().manual_seed(req.params.seed) if req.params.seed is not None else None
        except Exception as exc:  # noqa: BLE001 - this request only
            self._finish(req, "error", f"{type(exc).__name__}: {exc}")
            return
        self._prefilling.append(_Prefill(req, gen))

    def _prefill(self, live: list[_Live]) -> None:
        """Feed at most `prefill_chunk` prompt tokens; a prompt fed to its end samples its first token and
        joins `live`."""
        budget, now = self.prefill_chunk, time.monotonic()
        self._prefilling = [p for p in self._prefilling if not self._gone(p.req, now)]
        while budget > 0 and self._prefilling:
            p = self._prefilling[0]
            chunk = p.req.prompt_ids[p.pos : p.pos + budget]
            budget -= len(chunk)
            try:
                logits, p.state = self.model.prefill(chunk, p.state)
                p.pos += len(chunk)
                if p.pos < len(p.req.prompt_ids):
                    continue
                self._prefilling.pop(0)
                more = self._emit(p.req, logits, p.gen)
            except Exception as exc:  # noqa: BLE001 - this request only
                if self._prefilling and self._prefilling[0] is p:
                    self._prefilling.pop(0)
                self._finish(p.req, "error", f"{type(exc).__name__}: {exc}")
                continue
            if more:
                live.append((p.req, p.state, p.gen))
            else:
                self._finish(p.req)

    def _step(self, live: list[_Live]) -> list[_Live]:
        """Admit waiting requests, feed prompts, then advance every live sequence by one token."""
        block = not live and not self._prefilling
        limit = self.max_batch if getattr(self.model, "batchable", True) else 1
        while len(live) + len(self._prefilling) < limit:
            try:
                req = self._waiting.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                break
            block = False
            if req is None:
                break
            self._admit(req)
        now = time.monotonic()
        live = [entry for entry in live if not self._gone(entry[0], now)]
        self._prefill(live)
        self.live = len(live)
        if not live:
            return live
        self.max_live = max(self.max_live, len(live))
        try:
            logits, states = self.model.decode([r.tokens[-1] for r, _, _ in live], [s for _, s, _ in live])
            greedy = [i for i, (r, _, _) in enumerate(live) if r.params.temperature == 0]
            picks = dict(zip(greedy, logits[greedy].float().argmax(-1).tolist())) if greedy else {}  # one argmax
        except Exception as exc:  # noqa: BLE001 - the sequences of this step only
            for req, _, _ in live:
                self._finish(req, "error", f"{type(exc).__name__}: {exc}")
            return []
        self.steps += 1
        still = []
        for i, ((req, _, gen), row, state) in enumerate(zip(live, logits, states)):
            try:
                more = self._emit(req, row, gen, picks.get(i))
            except Exception as exc:  # noqa: BLE001 - this request only
                self._finish(req, "error", f"{type(exc).__name__}: {exc}")
                continue
            if more:
                still.append((req, state, gen))
            else:
                self._finish(req)
        return still

    def _loop(self) -> None:
        live: list[_Live] = []
        try:
            while not self._stop.is_set():
                live = self._step(live)
        except BaseException as exc:  # noqa: BLE001 - an unexpected error: the loop is dead and says so
            self.error = exc
        finally:
            self._stop.set()
            for req in [r for r, _, _ in live] + [p.req for p in self._prefilling]:
                self._finish(req, "abort")
            while True:  # nobody will admit the waiting ones any more
                try:
                    req = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if req is not None:
                    self._finish(req, "abort")
            self.live = 0
