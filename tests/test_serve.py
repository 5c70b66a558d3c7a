"""Continuous batching equals one-at-a-time generation, isolates failures, cancels and bounds its queue;
`serve` checks its flags before loading (the HTTP API: test_serve_api.py)."""

import json
import re
import socket
import time

import pytest
import torch

from mulfree.generation import generate
from mulfree.infer.batching import ContinuousBatcher, QueueFull, SamplingParams, TorchStepModel
from mulfree.infer.protocol import seed64
from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM
from mulfree.models.transformer import TransformerConfig, TransformerForCausalLM

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 50


def _mmfree(vocab=300):
    m = MMFreeForCausalLM(MMFreeConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, intermediate_size=64))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(std=0.5)
    return m.eval()


@pytest.mark.parametrize("family", ["mmfree", "transformer"])
def test_batched_decoding_equals_one_at_a_time(family):
    model = _mmfree() if family == "mmfree" else TransformerForCausalLM(
        TransformerConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)).eval()
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 11, 1, 7, 5)]
    lengths = [8, 3, 12, 1, 6]
    batcher = ContinuousBatcher(TorchStepModel(model), max_batch=4, prefill_chunk=4)  # prompts fed in chunks
    try:
        reqs = [batcher.submit(p, SamplingParams(max_new_tokens=n, temperature=0.0)) for p, n in zip(prompts, lengths)]
        results = [r.result() for r in reqs]
    finally:
        batcher.close()
    for p, n, got in zip(prompts, lengths, results):
        assert got == generate(model, torch.tensor(p), n)[0, len(p):].tolist()
    assert all(r.finish_reason == "length" for r in reqs)
    assert batcher.max_live > 1  # requests really shared decode steps (KV caches padded for Transformer++)
    assert batcher.steps < sum(lengths)


def test_live_count_returns_to_zero_when_requests_finish():
    batcher = ContinuousBatcher(TorchStepModel(_mmfree()), max_batch=4)
    try:
        reqs = [batcher.submit([1, 2, 3], SamplingParams(max_new_tokens=n)) for n in (2, 5)]
        assert [len(r.result()) for r in reqs] == [2, 5]
        deadline = time.monotonic() + 5
        while batcher.live and time.monotonic() < deadline:  # the loop drops them right after their last token
            time.sleep(0.01)
        assert batcher.live == 0
    finally:
        batcher.close()


def test_seeded_sampling_is_reproducible():
    batcher = ContinuousBatcher(TorchStepModel(_mmfree()), max_batch=4)
    try:
        params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, seed=7)
        a, b = (batcher.submit([1, 2, 3], params) for _ in range(2))
        assert a.result() == b.result()
    finally:
        batcher.close()


def test_one_failing_request_never_touches_the_others_or_the_loop():
    batcher = ContinuousBatcher(TorchStepModel(_mmfree()), max_batch=4)
    try:
        good = batcher.submit([1, 2, 3], SamplingParams(max_new_tokens=5))
        bad = batcher.submit([1, 2], SamplingParams(max_new_tokens=5, temperature=1.0, top_p=float("nan")))
        assert bad.result() == [] and bad.finish_reason == "error" and "top_p" in bad.error
        assert len(good.result()) == 5 and good.finish_reason == "length"
        assert batcher.alive and len(batcher.submit([4], SamplingParams(max_new_tokens=3)).result()) == 3
    finally:
        batcher.close()
    assert not batcher.alive


def test_cancel_frees_the_slot_and_the_queue_is_bounded():
    batcher = ContinuousBatcher(TorchStepModel(_mmfree()), max_batch=1, max_queue=2)
    try:
        long = batcher.submit([1], SamplingParams(max_new_tokens=10**6))
        next(long.stream())  # running
        queued = [batcher.submit([1], SamplingParams(max_new_tokens=1)) for _ in range(2)]
        with pytest.raises(QueueFull):
            batcher.submit([1], SamplingParams(max_new_tokens=1))
        long.cancel()
        long.result()
        assert long.finish_reason == "cancelled" and len(long.tokens) < 10**6
        assert [len(q.result()) for q in queued] == [1, 1]
        timed = batcher.submit([1], SamplingParams(max_new_tokens=10**6), timeout_s=0.2)
        timed.result()
        assert timed.finish_reason == "timeout"
    finally:
        batcher.close()


