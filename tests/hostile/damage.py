"""Ways to damage the files of a model dir for the hostile-input cases (`cases_loaders.py`, `cases_tools.py`):
each function returns a `setup(tmp)` that writes, edits, truncates, bit-flips or deletes a file under `{tmp}`;
`qdir(...)` first copies in a tiny quantized dir (RTN 4-bit of a random one-layer Llama, built once per process)
or, with name="hf", its plain Hugging Face source."""

from __future__ import annotations

import atexit
import json
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json"]


def chain(*setups):
    def setup(tmp: Path) -> None:
        for s in setups:
            s(tmp)

    return setup


def write(rel: str, data: bytes | str):
    def setup(tmp: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def set_json(rel: str, drop: tuple[str, ...] = (), **changes):
    """Set (or with `drop`, remove) top-level fields of a JSON file."""
    def setup(tmp: Path) -> None:
        path = tmp / rel
        data = json.loads(path.read_text())
        data.update(changes)
        for key in drop:
            data.pop(key, None)
        path.write_text(json.dumps(data))

    return setup


def edit_json(rel: str, edit):
    def setup(tmp: Path) -> None:
        path = tmp / rel
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return setup


def manifest(rel: str = "model", names=MODEL_FILES):
    """Record checksums as `save_model` does (the fixtures predate them)."""
    def setup(tmp: Path) -> None:
        from mulfree.integrity import write_manifest

        write_manifest(tmp / rel, names)

    return setup


def flip(rel: str, offset: int = -5, bit: int = 0):
    def setup(tmp: Path) -> None:
        path = tmp / rel
        data = bytearray(path.read_bytes())
        data[offset] ^= 1 << bit
        path.write_bytes(bytes(data))

    return setup


def truncate(rel: str, keep: float):
    def setup(tmp: Path) -> None:
        path = tmp / rel
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])

    return setup


def st_header(rel: str, edit):
    """Rewrite a safetensors header (JSON after an 8-byte length), keeping the payload."""
    def setup(tmp: Path) -> None:
        path = tmp / rel
        raw = path.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        edit(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])

    return setup


def first_tensor(header: dict, ndim: int = 1) -> dict:
    return next(v for k, v in sorted(header.items()) if k != "__metadata__" and len(v["shape"]) >= ndim)


def st_drop(rel: str, suffix: str):
    """Rewrite a safetensors file without its first tensor whose name ends in `suffix`."""
    def setup(tmp: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(tmp / rel))
        tensors.pop(next(k for k in sorted(tensors) if k.endswith(suffix)))
        save_file(tensors, str(tmp / rel))

    return setup


def nan_first_weight(rel: str):
    """Overwrite the first float of the payload with NaN (the checksum-free way a bit flip can show)."""
    def setup(tmp: Path) -> None:
        path = tmp / rel
        raw = bytearray(path.read_bytes())
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        name = next(k for k, v in sorted(header.items()) if k != "__metadata__" and v["dtype"] == "F32")
        start = 8 + n + header[name]["data_offsets"][0]
        raw[start : start + 4] = struct.pack("<f", float("nan"))
        path.write_bytes(bytes(raw))

    return setup


def delete(rel: str):
    def setup(tmp: Path) -> None:
        (tmp / rel).unlink()

    return setup


class Evil:
    """A pickle that ends the process with exit code 0 if anything ever unpickles it."""

    def __reduce__(self):
        return (exec, ("raise SystemExit(0)",))


EVIL = pickle.dumps(Evil())


def tokenizer_extra_id(rel: str, token_id: int):
    """Give a tokenizer.json's BPE vocabulary one more token, with id `token_id`."""
    return edit_json(rel, lambda d: d["model"]["vocab"].update({"<|evil|>": token_id}))


# ---- a tiny quantized dir (RTN 4-bit over a random one-layer Llama), built once per process ------------------
_BUILT: dict[str, Path] = {}


def tiny_hf_root() -> Path:
    if "root" not in _BUILT:
        import torch
        import transformers

        from mulfree.data.text import train_tokenizer
        from mulfree.quant.rtn import RTN
        from mulfree.quant.walker import quantize_model, save_quantized

        root = Path(tempfile.mkdtemp(prefix="mulfree-hostile-"))
        atexit.register(shutil.rmtree, root, True)
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer("to be or not to be " * 50, 300))
        cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        model.save_pretrained(root / "hf")
        tok.save_pretrained(root / "hf")
        method = RTN(4, 16)
        save_quantized(model, tok, root / "q", method, quantize_model(model, method, progress=False), {})
        _BUILT["root"] = root
    return _BUILT["root"]


def qdir(*setups, name: str = "q"):
    """Copy the quantized (`q`) or plain HF (`hf`) dir into tmp, then damage it."""
    def setup(tmp: Path) -> None:
        shutil.copytree(tiny_hf_root() / name, tmp / name)
        for s in setups:
            s(tmp)

    return setup


def qmeta(edit):
    """Edit the description of the first quantized layer (q/config.json has a checksum: drop it)."""
    def change(d: dict) -> None:
        edit(d["mulfree_quant"]["layers"][min(d["mulfree_quant"]["layers"])])

    return chain(edit_json("q/config.json", change), delete("q/checksums.json"))


def qconf(**changes):
    return chain(set_json("q/config.json", **changes), delete("q/checksums.json"))


def qquant(**changes):
    return chain(edit_json("q/config.json", lambda d: d["mulfree_quant"].update(changes)), delete("q/checksums.json"))


def all_bits(bits: int):
    def edit(d: dict) -> None:
        d["mulfree_quant"]["bits"] = bits
        for meta in d["mulfree_quant"]["layers"].values():
            meta["bits"] = bits

    return edit


def qcodes_flip(tmp: Path) -> None:
    """Set the top bit of one 4-bit code (no checksum: the value check must see it)."""
    _st_flip_in("q/model.safetensors", "codes", 7)(tmp)
    (tmp / "q" / "checksums.json").unlink()


def _st_flip_in(rel: str, suffix: str, bit: int):
    def setup(tmp: Path) -> None:
        path = tmp / rel
        raw = bytearray(path.read_bytes())
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        name = next(k for k in sorted(header) if k.endswith(suffix))
        raw[8 + n + header[name]["data_offsets"][0]] |= 1 << bit
        path.write_bytes(bytes(raw))

    return setup


def hf_pickle(tmp: Path) -> None:
    """An HF dir whose weights are a malicious pytorch_model.bin (no safetensors)."""
    shutil.copytree(tiny_hf_root() / "hf", tmp / "hf")
    (tmp / "hf" / "model.safetensors").unlink()
    (tmp / "hf" / "pytorch_model.bin").write_bytes(EVIL)


def gguf_truncated(tmp: Path) -> None:
    from mulfree.models.pretrained import smollm2_gguf

    with open(smollm2_gguf(), "rb") as f:
        (tmp / "m.gguf").write_bytes(f.read(1 << 16))


def gguf_header(version: int, tensors: int, kvs: int):
    return write("m.gguf", b"GGUF" + struct.pack("<IQQ", version, tensors, kvs) + b"\0" * 64)
