"""1.6-bit packed dirs (`mulfree pack --format t1`): truncated weights, lying safetensors headers (re-signed, so the
checks behind the checksums have to catch them), a config whose format does not match its weights, unknown formats
and versions. Each case packs its own t1 dir from the `{model}` fixture first (`damage.py` does the damage)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from hostile import Case
from hostile import damage as d

GEN_T1 = ("generate", "--engine", "packed", "--model", "{tmp}/t1", "--prompt", "x", "--max-new-tokens", "1")
GEN_T2 = ("generate", "--engine", "packed", "--model", "{tmp}/packed", "--prompt", "x", "--max-new-tokens", "1")
PACKED_FILES = ["config.json", "model.safetensors", "tokenizer.json"]


def pack_t1(tmp: Path) -> None:
    """`mulfree pack --format t1` of the case's copy of the model into {tmp}/t1."""
    from mulfree.cli import main

    assert main(["pack", "--model", str(tmp / "model"), "--out", str(tmp / "t1"), "--format", "t1"]) == 0


def resign(rel: str):
    """Record the packed dir's current weights as good: the config's CRC-32, then checksums.json (so a lie in the
    weights file gets past both and has to be caught by what reads it)."""
    def setup(tmp: Path) -> None:
        from mulfree.integrity import write_manifest

        cfg_path = tmp / rel / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["crc32"] = zlib.crc32((tmp / rel / "model.safetensors").read_bytes())
        cfg_path.write_text(json.dumps(cfg))
        write_manifest(tmp / rel, PACKED_FILES)

    return setup


def _packed_entry(header: dict) -> dict:
    return next(v for k, v in sorted(header.items()) if k.endswith(".packed"))


def _swap_packed_dims(header: dict) -> None:
    """A .packed tensor that claims [Kpad*4/5, groups] instead of [groups, Kpad*4/5] (the same byte count)."""
    entry = _packed_entry(header)
    entry["shape"] = entry["shape"][::-1]


def _packed_beyond_file(header: dict) -> None:
    """A .packed tensor whose bytes would end 1 MiB past the end of the file."""
    entry = _packed_entry(header)
    entry["data_offsets"][1] += 1 << 20


T1 = ("model",)
CASES = [
    Case("t1-weights-truncated", "a t1 packed dir's model.safetensors cut in half", GEN_T1, "checksum", copy=T1,
         setup=d.chain(pack_t1, d.truncate("t1/model.safetensors", 0.5))),
    Case("t1-weights-truncated-no-manifest", "the same without checksums.json (the CRC-32 catches it)", GEN_T1,
         "CRC-32 mismatch", copy=T1,
         setup=d.chain(pack_t1, d.truncate("t1/model.safetensors", 0.5), d.delete("t1/checksums.json"))),
    Case("t1-weights-truncated-resigned", "t1 weights cut to 7 bytes, CRC-32 and checksums recomputed", GEN_T1,
         "cannot read", copy=T1, setup=d.chain(pack_t1, d.truncate("t1/model.safetensors", 7), resign("t1"))),
    Case("t1-header-shape-lie", "a t1 .packed tensor whose header swaps its two dims (re-signed)", GEN_T1,
         "the config of format mulfree-t1 expects", copy=T1,
         setup=d.chain(pack_t1, d.st_header("t1/model.safetensors", _swap_packed_dims), resign("t1"))),
    Case("t1-header-beyond-file", "a t1 .packed tensor whose offsets run past the file end (re-signed)", GEN_T1,
         "cannot read", copy=T1,
         setup=d.chain(pack_t1, d.st_header("t1/model.safetensors", _packed_beyond_file), resign("t1"))),
    Case("t1-format-on-t2-weights", "format: mulfree-t1 in the config of 2-bit weights (re-signed)", GEN_T2,
         "of format mulfree-t1 expects", copy=("packed",),
         setup=d.chain(d.set_json("packed/config.json", format="mulfree-t1"), resign("packed"))),
    Case("t2-format-on-t1-weights", "format: mulfree-t2 in the config of 1.6-bit weights (re-signed)", GEN_T1,
         "of format mulfree-t2 expects", copy=T1,
         setup=d.chain(pack_t1, d.set_json("t1/config.json", format="mulfree-t2"), resign("t1"))),
    Case("t1-version-2", "format_version: 2 in a t1 dir", GEN_T1, "format_version 2 of mulfree-t1", copy=T1,
         setup=d.chain(pack_t1, d.set_json("t1/config.json", format_version=2))),
    Case("t1-format-unknown", 'format: "mulfree-t3"', GEN_T1, "unknown format", copy=T1,
         setup=d.chain(pack_t1, d.set_json("t1/config.json", format="mulfree-t3"))),
    Case("pack-format-unknown", "pack --format t3", ("pack", "--model", "{model}", "--out", "{tmp}/o", "--format", "t3"),
         "invalid choice"),
]
