"""Token shards: a corpus larger than memory, tokenized once into flat memory-mapped files that training
samples windows from (`mulfree tokenize`, `mulfree train --shards`).

Inputs are text files (read in ~1 MiB pieces cut after a newline, so a file never sits in memory whole),
JSON Lines files (one document per line, its "text" field) and local Hugging Face `datasets` dirs
(`datasets.load_from_disk`, the "text" column; the "train" split of a dataset dict). Every document (a
whole text file, a JSON line, a dataset row) ends with the tokenizer's end-of-text id.

Output dir: `shard-00000.bin`, ... (little-endian uint16 tokens, uint32 when the vocabulary needs it),
`index.json` (dtype, tokens per shard, end-of-text id, the sources), the tokenizer (`tokenizer.json`) and
`checksums.json`. The dir is built beside `out` as `.<name>.partial` and renamed into place at the end;
a shard is written whole (atomically) and then recorded in `progress.json` with the position it reached,
so a killed run started again with the same command resumes after the last shard it completed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mulfree import integrity
from mulfree.atomic import (
    atomic_write,
    atomic_write_json,
    exclusive,
    prepare_output,
    remove_entry,
    replace_dir,
)
from mulfree.data.text import decode_utf8
from mulfree.errors import DataError

PIECE_BYTES = 1 << 20  # text files are read and tokenized in pieces of about this size
INDEX = "index.json"
PROGRESS = "progress.json"


@dataclass(frozen=True)
class Unit:
    """One tokenization unit: source `source`, unit number `number` in it, its text, whether a document ends
    with it, and the input bytes it covers (for the progress bar)."""

    source: int
    number: int
    text: str
    ends_document: bool
    size: int


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def sources(paths: list[str]) -> list[Path]:
    """The input files and dataset dirs: files as given, dataset dirs as given, other dirs' *.txt / *.jsonl."""
    out: list[Path] = []
    for p in map(Path, paths):
        if _is_dataset_dir(p) or p.is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
            if not found:
                raise DataError(f"directory '{p}' has no .txt or .jsonl files and is not a datasets dir",
                                "pass text / JSONL files, a folder of them or a `save_to_disk` dir")
            out.extend(found)
        else:
            raise DataError(f"data path '{p}' does not exist", "check the paths passed to --data")
    return out


def _text_pieces(path: Path) -> Iterator[tuple[str, int]]:
    """(text, bytes) pieces of a UTF-8 text file, each ending after a newline (the last at the file's end)."""
    with path.open("rb") as f:
        carry, offset = b"", 0
        while True:
            block = f.read(PIECE_BYTES)
            data = carry + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if cut == 0 and block:
                carry = data  # no newline yet: keep reading
                continue
            piece, carry = data[:cut], data[cut:]
            if piece:
                yield decode_utf8(piece, path, offset), len(piece)
                offset += len(piece)
            if not block:
                return


def _jsonl_documents(path: Path) -> Iterator[tuple[str, int]]:
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataError(f"{path}:{line_no} is not a JSON object", "write one JSON object per line") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_no} has no string field \"text\"", "give every line a \"text\" string")
            yield text, len(line)


def _dataset_documents(path: Path) -> Iterator[tuple[str, int]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"cannot load the datasets dir '{path}' ({exc})", "pass a dir written by save_to_disk") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(f"datasets dir '{path}' has no 'train' split", "save the split to tokenize")
        data = data["train"]
    if "text" not in data.column_names:
        raise DataError(f"datasets dir '{path}' has no 'text' column", f"its columns: {', '.join(data.column_names)}")
    for batch in data.iter(batch_size=1024):
        for text in batch["text"]:
            if not isinstance(text, str):
                raise DataError(f"datasets dir '{path}' has a non-string 'text' value", "store text as strings")
            yield text, len(text.encode("utf-8"))


def units(paths: list[Path]) -> Iterator[Unit]:
    """Every tokenization unit of the sources, in order (see the module docstring)."""
    for s, path in enumerate(paths):
        if _is_dataset_dir(path):
            for n, (text, size) in enumerate(_dataset_documents(path)):
                yield Unit(s, n, text, True, size)
        elif path.suffix == ".jsonl":
            for n, (text, size) in enumerate(_jsonl_documents(path)):
                yield Unit(s, n, text, True, size)
        else:
            pieces = _text_pieces(path)
            previous = next(pieces, None)
            n = 0
            while previous is not None:
                following = next(pieces, None)
                yield Unit(s, n, previous[0], following is None, previous[1])
                previous, n = following, n + 1


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _fingerprint(paths: list[Path], tokenizer_json: str) -> dict:
    """What a resumed run must match: the sources (path, size, mtime) and the tokenizer."""
    files = [{"path": str(p.resolve()), "bytes": _size(p), "mtime_ns": p.stat().st_mtime_ns} for p in paths]
    return {"sources": files, "tokenizer": integrity.digest_bytes(tokenizer_json.encode())}


