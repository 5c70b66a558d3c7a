"""transformers integration: Auto registration, RecurrentCache generation, padding, save/load both ways."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mulfree.models.hf import MMFreeHFForCausalLM, RecurrentCache, to_hf  # noqa: E402
from mulfree.models.io import load_model, save_model  # noqa: E402
from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM  # noqa: E402


@pytest.fixture()
def model():
    m = MMFreeForCausalLM(MMFreeConfig(vocab_size=97, hidden_size=48, num_hidden_layers=3, intermediate_size=80))
    with torch.no_grad():  # large init: a cache that silently restarts from zero would show
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(std=0.5)
        m.model.lower_bounds.normal_()
    return m.eval()


def _greedy(model, ids, n):
    for _ in range(n):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generate_uses_the_recurrent_state(model):
    hf = to_hf(model)
    ids = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(hf(ids).logits, model(ids)[0], rtol=0, atol=0)
    out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, _greedy(model, ids, 12))
    cache = hf(ids[:, :6], use_cache=True).past_key_values
    assert isinstance(cache, RecurrentCache) and cache.get_seq_length() == 6
    step = hf(ids[:, 6:], past_key_values=cache).logits
    torch.testing.assert_close(step, hf(ids).logits[:, 6:], rtol=0, atol=1e-5)


def test_left_padding_matches_unpadded_generation(model):
    hf = to_hf(model)
    short, long = torch.randint(1, 97, (1, 4)), torch.randint(1, 97, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1), torch.ones(1, 9)]).long()
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out[0, 5:], _greedy(model, short, 6)[0])
    assert torch.equal(out[1], _greedy(model, long, 6)[0])


def test_beams_and_multiple_returns_run(model):
    hf = to_hf(model)
    ids = torch.randint(0, 97, (1, 5))
    out = hf.generate(ids, max_new_tokens=4, num_beams=3, num_return_sequences=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (3, 9)
    sampled = hf.generate(ids, max_new_tokens=4, do_sample=True, top_k=5, num_return_sequences=2, eos_token_id=None, pad_token_id=0)
    assert sampled.shape == (2, 9)


def test_auto_classes_read_our_dirs_and_we_read_theirs(model, tmp_path):
    save_model(model, tmp_path / "ours")
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert isinstance(auto, MMFreeHFForCausalLM)
    ids = torch.randint(0, 97, (1, 7))
    assert torch.equal(auto(ids).logits, model(ids)[0])
    auto.save_pretrained(tmp_path / "theirs")
    back, _ = load_model(tmp_path / "theirs")
    assert torch.equal(back(ids)[0], model(ids)[0])
