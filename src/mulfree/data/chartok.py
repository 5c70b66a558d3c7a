"""Character-level tokenizer for the arithmetic tasks: one id per character, plus pad/bos/eos.

Digits must be single tokens for the positional formats to mean anything (a BPE would merge them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mulfree.atomic import atomic_write_text
from mulfree.errors import CheckpointError, DataError

ARITH_CHARS = "0123456789+*=,:;> "
SPECIALS = ("<pad>", "<bos>", "<eos>")
FILE_NAME = "chartok.json"


class CharTokenizer:
    """Maps each character of `chars` to one id after the special tokens (pad=0, bos=1, eos=2).

    Example: CharTokenizer().encode("1+2=3") -> [1, 4, 13, 5, 15, 6] (bos first).
    """

    def __init__(self, chars: str = ARITH_CHARS):
        if len(set(chars)) != len(chars):
            raise DataError("tokenizer characters repeat", "pass each character once")
        self.chars = chars
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._ids = {ch: i + len(SPECIALS) for i, ch in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        """Number of ids (specials + characters)."""
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of `text`, optionally framed by bos/eos; DataError on a character outside the vocab."""
        try:
            ids = [self._ids[ch] for ch in text]
        except KeyError as exc:
            raise DataError(f"character {exc.args[0]!r} is not in the arithmetic vocabulary",
                            f"use only {self.chars!r}") from None
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of `ids`, stopping at the first eos; pad and bos are dropped."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == self.eos_id:
                break
            if i >= len(SPECIALS):
                out.append(self.chars[i - len(SPECIALS)])
        return "".join(out)

    def save(self, directory: str | Path) -> Path:
        """Write `chartok.json` into directory atomically; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FILE_NAME
        atomic_write_text(path, json.dumps({"type": "char", "specials": list(SPECIALS), "chars": self.chars}))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        """Read `chartok.json` from directory; CheckpointError when missing or malformed."""
        path = Path(directory) / FILE_NAME
        try:
            data = json.loads(path.read_text())
            return cls(data["chars"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read the character tokenizer {path} ({exc})",
                                  "pass a directory written by `mulfree arith train`") from None
