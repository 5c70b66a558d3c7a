"""Sampling filters and torch-engine generation (state reuse equals recomputing the whole prefix)."""

from __future__ import annotations

import pytest
import torch

from mulfree.errors import MulfreeError
from mulfree.generation import TextStreamer, generate
from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM
from mulfree.models.transformer import TransformerConfig, TransformerForCausalLM
from mulfree.ops.sampling import filter_logits, greedy, sample_next, sample_row

V = 50


def _model(kind):
    torch.manual_seed(0)
    if kind == "mmfree":
        m = MMFreeForCausalLM(MMFreeConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                           max_position_embeddings=64))
    else:
        m = TransformerForCausalLM(TransformerConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64,
                                                     max_position_embeddings=64))
    with torch.no_grad():  # large weights: a state that was silently dropped would change the tokens
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return m.eval()


@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_greedy_with_state_equals_recomputing_prefix(kind):
    model = _model(kind)
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    out = generate(model, prompt, 12, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert len(set(out[0, 5:].tolist())) > 1  # not a degenerate constant stream


def test_sampling_is_seeded_and_streams_each_token():
    model = _model("mmfree")
    prompt = torch.tensor([1, 2, 3])
    seen = []
    a = generate(model, prompt, 10, temperature=1.0, top_k=10, seed=7, callback=seen.append)
    b = generate(model, prompt, 10, temperature=1.0, top_k=10, seed=7)
    c = generate(model, prompt, 10, temperature=1.0, top_k=10, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert seen == a[0, 3:].tolist()
    assert torch.equal(generate(model, prompt, 10, temperature=1.0, top_k=1, seed=3),
                       generate(model, prompt, 10, temperature=0))


def test_eos_stops_generation():
    model = _model("mmfree")
    greedy = generate(model, torch.tensor([1, 2, 3]), 10, temperature=0)
    eos = int(greedy[0, 5])
    out = generate(model, torch.tensor([1, 2, 3]), 10, temperature=0, eos_token_id=eos)
    assert out[0, -1].item() == eos and out.shape[1] <= 6


def test_length_limits():
    with pytest.raises(MulfreeError, match="exceeds"):  # positions past max_position_embeddings have no RoPE table
        generate(_model("transformer"), torch.zeros(60, dtype=torch.long), 10)
    model = _model("mmfree")  # recurrent: no position limit (the official model has none)
    assert generate(model, torch.zeros(60, dtype=torch.long), 10).shape == (1, 70)
    with pytest.raises(MulfreeError, match=">= 0"):
        generate(model, torch.zeros(3, dtype=torch.long), -1)
    assert generate(model, torch.tensor([4, 5]), 0).tolist() == [[4, 5]]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top_p=0.8: 0.5 + 0.3 reaches 0.8, so the third token is dropped
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_logits(shuffled, top_p=0.8)).tolist() == [[True, False, True, False]]


def test_sample_next_distribution_and_errors():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).repeat(4000, 1)
    draws = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
    assert sample_next(logits[:2], 0.0).tolist() == [0, 0]
    with pytest.raises(ValueError):
        sample_next(logits, -1.0)
    with pytest.raises(ValueError):
        sample_next(logits, 1.0, top_p=0.0)


@pytest.mark.parametrize("top_k, top_p", [(None, None), (5, None), (None, 0.6), (None, 0.999), (8, 0.7), (0, 1.0)])
def test_sample_row_draws_the_filtered_distribution(top_k, top_p):
    # the reference: softmax of filter_logits (top-k, then top-p of the rest); 0.999 of a flat 600-token row
    # needs more than the first topk candidates
    logits = torch.randn(600, generator=torch.Generator().manual_seed(1)) * 2
    want = filter_logits(logits[None] / 0.7, top_k, top_p)[0].softmax(-1)
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.tensor([sample_row(logits, 0.7, top_k, top_p, g) for _ in range(n)])
    freq = torch.bincount(draws, minlength=600).float() / n
    assert bool((freq[want == 0] == 0).all())  # never outside the set
    assert (freq - want).abs().max() < 0.02
    top = want.argsort(descending=True)[:3]
    assert torch.allclose(freq[top], want[top], rtol=0.1)


def test_sample_row_is_seeded_and_greedy_at_zero():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    pick = [sample_row(logits, 1.0, None, 0.9, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert pick[0] == pick[1]
    assert sample_row(logits, 0.0) == int(logits.argmax())


def test_greedy_is_argmax_on_ties_and_non_finite_rows():
    logits = torch.randn(6, 300)
    logits[0, [7, 200]] = 50.0  # a tie: the first
    logits[1, 9] = float("nan")  # NaN wins, as in argmax
    logits[2] = float("-inf")
    logits[3, [3, 4]] = float("inf")
    logits[4, 299] = 1e30
    for x in (logits, logits.bfloat16(), logits[0]):
        assert torch.equal(greedy(x), x.argmax(-1))
    assert greedy(logits).tolist()[:5] == [7, 9, 0, 3, 299]


def test_text_streamer_holds_back_partial_utf8():
    from mulfree.data.text import encode, train_tokenizer

    tok = train_tokenizer("plain ascii text only " * 20, vocab_size=280)
    text = "héllo ✓ wörld"
    pieces = []
    streamer = TextStreamer(tok, pieces.append)
    for t in encode(tok, text).tolist():
        streamer(t)
    streamer.flush()
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": float("nan")}, "--temperature must be a finite"),
    ({"temperature": float("inf")}, "--temperature must be a finite"),
    ({"top_p": float("nan"), "temperature": 1.0}, "--top-p must be a finite"),
    ({"top_p": 2.0, "temperature": 1.0}, "--top-p must be <= 1"),
    ({"seed": 2**70, "temperature": 1.0}, "--seed must be <="),
])
def test_non_finite_and_out_of_range_sampling_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(MulfreeError, match=message):
        generate(_model("mmfree"), torch.tensor([1, 2, 3]), 4, **kwargs)
