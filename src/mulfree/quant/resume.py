"""Continuing an interrupted block-by-block quantization (`quant.blockwise`).

The walk builds its output in a temp dir named by a digest of its settings (`run_key`). After a finished block
(every block, unless saving would then take more than 1/SAVE_RATIO of the walk's time) it records its progress
there: the shards so far, the calibration stream entering the next block (one file per stream:
`stream-<blocks>-inputs.bin`, and `...-fp_inputs.bin` with asymmetric calibration) and, written last,
`resume.json` naming them. A run with the same settings finds that record, drops what was written after it, and
continues with the next block: the stream, the shards and the method's layer count are exactly those an
uninterrupted run has at that point, so the output is the same, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mulfree.atomic import atomic_write_json
from mulfree.quant.spill import TensorFile
from mulfree.quant.stream import CalibrationStream

RECORD = "resume.json"
SAVE_RATIO = 20  # a block's progress is saved once the time since the last save is this many times what it took
STREAMS = ("inputs", "fp_inputs")  # the CalibrationStream attributes kept


def run_key(*parts: Any) -> str:
    """A sha256 hex digest of `parts` (JSON, tensors by dtype, shape and bytes): equal only for equal settings."""

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous().cpu()
            return [str(t.dtype), list(t.shape), hashlib.sha256(t.view(-1).view(torch.uint8).numpy()).hexdigest()]
        return str(value)

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=plain).encode()).hexdigest()


@dataclass
class Progress:
    """What `resume.json` records: the run's full key, the blocks finished, their layers' metas, the shard
    writer's state and, per kept stream, its file and entries."""

    key: str
    blocks: int
    metas: dict
    shards: dict
    streams: dict

    def files(self) -> set[str]:
        """The files of the temp dir this record needs."""
        return {RECORD, *self.shards["map"].values(), *(s["file"] for s in self.streams.values())}


def load(tmp: Path, key: str) -> Progress | None:
    """The progress a killed run with `key` left in `tmp`, or None (nothing left, other settings, a broken record:
    then the walk starts over). Files in `tmp` the record does not name are removed either way."""
    progress = None
    try:
        raw = json.loads((tmp / RECORD).read_text()) if (tmp / RECORD).is_file() else None
        progress = Progress(**raw) if isinstance(raw, dict) and raw.get("key") == key else None
        if progress is not None:
            for kept in progress.streams.values():  # each stream file holds what its entries say
                TensorFile.reopen(tmp / kept["file"], kept["entries"]).close()
            if not all((tmp / name).is_file() for name in progress.files()):
                raise OSError("a file it names is missing")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        progress = None
        print(f"note: cannot continue from {tmp / RECORD} ({exc}); starting over", file=sys.stderr)
    keep = progress.files() if progress is not None else set()
    for entry in tmp.iterdir():
        if entry.name not in keep and entry.is_file():
            entry.unlink()
    return progress


def restore(tmp: Path, progress: Progress, stream: CalibrationStream | None) -> None:
    """Put the kept hidden states into `stream` (just built at block 0, whose other arguments it keeps)."""
    if stream is None:
        return
    for attr, kept in progress.streams.items():
        hidden = TensorFile.reopen(tmp / kept["file"], kept["entries"])
        setattr(stream, attr, stream.inputs.with_hidden(stream.keep(iter(hidden))))
        hidden.close()


def save(tmp: Path, progress: Progress, stream: CalibrationStream | None) -> None:
    """Record `progress` (its `streams` filled here from `stream`), then remove the files of the record before."""
    old = [kept["file"] for kept in progress.streams.values()]
    progress.streams = {}
    if stream is not None:
        for attr in STREAMS[: 1 + stream.asymmetric]:
            name = f"stream-{progress.blocks}-{attr}.bin"
            hidden = TensorFile(tmp, getattr(stream, attr).hidden, name=name)
            progress.streams[attr] = {"file": name, "entries": hidden.entries()}
            hidden.close()
    atomic_write_json(tmp / RECORD, asdict(progress), indent=None)
    for name in old:
        (tmp / name).unlink(missing_ok=True)


def finish(tmp: Path, progress: Progress) -> None:
    """Remove the record and the kept streams (the walk is complete)."""
    for kept in progress.streams.values():
        (tmp / kept["file"]).unlink(missing_ok=True)
    (tmp / RECORD).unlink(missing_ok=True)
