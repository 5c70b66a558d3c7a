"""transformers integration: Auto registration, RecurrentCache generation, padding, save/load both ways."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mulfree.models.hf import MMFreeHFForCausalLM, RecurrentCache, to_hf  # noqa: E402
from mulfree.models.io import load_model, save_model  # noqa: E402
from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM  # noqa: E402


def _make(vocab_size=97):
    m = MMFreeForCausalLM(MMFreeConfig(vocab_size=vocab_size, hidden_size=48, num_hidden_layers=3, intermediate_size=80))
    with torch.no_grad():  # large init: a cache that silently restarts from zero would show
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(std=0.5)
        m.model.lower_bounds.normal_()
    return m.eval()


@pytest.fixture()
def model():
    return _make()


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


def _tiny_dir(tmp_path, with_tokenizer_config=True):
    """A model over 300 ids saved with our BPE tokenizer (as `mulfree train` writes it, or an older dir
    without tokenizer_config.json)."""
    from mulfree.data.text import save_tokenizer, train_tokenizer

    model = _make(300)
    tok = train_tokenizer("the cat sat on the mat. <|endoftext|> a dog ran. " * 40, vocab_size=300)
    d = tmp_path / ("new" if with_tokenizer_config else "old")
    save_model(model, d, tok)
    if with_tokenizer_config:
        save_tokenizer(tok, d)
    return d, model


@pytest.mark.parametrize("with_tokenizer_config", [True, False])
def test_generate_stops_at_endoftext(tmp_path, with_tokenizer_config):
    """`<|endoftext|>` (id 0) ends generation, for new dirs and for dirs saved before tokenizer_config.json."""
    d, model = _tiny_dir(tmp_path, with_tokenizer_config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d)
    assert hf.generation_config.eos_token_id == 0 and hf.generation_config.pad_token_id == 0
    prompt = torch.tensor([[5, 9, 14]])
    free = _greedy(model, prompt, 12)[0, 3:].tolist()
    x = next(t for t in free if t != 0)  # make the first generated token x the eos: swap ids x and 0
    swap = torch.arange(300)
    swap[[0, x]] = swap[[x, 0]]
    with torch.no_grad():
        hf.model.embeddings.weight.copy_(hf.model.embeddings.weight[swap])
        hf.lm_head.weight.copy_(hf.lm_head.weight[swap])  # per-tensor weight scale: unchanged by a row swap
    out = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0, 3:].tolist()
    k = free.index(x)
    assert out == [int(swap[t]) for t in free[: k + 1]] and out[-1] == 0


@pytest.mark.parametrize("with_tokenizer_config", [True, False])
def test_pipeline_batches_and_matches_one_by_one(tmp_path, with_tokenizer_config):
    d, _ = _tiny_dir(tmp_path, with_tokenizer_config)
    prompts = ["the cat", "a dog ran on the mat", "sat"]
    pipe = transformers.pipeline("text-generation", model=str(d))
    kw = {"max_new_tokens": 6, "do_sample": False, "return_full_text": False}
    batched = pipe(prompts, batch_size=3, **kw)
    single = [pipe(p, **kw) for p in prompts]
    assert pipe.tokenizer.pad_token_id == 0 and pipe.tokenizer.padding_side == "left"
    assert batched == single


def test_generate_has_no_position_cap(model, tmp_path):
    model.config.max_position_embeddings = 8
    hf = to_hf(model)
    ids = torch.randint(1, 97, (1, 7))
    with pytest.warns(UserWarning, match="default `max_length`"):  # transformers' default: 20 new tokens
        assert hf.generate(ids, do_sample=False, eos_token_id=None, pad_token_id=0).shape == (1, 27)
    out = hf.generate(ids, max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, _greedy(model, ids, 15)) and hf.config.max_position_embeddings == 8


def test_packed_dir_is_refused_with_a_pointer_to_packedmodel(model, tmp_path):
    import json

    save_model(model, tmp_path / "packed")
    cfg = json.loads((tmp_path / "packed" / "config.json").read_text())
    cfg.update(format="mulfree-t2", format_version=1, crc32=0)
    (tmp_path / "packed" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="PackedModel.load") as info:
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert "\n" not in str(info.value)
