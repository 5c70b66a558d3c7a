"""Continuous batching: requests join and leave the decode batch at any step.

An MMfree sequence is fully described by its per-layer recurrent state h [1, D] (no KV cache that grows
with length), so the batch for one decode step is just the concatenation of the live sequences' states,
whatever their prompt lengths or ages. A new request is prefilled on its own and joins at the next step;
a finished one is dropped without touching the others. Models with a KV cache (Transformer++) are served
through the same interface one sequence at a time (their caches differ in length).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch

from mulfree.models import registry
from mulfree.ops.sampling import sample_next

_DONE = object()


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Request:
    """One generation in flight. Iterate `stream()` for token ids as they come, or call `result()`."""

    prompt_ids: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
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
        """Stop generating (e.g. a stop string was seen or the client went away)."""
        self._cancelled.set()


class TorchStepModel:
    """Prefill/decode on one of our torch models (`logits, state = model(ids, state)`)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        family = registry.find(model)
        self.batchable = family is not None and family.recurrent  # per-sequence states stack into one batch

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, list]:
        logits, state = self.model(torch.tensor([ids]))
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


class ContinuousBatcher:
    """Runs a background thread that admits, steps and retires requests (at most `max_batch` live)."""

    def __init__(self, step_model: TorchStepModel, max_batch: int = 8, eos_token_id: int | None = None):
        self.model = step_model
        self.max_batch = max_batch
        self.eos_token_id = eos_token_id
        self.steps = 0  # decode steps taken (for tests and metrics)
        self.max_live = 0
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mulfree-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        req = Request(list(prompt_ids), params)
        self._waiting.put(req)
        return req

    def close(self) -> None:
        self._stop.set()
        self._waiting.put(None)  # wake the loop
        self._thread.join()

    def _emit(self, req: Request, logits: torch.Tensor, gen: torch.Generator | None) -> bool:
        """Sample the next token of `req`; returns False once the request is finished."""
        p = req.params
        token = int(sample_next(logits[None], p.temperature, p.top_k, p.top_p, gen)[0])
        req.tokens.append(token)
        req._out.put(token)
        stops = set(p.stop_token_ids) | ({self.eos_token_id} if self.eos_token_id is not None else set())
        if token in stops:
            req.finish_reason = "stop"
        elif len(req.tokens) >= p.max_new_tokens:
            req.finish_reason = "length"
        elif req._cancelled.is_set():
            req.finish_reason = "stop"
        return req.finish_reason is None

    def _finish(self, req: Request) -> None:
        req._out.put(_DONE)

    def _loop(self) -> None:
        live: list[tuple[Request, list, torch.Generator | None]] = []
        while not self._stop.is_set():
            block = not live
            while len(live) < (self.max_batch if self.model.batchable else 1):
                try:
                    req = self._waiting.get(block=block, timeout=None if block else 0)
                except queue.Empty:
                    break
                block = False
                if req is None:
                    break
                gen = torch.Generator().manual_seed(req.params.seed) if req.params.seed is not None else None
                if req.params.max_new_tokens <= 0 or req._cancelled.is_set():
                    req.finish_reason = "length"
                    self._finish(req)
                    continue
                logits, state = self.model.prefill(req.prompt_ids)
                if self._emit(req, logits, gen):
                    live.append((req, state, gen))
                else:
                    self._finish(req)
            if not live:
                continue
            self.max_live = max(self.max_live, len(live))
            logits, states = self.model.decode([r.tokens[-1] for r, _, _ in live], [s for _, s, _ in live])
            self.steps += 1
            still = []
            for (req, _, gen), row, state in zip(live, logits, states):
                if self._emit(req, row, gen):
                    still.append((req, state, gen))
                else:
                    self._finish(req)
            live = still
        for req, _, _ in live:
            req.finish_reason = "abort"
            self._finish(req)
