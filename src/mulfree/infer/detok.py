"""Incremental detokenization with stop strings: text is released only once it can no longer turn out to
be the start of a stop string, so a stream never shows part of a stop string the final text omits."""

from __future__ import annotations

from typing import Any

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: holdback of incomplete UTF-8 below
    DecodeStream = None


class ChoiceText:
    """The text of one choice as its tokens arrive. `used` counts the tokens the text is made of."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tok = tokenizer
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.used = 0
        self.finish: str | None = None
        self._stream = DecodeStream(skip_special_tokens=True) if DecodeStream is not None else None
        self._ids: list[int] = []  # fallback only
        self._all: list[int] = []  # every token fed, for `flush`

    def _piece(self, token: int) -> str:
        if self._stream is not None:
            return self._stream.step(self.tok, token) or ""
        self._ids.append(token)
        full = self.tok.decode(self._ids)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            return ""
        piece, self._ids = full, []
        return piece

    def feed(self, token: int) -> None:
        """Add one token; a stop string ends the text (finish 'stop') and later tokens are ignored."""
        if self.finish is not None:
            return
        self.used += 1
        self._all.append(token)
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += self._piece(token)
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.finish = self.text[: min(hits)], "stop"

    def flush(self, reason: str) -> None:
        """The tokens ended (`reason`: length / stop): bytes still held back as incomplete UTF-8 become text
        the way a full decode renders them (U+FFFD)."""
        if self.finish is not None:
            return
        full = self.tok.decode(self._all)
        if full.startswith(self.text) and len(full) > len(self.text):
            tail_from = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
            self.text = full
            hits = [i for s in self.stops if (i := self.text.find(s, tail_from)) >= 0]
            if hits:
                self.text, reason = self.text[: min(hits)], "stop"
        self.finish = reason

    def _holdback(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        for n in range(min(len(self.text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stops):
                return n
        return 0

    def ready(self) -> str:
        """The text not sent yet that is safe to send now (all of it once finished)."""
        end = len(self.text) if self.finish is not None else len(self.text) - self._holdback()
        chunk = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return chunk
