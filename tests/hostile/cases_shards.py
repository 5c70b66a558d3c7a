"""Hostile inputs of `mulfree tokenize` and `mulfree train --shards`: bad JSON lines, non-UTF-8 text, missing
paths, zero or huge shard sizes, outputs over models, damaged and truncated shard dirs."""

from __future__ import annotations

import json
from pathlib import Path

from hostile import Case

BIG = str(2**70)


def _tokenize(*flags: str, data: str = "{data}", out: str = "{tmp}/shards") -> tuple[str, ...]:
    return ("tokenize", "--data", data, "--out", out, "--vocab-size", "300", "--no-progress", *flags)


def _write(name: str, content: bytes):
    def setup(tmp: Path) -> None:
        (tmp / name).write_bytes(content)

    return setup


def _shards(tmp: Path) -> Path:
    """A real shard dir in `tmp` (made through the command itself)."""
    from mulfree.cli import main

    (tmp / "t.txt").write_text("To be, or not to be, that is the question.\n" * 400)
    main(["tokenize", "--data", str(tmp / "t.txt"), "--out", str(tmp / "shards"), "--vocab-size", "300",
          "--no-progress"])
    return tmp / "shards"


def _truncate_shard(tmp: Path) -> None:
    shard = _shards(tmp) / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:100])


def _lying_index(tmp: Path) -> None:
    index = _shards(tmp) / "index.json"
    data = json.loads(index.read_text())
    data["shards"][0]["tokens"] = 10**12
    index.write_text(json.dumps(data))


_TRAIN = ("train", "--shards", "{tmp}/shards", "--out", "{tmp}/run", "--steps", "1", "--no-progress")

CASES = [
    Case("tok-jsonl-bad-line", "a JSON Lines file with a line that is not JSON", _tokenize(data="{tmp}/c.jsonl"),
         "c.jsonl:2 is not a JSON object", setup=_write("c.jsonl", b'{"text": "ok"}\n{oops\n')),
    Case("tok-jsonl-no-text", "a JSON line without a \"text\" string", _tokenize(data="{tmp}/c.jsonl"),
         "has no string field", setup=_write("c.jsonl", b'{"text": 5}\n')),
    Case("tok-not-utf8", "a text file of invalid UTF-8", _tokenize(data="{tmp}/c.txt"), "is not UTF-8",
         setup=_write("c.txt", b"\xff\xfe\xfa" * 100)),
    Case("eval-data-not-utf8", "eval --data: a text file of invalid UTF-8 (was scored as replacement characters)",
         ("eval", "--model", "{model}", "--data", "{tmp}/c.txt"), "is not UTF-8 text (invalid start byte at byte 6)",
         setup=_write("c.txt", b"To be \xff\xfe\xfa" * 100)),
    Case("train-data-not-utf8", "train --data: a text file of invalid UTF-8 (was trained on as replacement characters)",
         ("train", "--data", "{tmp}/c.txt", "--out", "{tmp}/out", "--steps", "1", "--no-progress"), "is not UTF-8",
         setup=_write("c.txt", b"\xff\xfe\xfa" * 100)),
    Case("generate-prompt-file-not-utf8", "generate --prompt-file: a file of invalid UTF-8",
         ("generate", "--model", "{model}", "--prompt-file", "{tmp}/c.txt"), "is not UTF-8 text (invalid start byte at byte 6)",
         setup=_write("c.txt", b"To be \xff\xfe")),
    Case("generate-prompt-file-endless", "generate --prompt-file /dev/zero (a source that never ends)",
         ("generate", "--model", "{model}", "--prompt-file", "/dev/zero"), "holds more than 16 MiB"),
    Case("generate-prompt-file-dir", "generate --prompt-file: a directory",
         ("generate", "--model", "{model}", "--prompt-file", "{tmp}"), "(Is a directory)"),
    Case("generate-prompt-and-file", "generate --prompt and --prompt-file together",
         ("generate", "--model", "{model}", "--prompt", "x", "--prompt-file", "{tmp}"), "not allowed with argument"),
    Case("tok-empty-text", "an empty text file", _tokenize(data="{tmp}/c.txt"), "empty", setup=_write("c.txt", b"")),
    Case("tok-missing", "a data path that does not exist", _tokenize(data="{tmp}/nowhere"), "does not exist"),
    Case("tok-shard-zero", "--shard-tokens 0", _tokenize("--shard-tokens", "0"), "--shard-tokens"),
    Case("tok-shard-huge", "--shard-tokens 2^70", _tokenize("--shard-tokens", BIG), "--shard-tokens"),
    Case("tok-vocab-tiny", "--vocab-size 3", _tokenize("--vocab-size", "3"), "--vocab-size"),
    Case("tok-out-model", "--out over a model dir", _tokenize(out="{model}"), "already holds"),
    Case("tok-out-cwd", "--out .", _tokenize(out="."), "current directory"),
    Case("tok-plays", "a folder of plays", _tokenize(), None),
    Case("shards-not-a-dir", "train --shards naming a text folder", _TRAIN[:2] + ("{data}",) + _TRAIN[3:],
         "not a token shard dir"),
    Case("shards-truncated", "train --shards with a truncated shard file", _TRAIN, "checksum",
         setup=_truncate_shard),
    Case("shards-lying-index", "train --shards whose index.json claims 10^12 tokens", _TRAIN, "checksum",
         setup=_lying_index),
]
