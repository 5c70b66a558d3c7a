"""Fused CPU training ops (nn/fused.py, kernels/cpu/train_ops.cpp) against their pure-torch references
(ops/fused_train.py): integer codes and forward values exactly, gradients within 1e-5 relative, on odd
shapes, every compiled backend and thread count; and whole models fused vs unfused."""

from __future__ import annotations

import pytest
import torch

from mulfree.kernels import available_backends, cpu_module, use_threads
from mulfree.nn import fused
from mulfree.ops import fused_train as ref

pytestmark = pytest.mark.skipif(cpu_module() is None, reason="the C++ extension is not built")
BACKENDS = [b for b in available_backends() if b != "reference"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def grads_of(fn, inputs, seed_grads):
    """Gradients of sum(out_j * seed_j) w.r.t. inputs (fresh leaves), and the outputs."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum((o * g).sum() for o, g in zip(outs, seed_grads) if g is not None).backward()
    return outs, [None if t is None or not t.requires_grad else t.grad for t in leaves]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("MULFREE_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("shape", [(1, 3), (3, 33), (2, 7, 70), (5, 130)])
def test_rmsnorm_equals_reference(backend, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).requires_grad_()
    w = (torch.rand(shape[-1], generator=g) + 0.5).requires_grad_()
    seed = [torch.randn(*shape, generator=g)]
    (y,), (dx, dw) = grads_of(lambda a, b: fused.rms_norm(a, b, 1e-6), [x, w], seed)
    (y_ref,), (dx_ref, dw_ref) = grads_of(lambda a, b: ref.rmsnorm(a, b, 1e-6), [x, w], seed)
    assert torch.equal(y, y_ref)
    assert rel(dx, dx_ref) < 1e-5 and rel(dw, dw_ref) < 1e-5


@pytest.mark.parametrize("t,k,n", [(1, 3, 1), (7, 33, 19), (16, 64, 9), (3, 130, 40)])
def test_bitlinear_codes_exact_and_gradients_close(backend, t, k, n):
    g = torch.Generator().manual_seed(t * k + n)
    x = torch.randn(t, k, generator=g).requires_grad_()
    nw = (torch.rand(k, generator=g) + 0.5).requires_grad_()
    w = (torch.randn(n, k, generator=g) * 0.05).requires_grad_()
    q = torch.empty(t, k)
    a_scale = torch.empty(t)
    cpu_module().norm_quant(x.detach(), nw.detach(), 1e-6, q, a_scale, False, backend, 2)
    trits = torch.empty(n, k)
    w_scale = cpu_module().ternarize(w.detach(), trits, backend, 2)
    q_ref, s_ref, t_ref, w_scale_ref = ref.bitlinear_codes(x.detach(), nw.detach(), w.detach(), 1e-6)
    assert torch.equal(q, q_ref.float()) and torch.equal(a_scale, s_ref.squeeze(-1))
    assert torch.equal(trits, t_ref) and w_scale == w_scale_ref.item()
    seed = [torch.randn(t, n, generator=g)]
    (y,), grads = grads_of(lambda *a: fused.bitlinear(*a, 1e-6), [x, nw, w], seed)
    (_,), grads_ref = grads_of(lambda *a: ref.bitlinear(*a, 1e-6), [x, nw, w], seed)
    assert torch.equal(y, (q_ref.float() @ t_ref.T) * (s_ref * w_scale_ref))  # the integer product, scaled once
    for a, b in zip(grads, grads_ref):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("n,k", [(1, 1), (3, 255), (17, 256), (33, 300), (64, 1100)])
def test_ternarize_packs_as_pack_ternary_does(backend, n, k):
    """`ternarize(..., packed=)` writes pack_ternary's bytes of the trits it computes (rows past N and k past K
    as trit 0), with the same scale, on odd shapes and every backend."""
    from mulfree.ops.pack import pack_ternary, packed_shape

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05
    trits = torch.empty(n, k)
    scale = cpu_module().ternarize(w, trits, backend, 2)
    packed = torch.full(packed_shape(n, k), 0xAB, dtype=torch.uint8)  # poisoned: every byte must be written
    assert cpu_module().ternarize(w, None, backend, 2, packed=packed) == scale
    assert torch.equal(packed, pack_ternary(trits.to(torch.int8)))


@pytest.mark.parametrize("t,k,n", [(1, 5, 3), (7, 64, 9), (33, 300, 17), (300, 1100, 70)])
def test_forward_product_on_the_packed_kernels_equals_the_fp32_matmul(backend, monkeypatch, t, k, n):
    """The training forward's codes x trits product runs on the packed int8 kernels (not fp32 matmul) except on the
    scalar backend, the scales applied as it writes, and gives the fp32 matmul's floats scaled in the BitLinear's
    order bit for bit, extreme codes and scales included (GEMV tiles and panels)."""
    g = torch.Generator().manual_seed(t + k + n)
    q = torch.randint(-127, 128, (t, k), generator=g).float()
    q[0, :] = 127.0
    a_scale = torch.rand(t, generator=g) * 0.05
    a_scale[-1] = 3.0e38  # scaled sums overflow to inf as in torch
    w = torch.randn(n, k, generator=g) * 0.05
    trits = torch.empty(n, k)
    w_scale = cpu_module().ternarize(w, trits, backend, 2)
    expected = (q @ trits.T).mul_(a_scale[:, None] * w_scale)
    if backend != "scalar":
        monkeypatch.setattr(torch, "matmul", None)  # the packed path must not fall back to it
    assert torch.equal(fused._scaled_product(q, a_scale, w), expected)


def test_scaled_product_binding_refuses_mismatched_shapes():
    cpu = cpu_module()
    packed, q = torch.zeros(3, 256, dtype=torch.uint8), torch.zeros(5, 256, dtype=torch.int8)
    sumq, a_scale, out = torch.zeros(5, dtype=torch.int32), torch.ones(5), torch.empty(5, 9)
    cpu.ternary_matmul_scaled(packed, 9, q, sumq, a_scale, 1.0, out, BACKENDS[0], 1)
    for args, message in [((packed, 9, q, sumq, torch.ones(4), 1.0, out), "a_scale / out shapes"),
                          ((packed, 13, q, sumq, a_scale, 1.0, out), "packed / activation shapes"),
                          ((packed, 9, q[:, :200], sumq, a_scale, 1.0, out), "packed / activation shapes")]:
        with pytest.raises(ValueError, match=message):
            cpu.ternary_matmul_scaled(*args, BACKENDS[0], 1)
    with pytest.raises(ValueError, match="k does not match"):
        cpu.ternary_matmul_scaled(packed, 9, q, sumq, a_scale, 1.0, out, BACKENDS[0], 1, k=300)


@pytest.mark.parametrize("lower_bound", [False, True])
@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("mask", [None, "official", "skip"])
def test_mlgru_scan_equals_reference(backend, lower_bound, initial_state, mask):
    b, t, d = 2, 13, 70
    g = torch.Generator().manual_seed(7)
    fi, ff = (torch.randn(b, t, d, generator=g).requires_grad_() for _ in range(2))
    lb = torch.rand(d, generator=g).requires_grad_() if lower_bound else None
    h0 = torch.randn(b, d, generator=g).requires_grad_() if initial_state else None
    keep = torch.rand(b, t, generator=g) > 0.3 if mask else None
    seed = [torch.randn(b, t, d, generator=g)]
    (h,), grads = grads_of(lambda *a: fused.mlgru_scan(*a, keep, mask == "skip"), [fi, ff, lb, h0], seed)
    (h_ref,), grads_ref = grads_of(lambda *a: ref.scan(*a, keep, mask == "skip"), [fi, ff, lb, h0], seed)
    assert rel(h, h_ref) < 1e-6
    for a, r in zip(grads, grads_ref):
        assert (a is None) == (r is None)
        if a is not None:
            assert rel(a, r) < 1e-5


PROLOGUES = {  # kind -> (reference, input width for output width k)
    "norm": (lambda x, w, h: ref.rmsnorm(x, w, 1e-5), lambda k: k),
    "glu": (lambda x, w, h: ref.glu(x), lambda k: 2 * k),
    "gate": (lambda x, w, h: ref.gate(x, w, 1e-5, h), lambda k: k),
}


@pytest.mark.parametrize("kind", sorted(PROLOGUES))
@pytest.mark.parametrize("t,k,n", [(1, 3, 2), (9, 70, 33)])
def test_bitlinear_prologues_equal_reference(backend, kind, t, k, n):
    """The block norm, the GLU and the MLGRU output gate before a BitLinear, recomputed in its backward."""
    reference, width = PROLOGUES[kind]
    g = torch.Generator().manual_seed(11 * t + k)
    x = torch.randn(2, t, width(k), generator=g).requires_grad_()
    pw = (torch.rand(width(k), generator=g) + 0.5).requires_grad_() if kind != "glu" else None
    h = torch.randn(2, t, k, generator=g).requires_grad_() if kind == "gate" else None
    nw = (torch.rand(k, generator=g) + 0.5).requires_grad_()
    w = (torch.randn(n, k, generator=g) * 0.05).requires_grad_()
    seed = [torch.randn(2, t, n, generator=g)]

    def ours(x, pw, h, nw, w):
        return fused.bitlinear(x, nw, w, 1e-6, fused.Prologue(kind, pw, 1e-5, h))

    def theirs(x, pw, h, nw, w):
        return ref.bitlinear(reference(x, pw, h), nw, w, 1e-6)

    (y,), grads = grads_of(ours, [x, pw, h, nw, w], seed)
    (y_ref,), grads_ref = grads_of(theirs, [x, pw, h, nw, w], seed)
    assert rel(y, y_ref) < 1e-6
    for a, r in zip(grads, grads_ref):
        assert (a is None) == (r is None)
        if a is not None:
            assert rel(a, r) < 1e-5


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("t,d,i", [(1, 3, 5), (9, 70, 33)])
def test_glu_node_equals_its_two_bitlinears_bit_for_bit(backend, pre_norm, t, d, i):
    """The one-node GLU (gate_up recomputed in backward) against down(glu-prologue(gate_up(norm-prologue(x)))) as
    two BitLinear nodes that keep gate_up: the same output and the same gradients, bit for bit; it keeps x only."""
    g = torch.Generator().manual_seed(t + d + i)
    x = torch.randn(2, t, d, generator=g).requires_grad_()
    pre_w = (torch.rand(d, generator=g) + 0.5).requires_grad_() if pre_norm else None
    gate_nw, down_nw = ((torch.rand(n, generator=g) + 0.5).requires_grad_() for n in (d, i))
    gate_w = (torch.randn(2 * i, d, generator=g) * 0.05).requires_grad_()
    down_w = (torch.randn(d, i, generator=g) * 0.05).requires_grad_()
    inputs = [x, pre_w, gate_nw, gate_w, down_nw, down_w]

    def one_node(x, pre_w, gate_nw, gate_w, down_nw, down_w):
        return fused.glu(x, pre_w, 1e-5, gate_nw, gate_w, 1e-6, down_nw, down_w, 1e-4)  # three distinct eps

    def two_nodes(x, pre_w, gate_nw, gate_w, down_nw, down_w):
        pre = None if pre_w is None else fused.Prologue("norm", pre_w, 1e-5)
        gate_up = fused.bitlinear(x, gate_nw, gate_w, 1e-6, pre)
        return fused.bitlinear(gate_up, down_nw, down_w, 1e-4, fused.Prologue("glu"))

    seed = [torch.randn(2, t, d, generator=g)]
    (y,), grads = grads_of(one_node, inputs, seed)
    (y_ref,), grads_ref = grads_of(two_nodes, inputs, seed)
    assert torch.equal(y, y_ref)
    for a, b in zip(grads, grads_ref):
        assert (a is None and b is None) or torch.equal(a, b)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        one_node(*inputs)
    assert (2 * t, d) in shapes and not any(s[-1] == 2 * i and s[0] == 2 * t for s in shapes)  # x, never gate_up


def test_results_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, 130, generator=g).requires_grad_()
    fi, ff = (torch.randn(3, 40, 130, generator=g).requires_grad_() for _ in range(2))
    gw, nw = (torch.rand(130, generator=g).requires_grad_() for _ in range(2))
    w = torch.randn(70, 130, generator=g).requires_grad_()

    def step(x, fi, ff, gw, nw, w):
        h = fused.mlgru_scan(fi, ff)
        return fused.bitlinear(x, nw, w, 1e-6, fused.Prologue("gate", gw, 1e-6, h))

    seed = [torch.randn(3, 40, 70, generator=g)]
    runs = []
    for threads in (1, 2, 3):
        with use_threads(threads):
            runs.append(grads_of(step, [x, fi, ff, gw, nw, w], seed))
    for outs, grads in runs[1:]:
        assert torch.equal(outs[0], runs[0][0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


def _saved_bytes(model, x) -> int:
    """Bytes of distinct tensors autograd keeps for backward of one forward pass."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)[0].sum()
    return sum(seen.values())


