"""decode_kv_batch: Transformer++ sequences of different lengths decoded in one forward match each
sequence decoded alone (logits and caches), through greedy runs, a batch of one, joins and leaves, on both of
its paths (rows' own caches grown in place; left-padded caches with a key mask). A cache grown in place never
changes what another holder of the same cache sees.

fp32 differs from the one-at-a-time path only by float rounding (batched matmuls and a longer, masked
softmax sum in another order); fp64 shows the same math agrees to ~1e-15."""

import pytest
import torch

from mulfree.infer.kv_batch import decode_kv_batch
from mulfree.models.transformer import TransformerConfig, TransformerForCausalLM
from mulfree.nn.attention import append_kv

TINY = {
    "vocab_size": 97,
    "hidden_size": 48,
    "num_hidden_layers": 3,
    "intermediate_size": 80,
    "num_attention_heads": 4,
}
LENGTHS = [5, 1, 12, 8, 3]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # atol and rtol; |logits| reach ~8 with this init


@pytest.fixture(params=[(torch.float32, True), (torch.float64, True), (torch.float32, False)],
                ids=["fp32-rows", "fp64-rows", "fp32-padded"])
def model(request) -> TransformerForCausalLM:
    torch.manual_seed(0)
    model = TransformerForCausalLM(TransformerConfig(**TINY)).eval()
    model.rows_kv = request.param[1]  # False: the padded path, as models without our attention take
    with torch.no_grad():  # larger than the 0.02 init, so a wrong position or mask moves the logits visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.3)
    return model.to(request.param[0])


def _prefill(model, n: int):
    with torch.no_grad():
        logits, cache = model(torch.randint(0, TINY["vocab_size"], (1, n)))
    return logits[0, -1], cache


def _alone(model, tokens, caches):
    with torch.no_grad():
        outs = [model(torch.tensor([[t]]), c) for t, c in zip(tokens, caches, strict=True)]
    return torch.stack([lg[0, -1] for lg, _ in outs]), [c for _, c in outs]


def _assert_match(model, batched, alone, exact: bool = False) -> None:
    """(logits, caches) from decode_kv_batch equal the one-at-a-time ones: values and shapes."""
    tol = 0.0 if exact else TOL[model.lm_head.weight.dtype]
    torch.testing.assert_close(batched, alone, atol=tol, rtol=tol)


def _random_tokens(n: int) -> list[int]:
    return torch.randint(0, TINY["vocab_size"], (n,)).tolist()


def test_batched_steps_match_alone(model):
    caches = alone = [_prefill(model, n)[1] for n in LENGTHS]
    for _ in range(4):
        tokens = _random_tokens(len(LENGTHS))
        logits, caches = decode_kv_batch(model, tokens, caches)
        ref_logits, alone = _alone(model, tokens, alone)
        assert logits.shape == (len(LENGTHS), TINY["vocab_size"]) and logits.dtype == torch.float32
        _assert_match(model, (logits, caches), (ref_logits, alone))
    assert [c[0][0].shape for c in caches] == [(1, 4, n + 4, 12) for n in LENGTHS]


def test_greedy_matches_alone(model):
    prefills = [_prefill(model, n) for n in LENGTHS]
    tokens = alone_tokens = [int(lg.argmax()) for lg, _ in prefills]
    caches = alone = [c for _, c in prefills]
    batched_run, alone_run = [tokens], [alone_tokens]
    for _ in range(8):
        logits, caches = decode_kv_batch(model, tokens, caches)
        tokens = logits.argmax(-1).tolist()
        ref_logits, alone = _alone(model, alone_tokens, alone)
        alone_tokens = ref_logits.argmax(-1).tolist()
        batched_run.append(tokens)
        alone_run.append(alone_tokens)
    assert batched_run == alone_run


def test_batch_of_one_equals_plain_forward(model):
    _, cache = _prefill(model, 7)
    _assert_match(model, decode_kv_batch(model, [11], [cache]), _alone(model, [11], [cache]), exact=True)


def test_join_and_leave(model):
    caches = alone = [_prefill(model, n)[1] for n in (4, 9, 2)]
    for step in range(6):
        if step == 2:  # a freshly prefilled sequence joins, the longest leaves
            fresh = _prefill(model, 6)[1]
            caches, alone = [caches[0], caches[2], fresh], [alone[0], alone[2], fresh]
        tokens = _random_tokens(len(caches))
        logits, caches = decode_kv_batch(model, tokens, caches)
        ref_logits, alone = _alone(model, tokens, alone)
        _assert_match(model, (logits, caches), (ref_logits, alone))


def test_left_padded_prefill_matches_alone(model):
    """positions + key_mask also batch prompts of different lengths, padding on the left, without NaN."""
    prompts = [torch.randint(0, TINY["vocab_size"], (n,)) for n in (3, 7)]
    pad = torch.tensor([7 - len(p) for p in prompts])[:, None]
    ids = torch.stack([torch.cat([torch.zeros(7 - len(p), dtype=torch.long), p]) for p in prompts])
    with torch.no_grad():
        logits, _ = model(
            ids, positions=(torch.arange(7) - pad).clamp(min=0), key_mask=torch.arange(7) >= pad
        )
        assert torch.isfinite(logits).all()
        for b, p in enumerate(prompts):
            ref, _ = model(p[None])
            _assert_match(model, logits[b, 7 - len(p) :], ref[0])


def test_append_kv_grows_in_place_only_for_the_latest_holder():
    cache, new = torch.randn(1, 2, 5, 4), torch.randn(3, 1, 2, 1, 4)
    a = append_kv(cache, new[0])  # a plain tensor: copied into a buffer with room
    assert torch.equal(a[:, :, :5], cache) and torch.equal(a[:, :, 5:], new[0]) and a._base.shape[2] >= 12
    b = append_kv(a, new[1])  # the latest view: written in place
    assert b.data_ptr() == a.data_ptr() and torch.equal(b[:, :, 6:], new[1])
    c = append_kv(a, new[2])  # a stale view (b went past it): a copy, b keeps its key
    assert c.data_ptr() != a.data_ptr() and torch.equal(c[:, :, 6:], new[2]) and torch.equal(b[:, :, 6:], new[1])
    assert torch.equal(c[:, :, :6], a) and torch.equal(append_kv(b[:, :, 2:], new[0])[:, :, :5], b[:, :, 2:])
    batch = append_kv(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 1, 4))  # a batch's buffer: its rows are copied
    row = append_kv(batch[:1], new[0])
    assert row.shape == (1, 2, 7, 4) and row.data_ptr() != batch.data_ptr() and torch.equal(row[:, :, :6], batch[:1])
    chunk = append_kv(row, torch.randn(1, 2, 3, 4))  # several positions at once, in place
    assert chunk.shape == (1, 2, 10, 4) and chunk.data_ptr() == row.data_ptr()


def test_two_rows_sharing_one_cache_decode_as_they_would_alone(model):
    _, cache = _prefill(model, 6)
    _, (cache,) = decode_kv_batch(model, [3], [cache])
    _, (grown, _) = decode_kv_batch(model, [4, 5], [cache, cache])  # make `cache` a view of a buffer with room
    tokens = [1, 2]
    logits, caches = decode_kv_batch(model, tokens, [grown, grown])  # both rows extend the same view
    _assert_match(model, (logits, caches), _alone(model, tokens, [grown, grown]))
    assert not torch.equal(caches[0][0][0][:, :, -1], caches[1][0][0][:, :, -1])
