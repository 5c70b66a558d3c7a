"""Safetensors model dirs one tensor group at a time: `SafetensorsDir` reads named tensors from a dir
holding `model.safetensors` or HF-sharded `model-0000k-of-0000n.safetensors` files with their
`model.safetensors.index.json`, opening only the files it needs; `ShardWriter` writes such a sharded dir
one shard at a time and its index last. Block-by-block quantization (`quant.blockwise`) reads one
decoder block and writes one shard per block, so neither side ever holds the whole model.

The index is the HF convention:
    {"metadata": {"total_size": <bytes of all tensors>}, "weight_map": {"<tensor name>": "<shard file>"}}
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mulfree.errors import CheckpointError
from mulfree.models.schema import first_line, read_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def shard_name(k: int, n: int) -> str:
    """The HF name of shard `k` (1-based) of `n`: model-0000k-of-0000n.safetensors."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def weight_map(directory: str | Path) -> dict[str, str]:
    """{tensor name: file name} of a dir's weights, from its index or its single `model.safetensors`.
    Every file the index names must be a plain file name in the dir (CheckpointError otherwise)."""
    directory = Path(directory)
    index = directory / INDEX
    if index.is_file():
        raw = read_json(index, hint="rewrite the model dir with the command that made it")
        mapping = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
            raise CheckpointError(f"{index} has no 'weight_map' object of tensor name -> file",
                                  "rewrite the model dir with the command that made it")
        for name in set(mapping.values()):
            if Path(name).name != name or not name.endswith(".safetensors") or not (directory / name).is_file():
                raise CheckpointError(f"{index} names {name!r}, not a .safetensors file of {directory}",
                                      "pass a complete model dir")
        return dict(mapping)
    single = directory / SINGLE
    if not single.is_file():
        from mulfree.models.pretrained import refuse_pickles

        refuse_pickles(directory)  # pickle weights only: say that they are never loaded
        raise CheckpointError(f"{directory} has neither {SINGLE} nor {INDEX}", "pass a dir of safetensors weights")
    with _open(single) as f:
        return {name: SINGLE for name in f.keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types and OSError
        raise CheckpointError(f"cannot read {path} ({first_line(exc)})", "the file is corrupt or truncated") from None


class SafetensorsDir:
    """The tensors of a safetensors model dir, read by name (`load`) without reading the others.

    Example:
        weights = SafetensorsDir(model_dir)
        block = weights.load([n for n in weights.names if n.startswith("model.layers.3.")])
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = weight_map(self.directory)
        self.names = sorted(self.files)

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: tensor} (cast to `dtype` when given), each file opened once and closed after."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, group in by_file.items():
            with _open(self.directory / file) as f:
                for name in group:
                    t = f.get_tensor(name)
                    out[name] = t if dtype is None or t.dtype == dtype else t.to(dtype)
        return out


class ShardWriter:
    """Write `n` shards into `directory`, one `write` call each, then `finish` the index.

    Tensors that share storage (tied embeddings) are written once, under the first name given.
    """

    def __init__(self, directory: str | Path, n: int, state: dict | None = None):
        """`state`: what `state()` returned after the shards already in `directory`, to continue after them."""
        self.directory, self.n = Path(directory), n
        state = state or {"written": 0, "map": {}, "total": 0}
        self.written, self.map, self.total = int(state["written"]), dict(state["map"]), int(state["total"])

    def state(self) -> dict:
        """The shards written so far (JSON), for a writer that continues after them."""
        return {"written": self.written, "map": self.map, "total": self.total}

    def write(self, tensors: dict[str, torch.Tensor]) -> str:
        """Write the next shard from {name: tensor}; returns its file name."""
        if self.written >= self.n:
            raise ValueError(f"all {self.n} shards are written")
        self.written += 1
        name = shard_name(self.written, self.n)
        seen: set[tuple[int, int]] = set()
        unique = {}
        for key, t in tensors.items():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
            if ident not in seen:
                seen.add(ident)
                unique[key] = t.detach().contiguous()
        save_file(unique, str(self.directory / name), metadata={"format": "pt"})
        self.map.update(dict.fromkeys(unique, name))
        self.total += sum(t.numel() * t.element_size() for t in unique.values())
        return name

    def finish(self) -> list[str]:
        """Write the index once every shard is written; returns the file names (shards, then index)."""
        if self.written != self.n:
            raise ValueError(f"{self.written} of {self.n} shards written")
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [shard_name(k, self.n) for k in range(1, self.n + 1)] + [INDEX]
