"""Calibration activations kept on disk once they outgrow a memory budget: `Spill.keep` holds a stream of
tensors in a list while their total stays under `threshold` bytes and otherwise writes them, in order, to
one scratch file that `TensorFile` reads back one tensor at a time.

Reads go through `readinto` into a fresh tensor (not a memory map), so a tensor read back is ordinary
memory freed with it: the resident set holds the tensors in use, not the file. The scratch file is
unlinked as soon as it is open, so nothing is left behind, whatever ends the process.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

SPILL_BYTES = 256 << 20  # activations above this total go to a scratch file


class TensorFile(Sequence[torch.Tensor]):
    """The tensors of `tensors` (and any `append`ed later), written to an unlinked scratch file in `directory`
    (or, with `name`, to the file of that name there, which stays: `entries` and `reopen` read it again later);
    `self[i]` reads tensor i back (a new CPU tensor of the same shape and dtype)."""

    def __init__(self, directory: str | Path, tensors: Iterable[torch.Tensor] = (), name: str | None = None):
        if name is None:
            fd, path = tempfile.mkstemp(prefix=".activations.", suffix=".tmp", dir=directory)
            os.unlink(path)
            self._file = os.fdopen(fd, "w+b")
        else:
            self._file = open(Path(directory) / name, "w+b")  # noqa: SIM115 - held for the object's life
        self._entries: list[tuple[int, tuple[int, ...], torch.dtype]] = []
        self._end = 0
        for t in tensors:
            self.append(t)

    @classmethod
    def reopen(cls, path: str | Path, entries: list[list]) -> TensorFile:
        """The named file `path` written earlier, with the `entries` it reported then; OSError / ValueError when
        the file is shorter than they say or names an unknown dtype."""
        self = cls.__new__(cls)
        self._file = open(path, "rb")  # noqa: SIM115 - held for the object's life
        self._entries = [(int(offset), tuple(int(d) for d in shape), getattr(torch, dtype))
                         for offset, shape, dtype in entries]
        if not all(isinstance(dt, torch.dtype) for _, _, dt in self._entries):
            raise ValueError(f"{path}: an entry names an unknown dtype")
        self._end = os.fstat(self._file.fileno()).st_size
        need = max((o + torch.Size(sh).numel() * torch.empty((), dtype=dt).element_size()
                    for o, sh, dt in self._entries), default=0)
        if need > self._end:
            raise OSError(f"{path} holds {self._end} bytes, its entries need {need}")
        return self

    def entries(self) -> list[list]:
        """[offset, shape, dtype name] of every tensor held, as JSON (for `reopen`); the file is synced to disk."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return [[offset, list(shape), str(dtype).removeprefix("torch.")] for offset, shape, dtype in self._entries]

    def close(self) -> None:
        self._file.close()

    def append(self, t: torch.Tensor) -> None:
        """Write `t` after the tensors already held."""
        t = t.detach().contiguous().cpu()
        self._file.seek(self._end)
        self._file.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._file.flush()
        self._entries.append((self._end, tuple(t.shape), t.dtype))
        self._end += t.numel() * t.element_size()

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        offset, shape, dtype = self._entries[i]
        t = torch.empty(shape, dtype=dtype)
        self._file.seek(offset)
        view = memoryview(t.view(-1).view(torch.uint8).numpy())
        if self._file.readinto(view) != len(view):
            raise OSError(f"scratch activation file ended early at tensor {i}")
        return t

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))


class Spill:
    """Where and from what size `keep` moves a stream of activations to disk."""

    def __init__(self, directory: str | Path, threshold: int = SPILL_BYTES):
        self.directory, self.threshold = Path(directory), threshold

    def keep(self, tensors: Iterable[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Every tensor of `tensors`, in order: a list when their total stays within `threshold`
        bytes, else a `TensorFile` (the tensors already held are written first, then released)."""
        sink = Sink(self)
        for t in tensors:
            sink.append(t)
        return sink.kept()


class Sink:
    """Tensors handed over one at a time and kept as `spill.keep` keeps a stream (all in memory when `spill` is
    None): for passes that produce several streams at once."""

    def __init__(self, spill: Spill | None):
        self._spill = spill
        self._held: list[torch.Tensor] = []
        self._size = 0
        self._file: TensorFile | None = None

    def append(self, t: torch.Tensor) -> None:
        if self._file is not None:
            self._file.append(t)
            return
        self._held.append(t)
        self._size += t.numel() * t.element_size()
        if self._spill is not None and self._size > self._spill.threshold:
            self._file = TensorFile(self._spill.directory, _drain(self._held))

    def kept(self) -> Sequence[torch.Tensor]:
        """The tensors appended so far: a list, or the scratch file once they outgrew the threshold."""
        return self._file if self._file is not None else self._held


def _drain(held: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The tensors of `held` in order, each removed from it as it is read (freed once written)."""
    held.reverse()
    while held:
        yield held.pop()
