"""Prefix caching: the state after a prompt's first k blocks, kept for the next request that starts with the same
tokens.

An MMfree sequence's whole past is its recurrent state (fp32 [L, d]: 192 KiB at the 1.3B shape), so a snapshot
taken after `block` × k tokens lets a later prompt with the same first tokens skip their prefill: a chat's next
turn (the conversation so far, resent), a shared system prompt, a regenerated answer. Snapshots are keyed by a
chained hash of the token blocks (blake2b, so one block's key names every token before it) and evicted least
recently used past a byte budget. Unlike a KV cache, a snapshot holds no per-token memory: only block ends are
cached, and a hit restarts the prompt at the last cached block end before its final token.

A KV-cache model's state grows with every token, so for it the cache is chained: each entry is one block's own
slice of the KV cache (keys and values of those 32 tokens in every layer), and a hit joins the slices of every
block from the first (as vLLM's automatic prefix caching shares KV blocks). Memory is then per cached token, once.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

BLOCK = 32  # tokens per cached block: a hit re-feeds at most BLOCK - 1 tokens of the matching prefix
ENTRY_OVERHEAD = 1024  # bytes an entry costs beyond its tensors (key, containers, dict slot)
TENSOR_OVERHEAD = 512  # bytes a kept tensor costs beyond its data (tensor object, storage, allocator)


def block_keys(ids: Sequence[int], block: int = BLOCK, keys: list[bytes] | None = None) -> list[bytes]:
    """The chained key of every full block of `ids` (key k names ids[:block * (k + 1)]), extending `keys`, the
    keys of a shorter prefix of the same ids, when given."""
    keys = [] if keys is None else keys
    for end in range(block * (len(keys) + 1), len(ids) + 1, block):
        h = hashlib.blake2b(keys[-1] if keys else b"", digest_size=16)
        h.update(array("q", ids[end - block:end]).tobytes())
        keys.append(h.digest())
    return keys


def _tensors(state: Any) -> Iterator[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        yield state
    else:
        for part in state:
            yield from _tensors(part)


def state_bytes(state: Any) -> int:
    """Bytes of the data of `state`'s tensors (a tensor, or lists and tuples of them)."""
    return sum(t.numel() * t.element_size() for t in _tensors(state))


def entry_bytes(state: Any) -> int:
    """What keeping `state` costs the cache's budget: its tensors' data, their objects and the entry's own."""
    return ENTRY_OVERHEAD + state_bytes(state) + TENSOR_OVERHEAD * sum(1 for _ in _tensors(state))


class PrefixCache:
    """States by block key, at most `max_bytes` of them (least recently used go first). `copy(state)` makes an
    independent copy of what is stored (the engine updates states in place). With `join` the cache is chained:
    entries are blocks' own KV slices and `join(slices)` makes the state of their tokens. Shared by the batcher
    thread (stores, lookups) and the metrics endpoint (counts): one lock."""

    def __init__(self, max_bytes: int, copy: Callable[[Any], Any], block: int = BLOCK,
                 join: Callable[[list[Any]], Any] | None = None):
        if block < 1 or max_bytes < 0:
            raise ValueError(f"need block >= 1 and max_bytes >= 0, got {block} and {max_bytes}")
        self.max_bytes, self.block, self._copy, self._join = max_bytes, block, copy, join
        self._entries: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hit_tokens = 0  # prompt tokens whose prefill a hit saved
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def prompt_keys(self, ids: Sequence[int]) -> list[bytes]:
        """The keys a prompt can be served from: its full blocks short of its last token (a prompt keeps one token
        to feed, whose logits come next)."""
        return block_keys(ids[: len(ids) - 1], self.block)

    @property
    def chained(self) -> bool:
        """Entries are single blocks' KV slices (a hit needs every block from the first)."""
        return self._join is not None

    def lookup(self, keys: Sequence[bytes], past: int = 0) -> tuple[int, Any]:
        """(k, a new state after the first k tokens) for the longest cached prefix of `keys` (a prompt's
        `prompt_keys`) with k > `past` (the tokens a sequence has already), else (0, None)."""
        with self._lock:
            if self.chained:
                n = 0
                while n < len(keys) and keys[n] in self._entries:
                    n += 1
                if n <= past // self.block:
                    return 0, None
                for key in reversed(keys[:n]):  # the first blocks, which every longer hit needs, go out last
                    self._entries.move_to_end(key)
                self.hit_tokens += n * self.block - past
                slices = [self._entries[key] for key in keys[:n]]
            else:
                for n in range(len(keys), past // self.block, -1):
                    state = self._entries.get(keys[n - 1])
                    if state is not None:
                        self._entries.move_to_end(keys[n - 1])
                        self.hit_tokens += n * self.block - past
                        return n * self.block, self._copy(state)
                return 0, None
        return n * self.block, self._join(slices)  # kept slices are never changed, only dropped: no lock needed

    def store(self, key: bytes, state: Any) -> None:
        """Keep a copy of `state` under `key` (a known key is only marked as recently used)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
        size = entry_bytes(state)
        if size > self.max_bytes:
            return
        snapshot = self._copy(state)
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = snapshot
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= entry_bytes(old)
                self.evictions += 1
