"""Payload checksums: a manifest written beside the files catches a flipped bit, a truncation and a
missing file, and a directory without a manifest (written before checksums) still loads."""

from __future__ import annotations

import pytest

from mulfree.errors import CheckpointError
from mulfree.integrity import MANIFEST, digest_bytes, digest_file, verify, write_manifest


def test_digest_of_file_equals_digest_of_its_bytes(tmp_path):
    data = bytes(range(256)) * 40000  # 10 MB: two 8 MiB read pieces
    (tmp_path / "f").write_bytes(data)
    assert digest_file(tmp_path / "f") == digest_bytes(data)
    assert digest_bytes(data) != digest_bytes(data[:-1])


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_reports_the_damaged_file(tmp_path, damage):
    (tmp_path / "a.bin").write_bytes(b"\x00" * 1000)
    (tmp_path / "b.bin").write_bytes(b"\x01" * 10)
    write_manifest(tmp_path, ["a.bin", "b.bin"])
    verify(tmp_path, ["a.bin", "b.bin"])
    path = tmp_path / "a.bin"
    if damage == "flip":
        path.write_bytes(b"\x00" * 500 + b"\x10" + b"\x00" * 499)
    elif damage == "truncate":
        path.write_bytes(b"\x00" * 999)
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match="a.bin"):
        verify(tmp_path, ["a.bin", "b.bin"])
    verify(tmp_path, ["b.bin"])


def test_no_manifest_means_nothing_to_check(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x")
    verify(tmp_path, ["a.bin"])


def test_bad_manifest_is_one_error(tmp_path):
    (tmp_path / MANIFEST).write_text("[1, 2")
    with pytest.raises(CheckpointError, match=MANIFEST):
        verify(tmp_path, ["a.bin"])
    (tmp_path / MANIFEST).write_text('{"a.bin": 3}')
    with pytest.raises(CheckpointError, match="file name -> digest"):
        verify(tmp_path, ["a.bin"])