def test_fused_model_equals_the_unfused_one_with_the_same_rms_factor(monkeypatch):
    """With the unfused layers computing the fused ops' RMS factors and weight scales (float64 sums), the two
    paths quantize to the same codes, so whole-model loss and every gradient agree closely."""
    import mulfree.nn.bitlinear
    import mulfree.nn.norm
    from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM

    monkeypatch.setattr(mulfree.nn.norm, "rms_norm", lambda x, w, eps: ref.rmsnorm(x.float(), w.float(), eps))
    def weight_quant(w):
        trits, scale = ref.ternarize(w)
        return trits.to(torch.int8), scale

    monkeypatch.setattr(mulfree.nn.bitlinear, "weight_quant", weight_quant)
    torch.manual_seed(0)
    model = MMFreeForCausalLM(MMFreeConfig.from_preset("tiny"))
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    losses, grads = {}, {}
    for on in (True, False):
        before = fused.set_fused(on)
        try:
            model.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), x.flatten())
            loss.backward()
        finally:
            fused.set_fused(before)
        losses[on] = loss.item()
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert abs(losses[True] - losses[False]) < 1e-5
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        assert rel(grads[True][name], g) < 1e-4, name


def test_fused_model_keeps_a_sixth_of_the_activations_for_backward():
    """Per token, what autograd keeps (the slope between two sequence lengths, weights cancel out): 6.5 floats
    per layer and width (x, the mid-block residual, three gates, the states; gate_up is recomputed) against 40
    unfused."""
    from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM

    model = MMFreeForCausalLM(MMFreeConfig.from_preset("tiny"))
    short, long = (torch.randint(0, model.config.vocab_size, (2, n)) for n in (16, 48))
    per_token = {}
    for on in (True, False):
        before = fused.set_fused(on)
        try:
            per_token[on] = (_saved_bytes(model, long) - _saved_bytes(model, short)) / (2 * 32)
        finally:
            fused.set_fused(before)
    assert per_token[True] < 0.2 * per_token[False]


def test_gate_backward_refuses_overlapping_outputs():
    """The output gate's backward kernel assumes its output rows overlap nothing (restrict): the binding says so."""
    t, k = 4, 33
    fg, h, dout, dfg, dh = (torch.randn(t, k) for _ in range(5))
    gw, dgw = torch.rand(k), torch.empty(k)
    cpu = cpu_module()
    cpu.mlgru_gate_bwd(fg, gw, h, dout, 1e-6, dfg, dgw, dh, BACKENDS[0], 1)
    for outs in ((dfg, dgw, dout), (dfg, dgw, dfg), (h, dgw, dh), (dfg, dfg[0], dh)):
        with pytest.raises(ValueError, match="must not overlap other arrays"):
            cpu.mlgru_gate_bwd(fg, gw, h, dout, 1e-6, *outs, BACKENDS[0], 1)