def test_a_long_prompt_is_fed_in_chunks_between_decode_steps():
    batcher = ContinuousBatcher(TorchStepModel(_mmfree()), max_batch=2, prefill_chunk=8)
    try:
        running = batcher.submit([1, 2], SamplingParams(max_new_tokens=2000))
        next(running.stream())
        seen: list[int] = []
        long = batcher.submit([3] * 400, SamplingParams(max_new_tokens=1),
                              sink=lambda t: seen.append(len(running.tokens)) if t is not None else None)
        long.result()
        running.cancel()
        running.result()
        assert seen and seen[0] >= 400 // 8 - 2  # the running stream got a token at every prefill chunk
    finally:
        batcher.close()


def test_huge_seeds_hash_into_64_bits():
    assert seed64(5) == 5 and 0 <= seed64(2**200) < 2**63 and 0 <= seed64(-1) < 2**63 and seed64(-1) != seed64(-2)


def test_serve_checks_host_and_port_before_loading(tmp_path, capsys):
    from mulfree.cli import main
    from mulfree.commands.serve import check_bind, valid_host
    from mulfree.errors import ConfigError

    assert valid_host("127.0.0.1") and valid_host("::1") and valid_host("localhost") and valid_host("my-host.lan")
    assert not valid_host("a;b") and not valid_host("-x") and not valid_host("")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_bind("127.0.0.1", port)
        assert main(["serve", "--model", str(tmp_path / "none"), "--port", str(port)]) == 2
    assert "cannot listen" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "none"), "--max-batch", "100000"]) == 2
    assert "--max-batch" in capsys.readouterr().err


def test_chat_template_from_a_jinja_file(tmp_path):
    # transformers 5 saves the template beside tokenizer_config.json as chat_template.jinja
    from mulfree.infer.protocol import ChatRequest, load_chat_template

    assert load_chat_template(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}"
                                                  "{% if add_generation_prompt %}>{% endif %}")
    messages = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).messages
    assert load_chat_template(tmp_path)(messages) == "[hi]>"
    # `{% break %}` / `{% continue %}`, which transformers' template environment allows too
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% break %}{% endfor %}")
    assert load_chat_template(tmp_path)(messages * 2) == "[hi]"


@pytest.mark.parametrize("config, message", [
    ('{"chat_template": "{% for', "cannot read the chat template in"),
    (b'\xff\xfe', "cannot read the chat template in"),
    ('{"chat_template": "{% for x in %}"}', "does not compile (line 1: Expected an expression"),
])
def test_a_broken_chat_template_is_a_one_line_error(tmp_path, config, message):
    """Not a silent fall back to the plain template, nor a traceback at start-up."""
    from mulfree.errors import ConfigError
    from mulfree.infer.protocol import load_chat_template

    path = tmp_path / "tokenizer_config.json"
    path.write_bytes(config if isinstance(config, bytes) else config.encode())
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_chat_template(tmp_path)


def test_chat_templates_render_as_transformers_renders_them(tmp_path):
    """tojson (no HTML escaping, non-ASCII kept), strftime_now, loop controls, namespace, raise_exception unused,
    bos_token: the same text as transformers' own renderer."""
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    from mulfree.infer.protocol import ChatRequest, load_chat_template

    template = ("{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'tool' %}"
                "{{ raise_exception('no tools') }}{% endif %}{% set ns.n = ns.n + 1 %}{{ m.role }}: "
                "{{ m.content | tojson }}\n{% if ns.n > 2 %}{% break %}{% endif %}{% endfor %}"
                "[{{ strftime_now('%Y') }}]{% if add_generation_prompt %}assistant:{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    turns = [{"role": "system", "content": "Be <brief> & \"exact\""}, {"role": "user", "content": "Grüße, 你好"},
             {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "more"}]
    ours = load_chat_template(tmp_path)(ChatRequest.model_validate({"model": "m", "messages": turns}).messages)
    theirs = chat_template_utils.render_jinja_template([turns], chat_template=template, add_generation_prompt=True,
                                                       bos_token="<s>")[0][0]
    assert ours == theirs and "Grüße" in ours and "<brief>" in ours
