"""Continuous batching: requests join and leave the batch at any step.

An MMfree sequence is fully described by its per-layer recurrent state h [1, D] (no KV cache that grows
with length), so one step can hold any mix of sequences: every live sequence's next token and the prompt
chunks of joining ones (at most `prefill_chunk` prompt tokens a step), run by the step model together
(`step(chunks, states)`: on the packed engine, one native call in which every linear runs once over all the
step's tokens). A long prompt is fed over several steps and never stalls the running streams for longer than
one chunk. A finished, cancelled or timed-out sequence leaves before the next step without touching the others.
Models with a KV cache (Transformer++, Hugging Face models) decode their live sequences together (`infer.kv_batch`).
With a `PrefixCache`, a joining prompt starts from the longest kept prefix: recurrent models keep a sequence's
state whenever its fed tokens end a block (a prompt chunk that passes a block end stops at its last one); KV models
keep each completed block's KV slice.

The loop never dies of one request: a step that fails is retried one sequence at a time, and only the
sequences that fail alone finish with finish_reason "error". `alive` turns False only when the loop itself
has stopped (closed, or an unexpected error, kept in `error`) — `/health` reports it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mulfree.infer.kv_batch import decode_kv_batch
from mulfree.infer.prefix_cache import PrefixCache, block_keys
from mulfree.models import registry
from mulfree.models.transformer import KVCache
from mulfree.ops.sampling import check_sampling, greedy, sample_row

_DONE = object()
SCORE_CHUNK = 256  # positions whose logits a prompt's scoring holds at once


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
    cached_tokens: int = 0  # prompt tokens a prefix-cache hit skipped
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
    """Steps on one of our torch models (`logits, state = model(ids, state)`): decode tokens of sequences
    with a state run as one batch (recurrent states concatenated, KV caches padded), prompt chunks one by one."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        family = registry.find(model)
        self.recurrent = family is not None and family.recurrent  # per-sequence states stack into one batch

    def new_state(self) -> None:
        return None

    @staticmethod
    def copy_state(state: list[Any]) -> list[Any]:
        """An independent copy of a state (recurrent: a tensor per layer; KV: a (k, v) per layer), for the prefix
        cache."""
        return [tuple(t.clone() for t in layer) if isinstance(layer, tuple) else layer.clone() for layer in state]

    @staticmethod
    def block_state(state: KVCache, start: int, end: int, fed: int) -> KVCache | None:
        """Positions start..end of the KV cache of `fed` tokens (views): what the prefix cache keeps of one block;
        None when a layer does not hold every token fed (a sliding-window layer drops the oldest)."""
        if any(k.shape[2] != fed for k, _ in state):
            return None
        return [(k[:, :, start:end], v[:, :, start:end]) for k, v in state]

    @staticmethod
    def join_states(blocks: list[KVCache]) -> KVCache:
        """The KV cache of consecutive blocks' slices, in order."""
        return [tuple(torch.cat([b[layer][i] for b in blocks], dim=2) for i in (0, 1)) for layer in range(len(blocks[0]))]

    @torch.no_grad()
    def step(self, chunks: list[list[int]], states: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """Feed chunk s after states[s] (None: a fresh sequence) -> (last logits [S, V], new states)."""
        logits: list[torch.Tensor | None] = [None] * len(chunks)
        new = list(states)
        decode = [i for i, (c, st) in enumerate(zip(chunks, states)) if len(c) == 1 and st is not None]
        for i in sorted(set(range(len(chunks))) - set(decode)):
            out, new[i] = self.model(torch.tensor([chunks[i]]), states[i])
            logits[i] = out[0, -1]
        if decode:
            rows, moved = self._decode([chunks[i][0] for i in decode], [states[i] for i in decode])
            for i, row, st in zip(decode, rows, moved):
                logits[i], new[i] = row, st
        return torch.stack(logits), new

    @torch.no_grad()
    def logits(self, ids: list[int], chunk: int = SCORE_CHUNK) -> Iterator[torch.Tensor]:
        """Every position's logits fp32 [t, V] of one fresh sequence `ids`, `chunk` positions at a time (a long
        prompt never holds [T, V] at once)."""
        state = None
        for start in range(0, len(ids), chunk):
            out, state = self.model(torch.tensor([ids[start:start + chunk]]), state)
            yield out[0].float()

    def _decode(self, tokens: list[int], states: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        if self.recurrent:
            batched = [torch.cat(layer, dim=0) for layer in zip(*states)]
            logits, new = self.model(torch.tensor(tokens)[:, None], batched)
            return logits[:, -1], [[layer[b : b + 1] for layer in new] for b in range(len(tokens))]
        return decode_kv_batch(self.model, tokens, states)


class PackedStepModel:
    """Steps on the packed engine (`PackedModel.step`): a sequence's state is fp32 [L, d], updated in place;
    decode tokens and prompt chunks of all sequences go through one native call."""

    recurrent = True

    def __init__(self, packed: Any):
        self.packed = packed

    def new_state(self) -> torch.Tensor:
        return self.packed.new_state()

    @staticmethod
    def copy_state(state: torch.Tensor) -> torch.Tensor:
        return state.clone()

    @torch.no_grad()
    def step(self, chunks: list[list[int]], states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.packed.step(chunks, states), states

    def logits(self, ids: list[int], chunk: int = SCORE_CHUNK) -> Iterator[torch.Tensor]:
        """As `TorchStepModel.logits`, on the engine (its calls take turns with the batcher's steps)."""
        state = self.packed.new_state()
        for start in range(0, len(ids), chunk):
            yield self.packed.prefill_state(ids[start:start + chunk], state, all_logits=True)[0]


@dataclass
class _Seq:
    """A request in the batch: its prompt is fed `pos` tokens so far; it decodes once pos reaches the end."""

    req: Request
    gen: torch.Generator | None
    state: Any
    pos: int = 0
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys: the prompt's blocks, then decoded ones
    kept: int = 0  # blocks whose KV slices a chained prefix cache was given

    @property
    def decoding(self) -> bool:
        return self.pos == len(self.req.prompt_ids)


class ContinuousBatcher:
    """Runs a background thread that admits, steps and retires requests (at most `max_batch` in the batch,
    at most `max_queue` waiting)."""

    def __init__(self, step_model: Any, max_batch: int = 8, eos_token_id: int | None = None,
                 max_queue: int = 1024, prefill_chunk: int = 128, prefix_cache: PrefixCache | None = None):
        self.model = step_model
        self.cache = prefix_cache  # states at block ends, for prompts that start as an earlier sequence did
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.eos_token_id = eos_token_id
        self.prefill_chunk = prefill_chunk  # prompt tokens fed per step: a long prompt never stalls the others
        self._seqs: list[_Seq] = []  # loop thread only
        self.steps = 0  # steps taken (for tests and metrics)
        self.max_live = 0
        self.live = 0  # decoding sequences in the current batch (metrics)
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

    def _emit(self, seq: _Seq, logits: torch.Tensor, token: int | None) -> bool:
        """Sample (unless `token` is the greedy pick already) the next token of `seq`; False once it is finished."""
        req, p = seq.req, seq.req.params
        if token is None:
            token = sample_row(logits, p.temperature, p.top_k, p.top_p, seq.gen)
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
        """Add a new request to the batch (or finish it at once)."""
        if self._gone(req, time.monotonic()):
            return
        if req.params.max_new_tokens <= 0:
            self._finish(req, "length")
            return
        try:
            p = req.params
            check_sampling(p.temperature, p.top_k, p.top_p)
            gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
            seq = _Seq(req, gen, self.model.new_state())
            self._seqs.append(seq)
            if self.cache is not None:
                seq.keys = self.cache.prompt_keys(req.prompt_ids)
                self._catch_up(seq)
        except Exception as exc:  # noqa: BLE001 - this request only
            self._finish(req, "error", f"{type(exc).__name__}: {exc}")

    def _plan(self) -> list[tuple[_Seq, list[int]]]:
        """This step's work: every decoding sequence's last token, then prompt chunks in arrival order while
        the step's prompt-token budget lasts."""
        work, budget, stored = [], self.prefill_chunk, set()  # stored: keys this step's chunks end on
        for seq in self._seqs:
            if seq.decoding:
                work.append((seq, seq.req.tokens[-1:]))
            elif budget > 0:
                if self.cache is not None:
                    self._catch_up(seq)
                    if any(k in stored for k in seq.keys[seq.pos // self.cache.block:]):
                        continue  # another sequence feeds this prompt's next blocks now: take its state after
                end = min(seq.pos + budget, len(seq.req.prompt_ids))
                if self.cache is not None:
                    end, keys = self._stores(seq, end)
                    stored.update(keys)
                chunk = seq.req.prompt_ids[seq.pos : end]
                budget -= len(chunk)
                work.append((seq, chunk))
        return work

    def _catch_up(self, seq: _Seq) -> None:
        """Move a joining prompt to the longest cached prefix past where it is (at admission, or once another
        sequence has fed the blocks it shares)."""
        pos, state = self.cache.lookup(seq.keys, seq.pos)
        if state is not None:
            seq.state, seq.pos, seq.req.cached_tokens = state, pos, pos
            seq.kept = pos // self.cache.block

    def _stores(self, seq: _Seq, end: int) -> tuple[int, list[bytes]]:
        """(where a prompt chunk of `seq` ends, the keys the cache will hold after it). A chained cache keeps every
        block the chunk completes. A state cache keeps only the chunk's end, so every chunk that passes a block end
        stops at its last one: the prompt's last full block is kept too (a repeat of the prompt starts there), at
        the cost of one more step for the tail (under a block) behind it."""
        block = self.cache.block
        if self.cache.chained:
            return end, seq.keys[seq.pos // block : end // block]
        last = min(end, len(seq.req.prompt_ids) - 1) // block * block  # a prompt keeps its last token to feed
        if last > seq.pos:
            end = last
        return end, seq.keys[end // block - 1 : end // block] if end % block == 0 else []

    def _run(self, work: list[tuple[_Seq, list[int]]]) -> list[torch.Tensor | None]:
        """Each sequence's last logits of this step (its state advanced), one model call; when that call fails,
        each sequence alone, and the ones that fail alone are finished with an error (None)."""
        chunks = [c for _, c in work]
        try:
            logits, states = self.model.step(chunks, [s.state for s, _ in work])
            rows: list[torch.Tensor | None] = list(logits)
        except Exception:  # noqa: BLE001 - find the sequences at fault
            rows, states = [], []
            for seq, chunk in work:
                try:
                    lg, st = self.model.step([chunk], [seq.state])
                    rows.append(lg[0])
                    states.append(st[0])
                except Exception as exc:  # noqa: BLE001 - this request only
                    self._finish(seq.req, "error", f"{type(exc).__name__}: {exc}")
                    rows.append(None)
                    states.append(None)
        for (seq, chunk), st in zip(work, states):
            seq.state = st
            seq.pos = min(seq.pos + len(chunk), len(seq.req.prompt_ids))
            if self.cache is not None and st is not None:
                self._remember(seq)
        return rows

    def _remember(self, seq: _Seq) -> None:
        """Give the cache what `seq` has new: the slices of the blocks it has completed (chained), or its state when
        the tokens it has been fed end a block."""
        block = self.cache.block
        fed = len(seq.req.prompt_ids) + len(seq.req.tokens) if seq.decoding else seq.pos
        if fed // block > len(seq.keys):
            block_keys((seq.req.prompt_ids + seq.req.tokens)[:fed], block, seq.keys)
        if self.cache.chained:
            for i in range(seq.kept, fed // block):
                kv = self.model.block_state(seq.state, i * block, (i + 1) * block, fed)
                if kv is None:
                    return
                self.cache.store(seq.keys[i], kv)
            seq.kept = max(seq.kept, fed // block)
        elif fed % block == 0:
            self.cache.store(seq.keys[fed // block - 1], seq.state)

    def _step(self) -> None:
        """Admit waiting requests, drop finished ones, then run one step over the batch."""
        block = not self._seqs
        while len(self._seqs) < self.max_batch:
            try:
                req = self._waiting.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                break
            block = False
            if req is None:
                break
            self._admit(req)
        now = time.monotonic()
        self._seqs = [s for s in self._seqs if not self._gone(s.req, now)]
        self._count_live()
        work = self._plan()
        if not work:
            return
        rows = self._run(work)
        self.steps += 1
        # a sequence samples when it was decoding or its prompt's last chunk went in; greedy picks in one reduction
        ready = [i for i, ((seq, _), row) in enumerate(zip(work, rows)) if row is not None and seq.decoding]
        argmax_rows = [i for i in ready if work[i][0].req.params.temperature == 0]
        picks = dict(zip(argmax_rows, greedy(torch.stack([rows[i] for i in argmax_rows])).tolist())) if argmax_rows else {}
        finished = set()
        for i in ready:
            seq = work[i][0]
            try:
                more = self._emit(seq, rows[i], picks.get(i))
            except Exception as exc:  # noqa: BLE001 - this request only
                self._finish(seq.req, "error", f"{type(exc).__name__}: {exc}")
                more = False
            else:
                if not more:
                    self._finish(seq.req)
            if not more:
                finished.add(id(seq))
        gone = finished | {id(seq) for (seq, _), row in zip(work, rows) if row is None}  # failed in `_run`
        self._seqs = [s for s in self._seqs if id(s) not in gone]
        self._count_live()  # the loop may now wait for a request: the gauge must not keep the finished ones

    def _count_live(self) -> None:
        self.live = sum(s.decoding for s in self._seqs)
        self.max_live = max(self.max_live, self.live)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._step()
        except BaseException as exc:  # noqa: BLE001 - an unexpected error: the loop is dead and says so
            self.error = exc
        finally:
            self._stop.set()
            why = "the server is shutting down" if self.error is None else "the decode loop failed"
            for seq in self._seqs:
                self._finish(seq.req, "abort", why)
            while True:  # nobody will admit the waiting ones any more
                try:
                    req = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if req is not None:
                    self._finish(req, "abort", why)
            self.live = 0
