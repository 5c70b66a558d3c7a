"""Batched decode (PackedModel.decode_batch / Engine.forward_batch): one step of B sequences at different
positions equals each sequence's own decode step, bit for bit (each token's linear math is per token), on
every backend; prefill_state / new_state keep sequences outside `self.state`."""

from __future__ import annotations

import pytest
import torch
from helpers import random_mmfree

from mulfree.infer.engine import PackedModel
from mulfree.kernels import available_backends
from mulfree.models.mmfree import MMFreeForCausalLM


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()  # the engine's pool and torch's workers share 2 cores
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mmfree(hidden: int, intermediate: int, layers: int = 3) -> MMFreeForCausalLM:
    return random_mmfree(hidden, intermediate, layers)


@pytest.fixture(scope="module")
def model():
    return _mmfree(72, 96)  # 96 = 3 panels of 32 rows: the GLU fused into the panel GEMM at B >= 64


def _prompts(batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)  # different lengths: the sequences sit at different positions
    return [torch.randint(0, 300, (1 + (7 * b) % 13,), generator=g) for b in range(batch)]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 17, 33, 70])  # 70: panel GEMMs on the SIMD paths
def test_decode_batch_equals_per_sequence_steps(model, backend, batch):
    pm = PackedModel.from_model(model, backend=backend)
    prompts = _prompts(batch, batch)
    states = torch.stack([pm.prefill_state(p)[1] for p in prompts])
    alone_states = states.clone()
    tokens = torch.randint(0, 300, (batch,), generator=torch.Generator().manual_seed(99))
    for _ in range(3):  # three steps: the states carried between them
        alone = []
        for b in range(batch):
            pm.state = alone_states[b].clone()
            alone.append(pm.forward([int(tokens[b])]))
            alone_states[b] = pm.state
        together = pm.decode_batch(tokens, states)
        assert together.shape == (batch, 300)
        assert torch.equal(together, torch.cat(alone))
        assert torch.equal(states, alone_states)
        tokens = together.argmax(-1)


@pytest.mark.parametrize("backend", available_backends())
def test_threaded_wide_batch_equals_steps(backend):
    # wide enough that every linear is split into chunks over the pool, with the per-token-state MLGRU update
    # run on each chunk's rows (or split over the pool after a panel GEMM)
    m = _mmfree(576, 1152, layers=1)
    pm = PackedModel.from_model(m, backend=backend, threads=2)
    for batch in (6, 66):
        prompts = _prompts(batch, 7)
        states = torch.stack([pm.prefill_state(p)[1] for p in prompts])
        alone = torch.cat([pm.prefill_state(p)[0][None] for p in prompts])
        tokens = alone.argmax(-1)
        steps = [pm.prefill_state(tokens[b:b + 1], states[b].clone())[0] for b in range(batch)]
        assert torch.equal(pm.decode_batch(tokens, states), torch.stack(steps))


def _greedy_together(pm: PackedModel, prompts: list[torch.Tensor], n: int) -> list[list[int]]:
    firsts, states = zip(*(pm.prefill_state(p) for p in prompts))
    states = torch.stack(states)
    tokens = torch.stack(firsts).argmax(-1)
    out = [[int(t)] for t in tokens]
    for _ in range(n - 1):
        tokens = pm.decode_batch(tokens, states).argmax(-1)
        for seq, t in zip(out, tokens):
            seq.append(int(t))
    return out


@pytest.mark.parametrize("backend", available_backends())
def test_greedy_together_equals_alone(model, backend):
    pm = PackedModel.from_model(model, backend=backend)
    prompts = _prompts(5, 3)
    assert _greedy_together(pm, prompts, 16) == [pm.generate(p, 16) for p in prompts]


def test_prefill_state_leaves_self_state_and_chunks(model):
    pm = PackedModel.from_model(model)
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(2))
    pm.forward(ids[:5])
    before = pm.state.clone()
    logits, state = pm.prefill_state(ids)
    assert torch.equal(pm.state, before) and state.shape == (3, 72)
    assert torch.equal(pm.new_state(), torch.zeros(3, 72))
    s = pm.new_state()
    pm.prefill_state(ids[:8], s)  # a long prompt fed in chunks, the state passed back in
    again, s2 = pm.prefill_state(ids[8:], s)
    assert s2 is s and torch.equal(again, logits) and torch.equal(s, state)


@pytest.mark.parametrize("backend", ["reference", *[b for b in available_backends() if b != "reference"][:1]])
def test_bad_batches_are_one_line_errors(model, backend):
    pm = PackedModel.from_model(model, backend=backend)
    good = torch.zeros(2, 3, 72)
    cases = [([], good, "at least one token"), ([1, 300], good, "outside the vocabulary"),
             ([1, 2], torch.zeros(3, 3, 72), r"shape \(2, 3, 72\)"), ([1, 2], good.double(), "float32"),
             ([1, 2], torch.zeros(3, 2, 72).transpose(0, 1), "contiguous"), ([1, 2], "x", "float32")]
    for tokens, states, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            pm.decode_batch(tokens, states)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="shape"):
        pm.prefill_state([1], torch.zeros(72))


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("mix", [(1,), (9,), (1, 1, 1), (1, 12, 1, 1, 5), (40, 1, 1, 1, 30), (1,) * 70])
def test_ragged_step_equals_each_sequence_alone(model, backend, mix):
    # decode tokens (length 1) and prompt chunks (longer) of different sequences in one step, after states
    # at different positions, equal each sequence fed alone, bit for bit; a fresh state starts a prompt
    pm = PackedModel.from_model(model, backend=backend)
    g = torch.Generator().manual_seed(len(mix))
    starts = [pm.prefill_state(p)[1] if i % 3 else pm.new_state() for i, p in enumerate(_prompts(len(mix), 5))]
    chunks = [torch.randint(0, 300, (n,), generator=g).tolist() for n in mix]
    alone = [pm.prefill_state(c, s.clone()) for c, s in zip(chunks, starts)]
    states = [s.clone() for s in starts]
    logits = pm.step(chunks, states)
    assert torch.equal(logits, torch.stack([lg for lg, _ in alone]))
    assert all(torch.equal(s, a) for s, (_, a) in zip(states, alone))


def test_bad_ragged_steps_are_one_line_errors(model):
    pm = PackedModel.from_model(model)
    s = pm.new_state()
    cases = [([[1]], [], "one state per chunk"), ([], [], "one state per chunk"), ([[1], []], [s, pm.new_state()],
             "at least one token"), ([[1], [2]], [s, s], "share one state"), ([[1]], [torch.zeros(2, 72)], "shape"),
             ([[300]], [s], "outside the vocabulary")]
    for chunks, states, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            pm.step(chunks, states)
        assert "\n" not in str(info.value)
