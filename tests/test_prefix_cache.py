"""Prefix caching of recurrent states: the cache keeps block-end states by chained key, hands out copies and
evicts least recently used; a batcher with it gives the same tokens as one without (the packed engine exactly),
skipping the cached part of a repeated prompt or a chat's next turn; the server reports it in `usage`."""

from __future__ import annotations

import pytest
import torch

from mulfree.generation import generate
from mulfree.infer.batching import ContinuousBatcher, PackedStepModel, SamplingParams, TorchStepModel
from mulfree.infer.engine import PackedModel
from mulfree.infer.prefix_cache import PrefixCache, block_keys, entry_bytes
from mulfree.models.transformer import TransformerConfig, TransformerForCausalLM

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_serve import _mmfree
from test_serve_api import Running, tiny_model_dir

from mulfree.infer.server import Server


def _cache(max_bytes=1 << 20, block=4):
    return PrefixCache(max_bytes, PackedStepModel.copy_state, block=block)


def test_block_keys_chain_every_token_before_them_and_extend_incrementally():
    ids = list(range(10))
    keys = block_keys(ids, 4)
    assert len(keys) == 2 and len(set(keys)) == 2
    assert block_keys(ids[:8], 4) == keys  # a partial last block has no key
    assert block_keys([99] + ids[1:], 4)[1] != keys[1]  # the second block's key names the first block too
    grown = block_keys(ids[:5], 4)
    assert block_keys(ids + [10, 11], 4, grown) == block_keys(ids + [10, 11], 4) and len(grown) == 3


def _look(cache, ids, past=0):
    return cache.lookup(cache.prompt_keys(ids), past)


def test_lookup_finds_the_longest_cached_block_prefix_short_of_the_last_token():
    cache, ids = _cache(), list(range(1, 13))
    keys = block_keys(ids, 4)
    for k, key in enumerate(keys):
        cache.store(key, torch.full((2, 3), float(k)))
    assert _look(cache, ids)[0] == 8  # 12 would leave no token to feed
    n, state = _look(cache, ids + [50])
    assert n == 12 and torch.equal(state, torch.full((2, 3), 2.0))
    assert _look(cache, ids[:6])[0] == 4
    assert _look(cache, [0] + ids[1:]) == (0, None)  # the first block differs: nothing matches
    assert _look(cache, ids[:4]) == (0, None)
    assert _look(cache, ids + [50], past=12) == (0, None)  # nothing past what the sequence has already
    assert _look(cache, ids + [50], past=4)[0] == 12
    assert cache.hit_tokens == 8 + 12 + 4 + 8  # tokens whose prefill was skipped


def test_the_cache_hands_out_copies_and_keeps_its_own():
    cache, state = _cache(), torch.zeros(2, 3)
    key = block_keys([1, 2, 3, 4], 4)[0]
    cache.store(key, state)
    state += 1  # the engine updates a sequence's state in place after the snapshot
    _, got = _look(cache, [1, 2, 3, 4, 5])
    got += 5
    assert torch.equal(_look(cache, [1, 2, 3, 4, 5])[1], torch.zeros(2, 3))


def test_least_recently_used_states_go_first_past_the_byte_budget():
    one = torch.zeros(4, 8)
    cache = _cache(max_bytes=2 * entry_bytes(one))
    prompts = [[p] * 4 for p in range(3)]
    cache.store(block_keys(prompts[0], 4)[0], one)
    cache.store(block_keys(prompts[1], 4)[0], one)
    assert _look(cache, prompts[0] + [9])[0] == 4  # now the most recent
    cache.store(block_keys(prompts[2], 4)[0], one)
    assert len(cache) == 2 and cache.bytes == 2 * entry_bytes(one) and cache.evictions == 1
    assert [_look(cache, p + [9])[0] for p in prompts] == [4, 0, 4]
    PrefixCache(0, PackedStepModel.copy_state).store(b"k", one)  # a budget of nothing keeps nothing


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return PackedModel.load(tiny_model_dir(tmp_path_factory.mktemp("prefix") / "tiny"))


def _run(batcher, prompt, n, **sampling):
    req = batcher.submit(prompt, SamplingParams(max_new_tokens=n, **sampling))
    return req.result(), req.cached_tokens


