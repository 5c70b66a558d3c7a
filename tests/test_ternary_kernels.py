"""Every packed-ternary kernel vs its pure-torch reference, on awkward shapes, on every backend here."""

from __future__ import annotations

import pytest
import torch

from mulfree.kernels import available_backends
from mulfree.kernels import ternary as K
from mulfree.ops import fused
from mulfree.ops.pack import pack_ternary, packed_matmul_ref

COMPILED = [b for b in available_backends() if b != "reference"]
needs_ext = pytest.mark.skipif(not COMPILED, reason="compiled extension missing")
SHAPES = [(1, 1, 1), (1, 5, 3), (1, 9, 700), (3, 7, 300), (5, 33, 256), (6, 64, 513), (9, 130, 1000)]  # (T, N, K)


def _ids(shapes):
    return [f"T{t}-N{n}-K{k}" for t, n, k in shapes]


def _trits(n, k, g):
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


@needs_ext
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_ternary_matmul_exact(backend, threads, shape):
    t_, n, k = shape
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = _trits(n, k, g)
    q = torch.randint(-128, 128, (t_, k), generator=g, dtype=torch.int8)
    q[0, 0] = -128  # extremes: the u8 x s8 products must not saturate
    out = K.ternary_matmul(pack_ternary(w), n, q, backend=backend, threads=threads)
    expect = (q.long() @ w.long().T).int()
    assert torch.equal(out, expect)
    assert torch.equal(packed_matmul_ref(pack_ternary(w), n, q), expect)


# (24, 40, 1300): one 32-token block over three k chunks, its C tiles kept in registers between the chunks
AMX_SHAPES = [(8, 1, 1), (13, 33, 300), (17, 33, 300), (24, 40, 1300), (37, 70, 513), (64, 130, 1000), (70, 40, 2100)]


@pytest.mark.skipif(not K.amx_available(), reason="no AMX-INT8 on this CPU / OS")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", AMX_SHAPES, ids=_ids(AMX_SHAPES))
def test_amx_gemm_exact(threads, shape):
    t_, n, k = shape  # >= 8 tokens: the AMX path; partial token / row tiles and several k chunks
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = _trits(n, k, g)
    q = torch.randint(-128, 128, (t_, k), generator=g, dtype=torch.int8)
    q[-1, -1] = -128
    expect = (q.long() @ w.long().T).int()
    prev = K.set_amx(True)
    try:
        amx = K.ternary_matmul(pack_ternary(w), n, q, backend="avx512", threads=threads)
        K.set_amx(False)
        vnni = K.ternary_matmul(pack_ternary(w), n, q, backend="avx512", threads=threads)
    finally:
        K.set_amx(prev)
    assert torch.equal(amx, expect)
    assert torch.equal(vnni, expect)


PANEL_SHAPES = [(12, 33, 300), (29, 70, 513), (97, 130, 2100)]  # >= 12 tokens: VNNI panels; partial blocks


@pytest.mark.skipif("avx512" not in COMPILED, reason="no AVX-512 VNNI on this CPU")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", PANEL_SHAPES, ids=_ids(PANEL_SHAPES))
def test_vnni_panel_gemm_exact(threads, shape):
    t_, n, k = shape  # 12-token blocks (the last one short), partial 32-row panels, several k chunks
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = _trits(n, k, g)
    q = torch.randint(-128, 128, (t_, k), generator=g, dtype=torch.int8)
    q[-1, -1] = -128
    prev = K.set_amx(False)
    try:
        out = K.ternary_matmul(pack_ternary(w), n, q, backend="avx512", threads=threads)
    finally:
        K.set_amx(prev)
    assert torch.equal(out, (q.long() @ w.long().T).int())


YMM = [b for b in COMPILED if b in ("avx2", "avxvnni")]
YMM_PANEL_SHAPES = [(8, 33, 300), (13, 70, 513), (66, 130, 2100)]  # >= 8 tokens: 256-bit panels; partial blocks


@pytest.mark.skipif(not YMM, reason="no AVX2 on this CPU")
@pytest.mark.parametrize("backend", YMM)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", YMM_PANEL_SHAPES, ids=_ids(YMM_PANEL_SHAPES))
def test_ymm_panel_gemm_exact(backend, threads, shape):
    t_, n, k = shape  # 4-token blocks (the last one short), partial 32-row panels, several k chunks
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = _trits(n, k, g)
    q = torch.randint(-128, 128, (t_, k), generator=g, dtype=torch.int8)
    q[-1, -1] = -128
    out = K.ternary_matmul(pack_ternary(w), n, q, backend=backend, threads=threads)
    assert torch.equal(out, (q.long() @ w.long().T).int())


@pytest.mark.skipif(not YMM, reason="no AVX2 on this CPU")
@pytest.mark.parametrize("backend", YMM)
def test_ymm_panel_gemm_int16_bound(backend):
    # +1 rows against -128 everywhere: every int16 pair sum of the AVX2 panel is -512, 64 of them reach -32768
    w = torch.ones(8, 4096, dtype=torch.int8)
    w[1::2] = -1
    q = torch.full((64, 4096), -128, dtype=torch.int8)
    q[1::2] = 127
    out = K.ternary_matmul(pack_ternary(w), 8, q, backend=backend)
    assert torch.equal(out, (q.long() @ w.long().T).int())


