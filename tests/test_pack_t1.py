"""The 1.6-bit T1R4 format (`mulfree-t1`): bit layout, round trips, its kernels on every backend, and a t1 packed
model against the same model in T2R4 (same trits and scales, so identical integer results and logits)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_mmfree

from mulfree.infer.engine import PackedModel
from mulfree.kernels import available_backends
from mulfree.kernels import ternary as K
from mulfree.ops import fused
from mulfree.ops.pack import pack_ternary, packed_format
from mulfree.ops.pack_t1 import (
    decode_bytes,
    encode_codes,
    pack_t1,
    packed_matmul_ref,
    packed_shape,
    unpack_t1,
)

COMPILED = [b for b in available_backends() if b != "reference"]
needs_ext = pytest.mark.skipif(not COMPILED, reason="compiled extension missing")
# (T, N, K): T 1..9 covers every tile width and the tile loop, N and K off the 4-row groups and 160-weight blocks
SHAPES = [(1, 1, 1), (1, 5, 3), (2, 9, 161), (3, 7, 300), (4, 33, 320), (5, 64, 513), (9, 130, 1000), (1, 70, 2100)]


def _ids(shapes):
    return [f"T{t}-N{n}-K{k}" for t, n, k in shapes]


def _trits(n, k, seed):
    return torch.randint(-1, 2, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def test_worked_byte_from_docstring():
    t = torch.zeros(1, 160, dtype=torch.int8)
    t[0, 5], t[0, 37], t[0, 69], t[0, 101], t[0, 133] = -1, 0, 1, 0, 1
    p = pack_t1(t)
    assert p.shape == (1, 128)
    assert int(p[0, 5]) == 0x35
    assert int(p[0, 6]) == 0x80 and int(p[0, 32 + 5]) == 0x80  # zero weights, row 1 (padding): 0x80


def test_every_byte():
    n = torch.arange(243)
    codes = torch.stack([n // 81, n // 27 % 3, n // 9 % 3, n // 3 % 3, n % 3], dim=-1)
    b = encode_codes(codes)
    assert len(set(b.tolist())) == 243 and torch.equal(decode_bytes(b).long(), codes)
    # the 13 bytes the packer never writes still decode to codes, the same ones the formula gives by hand
    every = decode_bytes(torch.arange(256, dtype=torch.uint8)).long()
    assert every.max() <= 2
    m, by_hand = 200, []
    for _ in range(5):
        by_hand.append(3 * m >> 8)
        m = 3 * m & 255
    assert every[200].tolist() == by_hand


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 160), (5, 161), (9, 1000), (130, 64), (7, 320)],
                         ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_round_trip(shape):
    t = _trits(*shape, sum(shape))
    p = pack_t1(t)
    assert p.dtype == torch.uint8 and tuple(p.shape) == packed_shape(*shape)
    assert torch.equal(unpack_t1(p, shape), t)


def test_bits_per_weight():
    n, k = 8, 480  # whole row groups and blocks
    assert 8 * pack_t1(torch.zeros(n, k, dtype=torch.int8)).numel() / (n * k) == packed_format("t1").bits_per_weight
    assert packed_format("mulfree-t1").bits_per_weight == 1.6 and packed_format("t2").bits_per_weight == 2.0


def test_row_interleave_layout():
    t = torch.zeros(8, 320, dtype=torch.int8)
    t[6, 200] = 1  # group 1, row 2, block 1, k - 160 = 40 = byte 8 + 32 * digit 1
    p = pack_t1(t)
    assert (p != 0x80).nonzero().tolist() == [[1, 128 + 2 * 32 + 8]]
    assert int(p[1, 128 + 64 + 8]) == encode_codes(torch.tensor([1, 2, 1, 1, 1])).item()


def test_unpack_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        unpack_t1(torch.zeros(2, 128, dtype=torch.uint8), (9, 160))
    with pytest.raises(ValueError, match="uint8"):
        unpack_t1(torch.zeros(1, 128, dtype=torch.int8), (4, 160))
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_t1(torch.full((2, 2), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="unknown packed format"):
        packed_format("t3")


@needs_ext
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_ternary_matmul_t1_exact(backend, threads, shape):
    t_, n, k = shape
    w = _trits(n, k, n * 1000 + k)
    q = torch.randint(-128, 128, (t_, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
    q[0, 0] = -128  # extremes: the biased activations (q + 128) reach 0 and 255
    q[-1, -1] = 127
    expect = (q.long() @ w.long().T).int()
    p = pack_t1(w)
    assert torch.equal(packed_matmul_ref(p, n, q), expect)
    assert torch.equal(K.ternary_matmul(p, n, q, backend=backend, threads=threads, fmt="t1"), expect)


# >= 32 tokens: panel GEMMs on the SIMD backends, after converting to T2R4 rows of K rounded up to 256, which are
# shorter (K 250, 2048: the 160-padding is dropped) or longer (K 300: padded with zero weights) than the T1R4 rows
PANEL_SHAPES = [(32, 33, 250), (40, 70, 300), (65, 9, 2048)]


@needs_ext
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", PANEL_SHAPES, ids=_ids(PANEL_SHAPES))
def test_ternary_matmul_t1_panels_exact(backend, threads, shape):
    t_, n, k = shape
    w = _trits(n, k, n + k)
    q = torch.randint(-128, 128, (t_, k), generator=torch.Generator().manual_seed(t_), dtype=torch.int8)
    q[-1, -1] = -128
    expect = (q.long() @ w.long().T).int()
    assert torch.equal(K.ternary_matmul(pack_t1(w), n, q, backend=backend, threads=threads, fmt="t1"), expect)


@needs_ext
@pytest.mark.parametrize("backend", COMPILED)
def test_ternary_matmul_t1_long_rows_at_the_extremes(backend):
    # rows of 1700 blocks, every trit +1 or -1 against activations of -128 / 127: the largest sums a lane can hold,
    # past the 1638 blocks where an AVX-512 tile's int32 lanes would overflow without its folds; exact against int64
    k = 1700 * 160 + 7
    w = torch.ones(4, k, dtype=torch.int8)
    w[1] = -1
    w[2, ::2] = -1
    w[3] = _trits(1, k, 3)
    q = torch.full((4, k), -128, dtype=torch.int8)
    q[1] = 127
    q[2, 1::3] = 127
    q[3] = torch.randint(-128, 128, (k,), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    expect = (q.long() @ w.long().T).int()
    p = pack_t1(w)
    for t_ in (1, 2, 4):
        assert torch.equal(K.ternary_matmul(p, 4, q[:t_], backend=backend, threads=1, fmt="t1"), expect[:t_])


@needs_ext
@pytest.mark.parametrize("backend", COMPILED)
def test_ternary_matmul_t1_any_bytes(backend):
    # bytes the packer never writes (and all 256 values) decode the same in the kernels and the reference
    g = torch.Generator().manual_seed(5)
    n, k = 12, 480
    p = torch.randint(0, 256, packed_shape(n, k), generator=g, dtype=torch.uint8)
    for t_ in (3, 40):  # GEMV tiles, panels
        q = torch.randint(-128, 128, (t_, k), generator=g, dtype=torch.int8)
        assert torch.equal(K.ternary_matmul(p, n, q, backend=backend, threads=1, fmt="t1"), packed_matmul_ref(p, n, q))


@needs_ext
@pytest.mark.parametrize("backend", ["reference", *COMPILED])
def test_bitlinear_t1_equals_t2(backend):
    n, k = 37, 300
    w = _trits(n, k, 3)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(4))
    norm = torch.rand(k, generator=torch.Generator().manual_seed(6)) + 0.5
    t2 = K.bitlinear_packed(pack_ternary(w), n, 0.03, norm, x, 1e-6, backend=backend)
    t1 = K.bitlinear_packed(pack_t1(w), n, 0.03, norm, x, 1e-6, backend=backend, fmt="t1")
    assert torch.equal(t1, t2)
    assert torch.equal(t1, fused.bitlinear_packed_ref(pack_t1(w), n, 0.03, norm, x, 1e-6, fmt="mulfree-t1"))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's OpenMP workers and the engine's pool share 2 cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return random_mmfree(72, 100)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("intermediate", [100, 128])  # 128: the gate/up panels fuse the GLU
def test_t1_model_equals_t2_model(model, backend, intermediate):
    model = model if intermediate == 100 else random_mmfree(72, intermediate)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2))  # >= 32: prefill in panels
    t2 = PackedModel.from_model(model, backend=backend)
    t1 = PackedModel.from_model(model, backend=backend, fmt="t1")
    assert t1.format.name == "mulfree-t1" and t2.format.name == "mulfree-t2"
    assert torch.equal(t1.forward(ids, all_logits=True), t2.forward(ids, all_logits=True))
    for tok in (3, 17, 250):  # decode steps after the prefill
        assert torch.equal(t1.forward([tok]), t2.forward([tok]))
    states = [t1.new_state(), t1.new_state()]
    states2 = [s.clone() for s in states]
    chunks = [[1, 2, 3], [7]]
    assert torch.equal(t1.step(chunks, states), t2.step(chunks, states2))
    assert torch.equal(torch.stack(states), torch.stack(states2))
    batch = torch.stack([t1.new_state() for _ in range(33)])  # 33 sequences: one panel step
    batch2 = batch.clone()
    tokens = torch.arange(33) * 7 % 300
    assert torch.equal(t1.decode_batch(tokens, batch), t2.decode_batch(tokens, batch2))
    assert torch.equal(batch, batch2)
    assert t1.generate(ids[:5], 8) == t2.generate(ids[:5], 8)


def test_pack_cli_t1_and_repack(model, tmp_path, capsys):
    from mulfree.cli import main
    from mulfree.models.io import save_model

    save_model(model, tmp_path / "m")
    assert main(["pack", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "t1"), "--format", "t1"]) == 0
    assert "format mulfree-t1" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "t1" / "config.json").read_text())
    assert cfg["format"] == "mulfree-t1" and cfg["format_version"] == 1
    assert main(["pack", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "t2")]) == 0
    assert json.loads((tmp_path / "t2" / "config.json").read_text())["format"] == "mulfree-t2"
    assert main(["pack", "--model", str(tmp_path / "t2"), "--out", str(tmp_path / "t2to1"), "--format", "t1.6"]) == 0
    a, b = PackedModel.load(tmp_path / "t1"), PackedModel.load(tmp_path / "t2to1")
    assert a.format.name == b.format.name == "mulfree-t1"
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors) and a.tensors.keys() == b.tensors.keys()
    t2_size = (tmp_path / "t2" / "model.safetensors").stat().st_size
    assert (tmp_path / "t1" / "model.safetensors").stat().st_size < t2_size
    ids = torch.tensor([5, 6, 7])
    run_t2_as_t1 = PackedModel.load(tmp_path / "t2", fmt="t1")  # repacked in memory
    assert torch.equal(run_t2_as_t1.forward(ids), PackedModel.load(tmp_path / "t2").forward(ids))
    assert torch.equal(a.forward(ids), PackedModel.load(tmp_path / "t2").forward(ids))