def test_packed_batcher_with_the_cache_gives_the_same_tokens_and_skips_the_cached_prefix(packed):
    torch.manual_seed(1)
    first = torch.randint(0, 300, (70,)).tolist()
    cache = PrefixCache(1 << 24, PackedStepModel.copy_state, block=16)
    batcher = ContinuousBatcher(PackedStepModel(packed), max_batch=4, prefill_chunk=24, prefix_cache=cache)
    try:
        reply, cached = _run(batcher, first, 20)
        assert cached == 0 and reply == packed.generate(first, 20)
        again, cached = _run(batcher, first, 20)
        # chunks of at most 24 end on blocks (16, 32, 48, then 64: the prompt's last full block, before its tail)
        assert again == reply and cached == 64
        turn = first + reply + torch.randint(0, 300, (9,)).tolist()  # a chat's next turn resends the reply
        tokens, cached = _run(batcher, turn, 12)
        assert cached == 80 and tokens == packed.generate(turn, 12)  # 80 = 70 prompt + 10 decoded, a block end
        sampled = {"temperature": 1.0, "top_k": 50, "seed": 3}
        steps = batcher.steps
        plain = ContinuousBatcher(PackedStepModel(packed))
        try:
            assert _run(batcher, turn, 12, **sampled)[0] == _run(plain, turn, 12, **sampled)[0]
        finally:
            plain.close()
        assert batcher.steps - steps == 12  # from 96 (the greedy run's last full block): 3 tokens and the first
    finally:
        batcher.close()


def test_torch_recurrent_batcher_with_the_cache_equals_generate():
    model = _mmfree()
    torch.manual_seed(2)
    prompt = torch.randint(0, 300, (37,)).tolist()
    batcher = ContinuousBatcher(TorchStepModel(model), prefill_chunk=16,
                                prefix_cache=PrefixCache(1 << 24, TorchStepModel.copy_state, block=8))
    try:
        expected = generate(model, torch.tensor(prompt), 6)[0, len(prompt):].tolist()
        assert _run(batcher, prompt, 6) == (expected, 0)
        assert _run(batcher, prompt, 6) == (expected, 32)
    finally:
        batcher.close()


def test_server_reports_cached_prompt_tokens_in_usage_and_metrics(packed):
    tok = packed.tokenizer
    cache = PrefixCache(1 << 24, PackedStepModel.copy_state, block=8)
    run = Running(Server(ContinuousBatcher(PackedStepModel(packed), prefill_chunk=8, prefix_cache=cache), tok, "tiny",
                         request_timeout_s=20))
    try:
        client = openai.OpenAI(base_url=run.url + "/v1", api_key="x", timeout=20, max_retries=0)
        prompt = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 2
        n = len(tok.encode(prompt).ids)
        ask = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0}
        first, second = client.completions.create(**ask), client.completions.create(**ask)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 8 * 8 > 0
        assert second.choices[0].text == first.choices[0].text
        reply = client.responses.create(model="tiny", input=[{"role": "user", "content": prompt}], max_output_tokens=4)
        again = client.responses.create(model="tiny", input=[{"role": "user", "content": prompt}], max_output_tokens=4)
        assert reply.usage.input_tokens_details.cached_tokens == 0 < again.usage.input_tokens_details.cached_tokens
        metrics = httpx.get(run.url + "/metrics", timeout=10).text
        assert f"mulfree_prefix_cache_hit_tokens_total {float(cache.hit_tokens)}" in metrics
        assert cache.hit_tokens >= (n - 1) // 8 * 8
    finally:
        run.stop()


@pytest.mark.parametrize("chunk", [16, 40, 64])
def test_prompts_arriving_together_feed_their_shared_blocks_once(packed, chunk):
    torch.manual_seed(3)
    shared = torch.randint(0, 300, (100,)).tolist()
    prompts = [shared + torch.randint(0, 300, (5,)).tolist() for _ in range(4)]
    cache = PrefixCache(1 << 24, PackedStepModel.copy_state, block=16)
    batcher = ContinuousBatcher(PackedStepModel(packed), max_batch=4, prefill_chunk=chunk, prefix_cache=cache)
    try:
        reqs = [batcher.submit(p, SamplingParams(max_new_tokens=6)) for p in prompts]
        results = [r.result() for r in reqs]
    finally:
        batcher.close()
    assert results == [packed.generate(p, 6) for p in prompts]
    # whichever came first fed the 96 tokens of full shared blocks (its last chunk split at 96 for the others)
    assert sorted(r.cached_tokens for r in reqs) == [0, 96, 96, 96]


def test_the_plain_chat_template_reads_a_resent_reply_back_as_it_was_generated():
    from mulfree.infer.protocol import ChatMessage, chat_prompt

    turn = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Who art thou?")]
    reply = " A player.\nNo more."  # what the model wrote after 'assistant:'
    again = chat_prompt([*turn, ChatMessage(role="assistant", content=reply), ChatMessage(role="user", content="Whence?")])
    assert again.startswith(chat_prompt(turn) + reply)  # so the next turn's prompt extends the cached one
    assert chat_prompt([ChatMessage(role="user", content="hi")]) == "user: hi\nassistant:"


