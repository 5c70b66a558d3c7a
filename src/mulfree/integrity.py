"""Payload checksums: every file a writer produces is hashed (xxh3-64, ~10 GB/s) into `checksums.json`
beside it, written last, and every loader verifies the files it reads against it, so a bit flip or a
truncation is reported as one line naming the file instead of loading silently.

Example:
    write_manifest(out_dir, ["model.safetensors", "tokenizer.json"])
    verify(out_dir, ["model.safetensors"])      # CheckpointError if a recorded file changed
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import xxhash

from mulfree.atomic import atomic_write_text
from mulfree.errors import CheckpointError
from mulfree.models.schema import read_json

MANIFEST = "checksums.json"
ALGORITHM = "xxh3-64"
_CHUNK = 8 << 20


def digest_bytes(data: bytes | memoryview) -> str:
    """`xxh3-64:<16 hex digits>` of a byte string."""
    return f"{ALGORITHM}:{xxhash.xxh3_64_hexdigest(data)}"


def digest_file(path: str | Path) -> str:
    """`xxh3-64:<16 hex digits>` of a file, read in 8 MiB pieces (bounded memory for any size)."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return f"{ALGORITHM}:{h.hexdigest()}"


def read_manifest(directory: str | Path) -> dict[str, str] | None:
    """The recorded digests of a directory, or None when it has no manifest (written before checksums)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    data = read_json(path, hint="rewrite the directory with the command that made it")
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise CheckpointError(f"{path} is not a JSON object of file name -> digest",
                              "rewrite the directory with the command that made it")
    return data


def write_manifest(directory: str | Path, names: Iterable[str]) -> None:
    """Record the digests of `names` (files in `directory`), merged into any existing manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory) or {}
    manifest.update({name: digest_file(directory / name) for name in names})
    atomic_write_text(directory / MANIFEST, json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")


def verify(directory: str | Path, names: Iterable[str]) -> None:
    """Check `names` against the manifest of `directory`; files it does not record are not checked (a
    directory written before checksums has no manifest at all)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return
    for name in names:
        if name not in manifest:
            continue
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing", "pass a complete directory")
        if digest_file(path) != manifest[name]:
            raise CheckpointError(f"{path} does not match its checksum in {MANIFEST} (corrupt or truncated)",
                                  "restore the file or rewrite the directory with the command that made it")