def tokenize_corpus(paths: list[str], tokenizer, out: str | Path, shard_tokens: int = 1 << 26,
                    overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize the sources into shards in `out` (see the module docstring); returns the index.

    `tokenizer` is a `tokenizers.Tokenizer` with an end-of-text token; a shard closes at the first unit
    boundary after `shard_tokens` tokens. Example: `tokenize_corpus(["books/"], tok, "shards/")`.
    """
    from mulfree.data.text import eos_token_id

    if shard_tokens < 1:
        raise DataError(f"shard size must be at least 1 token, got {shard_tokens}", "pass a positive --shard-tokens")
    out = prepare_output(out, "token shard", overwrite)
    files = sources(paths)
    eot = eos_token_id(tokenizer)
    if eot is None:
        raise DataError("the tokenizer has no end-of-text token", "use a tokenizer trained by mulfree (<|endoftext|>)")
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    work = out.parent / f".{out.name}.partial"
    expect = {**_fingerprint(files, tokenizer.to_str()), "shard_tokens": shard_tokens}
    with exclusive(work, "token shards"):  # one writer at a time: a second run of the same command is refused
        state = _resume_state(work, expect, overwrite)
        shards: list[dict] = state["shards"]
        skip = tuple(state["next"])
        total = sum(f["bytes"] for f in expect["sources"])
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
        buffer: list[np.ndarray] = []
        count = 0
        def pending() -> Iterator[Unit]:  # the units after the last shard an interrupted run completed
            for u in units(files):
                if (u.source, u.number) < skip:
                    bar.update(u.size)
                else:
                    yield u

        for batch in _batches(pending()):
            for unit, encoding in zip(batch, tokenizer.encode_batch([u.text for u in batch])):  # all cores
                bar.update(unit.size)
                ids = encoding.ids + ([eot] if unit.ends_document else [])
                buffer.append(np.asarray(ids, dtype=dtype))
                count += len(ids)
                if count >= shard_tokens:
                    _write_shard(work, shards, buffer, count, expect, (unit.source, unit.number + 1))
                    buffer, count = [], 0
        if count:
            _write_shard(work, shards, buffer, count, expect, (len(files), 0))
        bar.close()
        index = {"dtype": np.dtype(dtype).name, "vocab_size": vocab, "eot_id": eot,
                 "tokens": sum(s["tokens"] for s in shards), "shards": shards, "sources": expect["sources"]}
        if not shards:
            raise DataError("the sources hold no text", "pass non-empty files")
        atomic_write_json(work / INDEX, index)
        tokenizer.save(str(work / "tokenizer.json"))
        integrity.write_manifest(work, [INDEX, "tokenizer.json"] + [s["file"] for s in shards])
        replace_dir(work, out, overwrite, "token shard")
        (out / PROGRESS).unlink()
    return index


def _batches(items: Iterator[Unit], max_bytes: int = 8 * PIECE_BYTES) -> Iterator[list[Unit]]:
    """Units in lists of about `max_bytes` of text, for `encode_batch` (the same ids as one `encode` each)."""
    batch: list[Unit] = []
    size = 0
    for item in items:
        batch.append(item)
        size += item.size
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _resume_state(work: Path, expect: dict, overwrite: bool) -> dict:
    """The progress of an interrupted run in `work` (held by this run) with the same sources and tokenizer, else a
    fresh start."""
    fresh = {"shards": [], "next": [0, 0]}
    entries = list(work.iterdir())
    if entries:
        try:
            saved = json.loads((work / PROGRESS).read_text())
        except (OSError, json.JSONDecodeError):
            saved = None
        if isinstance(saved, dict) and all(saved.get(k) == v for k, v in expect.items()):
            return {"shards": saved["shards"], "next": saved["next"]}
        if not overwrite:
            raise DataError(f"'{work}' holds an interrupted tokenize run of other sources or another tokenizer",
                            "run that command again to finish it, or pass --overwrite to start over")
        for entry in entries:
            remove_entry(entry, ignore_errors=False)
    atomic_write_json(work / PROGRESS, {**expect, **fresh})
    return fresh


def _write_shard(work: Path, shards: list[dict], buffer: list[np.ndarray], count: int, expect: dict,
                 next_unit: tuple[int, int]) -> None:
    name = f"shard-{len(shards):05d}.bin"
    atomic_write(work / name, lambda tmp: np.concatenate(buffer).tofile(tmp))
    shards.append({"file": name, "tokens": count})
    atomic_write_json(work / PROGRESS, {**expect, "shards": shards, "next": list(next_unit)})


class ShardWindows:
    """Random training windows from a shard dir: memory-mapped shards, a window start drawn uniformly over
    all windows that fit in one shard. Callable as a `train.BatchFn`."""

    def __init__(self, directory: str | Path, batch_size: int, seq_len: int):
        directory = Path(directory)
        self.index = index = read_index(directory)
        dtype = np.dtype(index["dtype"])
        self.shards = [np.memmap(directory / s["file"], dtype=dtype, mode="r") for s in index["shards"]]
        self.batch_size, self.seq_len = batch_size, seq_len
        fits = torch.tensor([max(0, len(s) - seq_len) for s in self.shards], dtype=torch.float64)
        if fits.sum() == 0:
            raise DataError(f"no shard in '{directory}' holds seq_len + 1 = {seq_len + 1} tokens",
                            "tokenize more text, raise --shard-tokens or lower --seq-len")
        self.weights = fits

    def __call__(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=generator)
        rows = []
        for s in picks.tolist():
            start = int(torch.randint(0, int(self.weights[s]), (1,), generator=generator))
            rows.append(torch.from_numpy(self.shards[s][start : start + self.seq_len + 1].astype(np.int64)))
        chunk = torch.stack(rows)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def read_index(directory: str | Path) -> dict:
    """The checked index of a shard dir (checksums verified: a truncated or altered shard is a DataError)."""
    directory = Path(directory)
    if not (directory / INDEX).is_file():
        raise DataError(f"'{directory}' is not a token shard dir (no {INDEX})", "make one with `mulfree tokenize`")
    index = json.loads((directory / INDEX).read_text())
    integrity.verify(directory, [INDEX, "tokenizer.json"] + [s["file"] for s in index["shards"]])
    return index