def _kv(tokens, layers=2, fill=0.0):
    """A KV cache of `tokens` positions whose values name their position (and `fill`)."""
    t = torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1).expand(1, 2, tokens, 3) + fill
    return [(t.clone(), -t.clone()) for _ in range(layers)]


def _chained(max_bytes=1 << 20, block=4):
    return PrefixCache(max_bytes, TorchStepModel.copy_state, block=block, join=TorchStepModel.join_states)


def test_a_chained_cache_joins_the_kv_blocks_of_the_longest_run_from_the_first():
    cache, ids = _chained(), list(range(1, 14))
    kv, keys = _kv(12), block_keys(ids, 4)
    for i in (0, 1, 2):
        cache.store(keys[i], TorchStepModel.block_state(kv, 4 * i, 4 * i + 4, 12))
    n, state = _look(cache, ids)
    assert n == 12 and all(torch.equal(a, b) for layer, want in zip(state, kv) for a, b in zip(layer, want))
    kv[0][0].add_(1)  # the stored slices are copies
    assert torch.equal(_look(cache, ids)[1][0][0], _kv(12)[0][0])
    assert _look(cache, ids, past=12) == (0, None) and _look(cache, ids, past=9)[0] == 12
    other = [0] + ids[1:]
    cache.store(block_keys(other, 4)[1], TorchStepModel.block_state(_kv(8), 4, 8, 8))
    assert _look(cache, other) == (0, None)  # its second block alone is no prefix
    assert TorchStepModel.block_state(_kv(8), 4, 8, 9) is None  # a layer short of the tokens fed (sliding window)


def test_a_chained_cache_evicts_the_last_blocks_of_a_run_first():
    one = TorchStepModel.block_state(_kv(4), 0, 4, 4)
    cache, ids = _chained(max_bytes=3 * entry_bytes(one)), list(range(1, 18))
    keys = block_keys(ids, 4)
    for key in keys[:3]:
        cache.store(key, one)
    assert _look(cache, ids)[0] == 12  # touches the run: the first block is now the most recent
    cache.store(keys[3], one)  # over budget by one: the run's last block goes, not its first
    assert cache.evictions == 1 and _look(cache, ids)[0] == 8


def _transformer():
    torch.manual_seed(4)
    return TransformerForCausalLM(
        TransformerConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)).eval()


def test_kv_batcher_with_the_cache_equals_generate_and_skips_the_cached_blocks():
    model = _transformer()
    first = torch.randint(0, 300, (45,)).tolist()
    batcher = ContinuousBatcher(TorchStepModel(model), max_batch=4, prefill_chunk=24, prefix_cache=_chained(1 << 24, 8))
    try:
        expected = generate(model, torch.tensor(first), 10)[0, len(first):].tolist()
        assert _run(batcher, first, 10) == (expected, 0)
        assert _run(batcher, first, 10) == (expected, 40)  # chunks of 24 need not end on a block: every block is kept
        turn = first + expected + torch.randint(0, 300, (6,)).tolist()  # the next turn resends the reply
        assert _run(batcher, turn, 5) == (generate(model, torch.tensor(turn), 5)[0, len(turn):].tolist(), 48)
        shared = turn + torch.randint(0, 300, (30,)).tolist()
        reqs = [batcher.submit(shared + [t], SamplingParams(max_new_tokens=4)) for t in (1, 2, 3)]
        for req, t in zip(reqs, (1, 2, 3)):
            assert req.result() == generate(model, torch.tensor(shared + [t]), 4)[0, len(shared) + 1:].tolist()
        # the turn's 61 tokens hold 7 full blocks; whichever came first fed the next 4 blocks, which the others took
        assert sorted(r.cached_tokens for r in reqs) == [56, 88, 88]
    finally:
        batcher.close()


def test_a_repeated_prompt_shorter_than_a_chunk_starts_at_its_last_full_block(packed):
    torch.manual_seed(5)
    prompt = torch.randint(0, 300, (40,)).tolist()
    batcher = ContinuousBatcher(PackedStepModel(packed), prefill_chunk=128,
                                prefix_cache=PrefixCache(1 << 24, PackedStepModel.copy_state, block=16))
    try:  # one chunk would hold the whole prompt: it stops at 32 so that a regenerated answer starts there
        assert _run(batcher, prompt, 5) == (packed.generate(prompt, 5), 0)
        assert _run(batcher, prompt, 5, temperature=1.0, seed=1)[1] == 32
    finally:
        batcher.close()
