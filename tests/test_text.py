"""Corpus loading, the whole-document validation split and the byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

from mulfree.data.text import (
    EOS_TOKEN,
    bundled_text_files,
    decode,
    encode,
    load_corpus,
    load_text,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from mulfree.errors import DataError

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


def _write_docs(tmp_path, n=6):
    for k in range(n):
        (tmp_path / f"play{k}.txt").write_text(f"PLAY {k}\n" + TEXT * (k + 1))
    return tmp_path


def test_bundled_corpus_files():
    files = bundled_text_files()
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)


def test_split_holds_out_whole_documents_deterministically(tmp_path):
    _write_docs(tmp_path)
    a = load_corpus([str(tmp_path)], val_fraction=0.2)
    b = load_corpus([str(tmp_path)], val_fraction=0.2)
    assert a == b
    assert a.val_docs and a.train_docs and not set(a.val_docs) & set(a.train_docs)
    assert set(a.val_docs) | set(a.train_docs) == {f"play{k}.txt" for k in range(6)}
    total = len(a.train_text) + len(a.val_text)
    assert len(a.val_text) >= 0.2 * total * 0.9
    for name in a.val_docs:  # each held-out play appears only in validation
        header = "PLAY " + name[4]
        assert header in a.val_text and header not in a.train_text


def test_single_file_is_split_by_characters(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text(TEXT)
    c = load_corpus([str(f)], val_fraction=0.1)
    assert c.train_text + c.val_text == TEXT
    assert c.train_text.endswith("\n") and 0 < len(c.val_text) < 0.2 * len(TEXT)


@pytest.mark.parametrize("kind", ["missing", "empty", "empty_dir"])
def test_bad_data_raises(tmp_path, kind):
    if kind == "missing":
        path = tmp_path / "nope.txt"
    elif kind == "empty":
        path = tmp_path / "empty.txt"
        path.write_text("  \n")
    else:
        path = tmp_path / "d"
        path.mkdir()
    with pytest.raises(DataError):
        load_corpus([str(path)])
    with pytest.raises(DataError):
        load_text([str(path)])


def test_data_path_that_is_neither_file_nor_dir_is_named_as_such():
    with pytest.raises(DataError, match="'/dev/null' is not a regular file or a directory"):
        load_corpus(["/dev/null"])
    with pytest.raises(DataError, match="does not exist; check the data paths given"):
        load_corpus(["/nonexistent/corpus.txt"])


def test_tokenizer_roundtrip_and_save(tmp_path):
    tok = train_tokenizer(TEXT + "Ünïcödé ✓", vocab_size=300)
    assert tok.get_vocab_size() <= 300 and tok.token_to_id(EOS_TOKEN) == 0
    text = "To be or not — ✓ ünseen bytes \x00 " + EOS_TOKEN + " end"
    ids = encode(tok, text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert decode(tok, ids) == text
    assert (ids == 0).sum() == 1  # the special token is one id, not split
    assert len(encode(tok, TEXT[:200])) < 200 / 2  # merges learned: fewer tokens than bytes
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    assert encode(again, text).tolist() == ids.tolist()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError):
        train_tokenizer("", 300)


def test_saved_tokenizer_names_eos_and_pad_for_transformers(tmp_path):
    import json

    tok = train_tokenizer(TEXT, vocab_size=300)
    save_tokenizer(tok, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == cfg["pad_token"] == EOS_TOKEN and cfg["padding_side"] == "left"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token_id == hf.pad_token_id == 0
    assert hf(TEXT[:80])["input_ids"] == encode(tok, TEXT[:80]).tolist()