@needs_ext
@needs_ext
def test_two_callers_on_one_pool_get_their_own_results():
    # the pool's region state is one caller's: two Python threads (or two engines) calling at once used to get
    # each other's chunks, or hang
    import threading

    g = torch.Generator().manual_seed(7)
    jobs = []
    for t_, n, k in [(4, 2048, 512), (1, 2048, 300)]:  # many chunks a region, long enough calls (scalar) to overlap
        w = _trits(n, k, g)
        q = torch.randint(-128, 128, (t_, k), generator=g, dtype=torch.int8)
        jobs.append((pack_ternary(w), n, q, (q.long() @ w.long().T).int()))
    wrong = [0, 0]

    def run(i: int) -> None:
        packed, n, q, expect = jobs[i]
        for _ in range(200):
            wrong[i] += not torch.equal(K.ternary_matmul(packed, n, q, backend=COMPILED[0], threads=2), expect)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]  # a hung one is left
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads) and wrong == [0, 0]


def test_ternary_matmul_extreme_values_all_backends():
    k = 4096  # long rows of +-1 x -128 stress int16 / int32 partial sums
    w = torch.ones(8, k, dtype=torch.int8)
    w[1::2] = -1
    q = torch.full((5, k), -128, dtype=torch.int8)
    for b in COMPILED:
        out = K.ternary_matmul(pack_ternary(w), 8, q, backend=b)
        assert torch.equal(out, (q.long() @ w.long().T).int()), b


@needs_ext
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 300), (2, 2048), (64, 1000)],
                         ids=["T1-K1", "T3-K7", "T4-K300", "T2-K2048", "T64-K1000"])
def test_rmsnorm_quant_exact(backend, shape):
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, generator=g) * 3
    w = torch.rand(shape[1], generator=g) + 0.5
    q, s, sq = K.rmsnorm_quant(x, w, 1e-6, backend=backend)
    rq, rs, rsq = fused.rmsnorm_quant_ref(x, w, 1e-6)
    assert torch.equal(q, rq)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)  # float path: 1 ulp apart at most
    assert torch.equal(sq, rsq)


def test_rmsnorm_quant_ref_matches_activation_quant():
    from mulfree.ops.ternary import activation_quant

    x = torch.randn(4, 37, generator=torch.Generator().manual_seed(0))
    q, s, _ = fused.rmsnorm_quant_ref(x, torch.ones(37), 1e-6)
    aq, ascale = activation_quant(fused.rmsnorm_ref(x, torch.ones(37), 1e-6))
    assert torch.equal(q[:, :37], aq)
    assert torch.allclose(s, ascale.squeeze(-1))


@needs_ext
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=_ids(SHAPES[1:]))
def test_bitlinear_packed(backend, shape):
    t_, n, k = shape
    g = torch.Generator().manual_seed(k)
    w = _trits(n, k, g)
    x = torch.randn(t_, k, generator=g)
    nw = torch.rand(k, generator=g) + 0.5
    out = K.bitlinear_packed(pack_ternary(w), n, 0.037, nw, x, 1e-6, backend=backend)
    ref = fused.bitlinear_packed_ref(pack_ternary(w), n, 0.037, nw, x, 1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("use_lb", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (5, 33), (3, 256)], ids=["T1-D1", "T5-D33", "T3-D256"])
def test_mlgru_step(backend, use_lb, shape):
    g = torch.Generator().manual_seed(shape[1])
    fi, ff, fg = (torch.randn(*shape, generator=g) * 2 for _ in range(3))
    lb = torch.rand(shape[1], generator=g) if use_lb else None
    gn = torch.rand(shape[1], generator=g) + 0.5
    st = torch.randn(shape[1], generator=g)
    out, s = K.mlgru_step(fi, ff, fg, lb, gn, 1e-6, st, backend=backend)
    rout, rs = fused.mlgru_step_ref(fi, ff, fg, lb, gn, 1e-6, st)
    torch.testing.assert_close(out, rout, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("shape", [(1, 2), (3, 66), (2, 1000)], ids=["T1-I1", "T3-I33", "T2-I500"])
def test_glu_step(backend, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 4
    x.view(-1)[0], x.view(-1)[-1] = -100.0, 95.0  # exp clamps: silu(-100) ~ 0, silu(95) = 95
    torch.testing.assert_close(K.glu_step(x, backend=backend), fused.glu_step_ref(x), rtol=1e-5, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("backend", COMPILED)
def test_silu_has_torch_bits(backend):
    # torch's vectorized sigmoid / silu (AVX2 and AVX-512 builds) use the exp the kernels copy; rows of
    # 1024 leave no scalar tail, which torch computes with std::exp instead
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("torch runs its scalar kernels here")
    x = torch.randn(8, 2048, generator=torch.Generator().manual_seed(2)) * 6
    assert torch.equal(K.glu_step(x, backend=backend), torch.nn.functional.silu(x[:, :1024]) * x[:, 1024:])


@needs_ext
def test_bad_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        K.ternary_matmul(pack_ternary(torch.zeros(4, 4, dtype=torch.int8)), 4, torch.zeros(1, 4, dtype=torch.int8),
                         backend="sse9")
