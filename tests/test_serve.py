"""Continuous batching equals one-at-a-time generation; the OpenAI-compatible API answers like OpenAI's."""

import asyncio
import json
import socket
import threading
import time
import urllib.request

import pytest
import torch

from mulfree.data.text import train_tokenizer
from mulfree.generation import generate
from mulfree.infer.batching import ContinuousBatcher, SamplingParams, TorchStepModel
from mulfree.infer.server import App
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
    batcher = ContinuousBatcher(TorchStepModel(model), max_batch=4)
    try:
        reqs = [batcher.submit(p, SamplingParams(max_new_tokens=n, temperature=0.0)) for p, n in zip(prompts, lengths)]
        results = [r.result() for r in reqs]
    finally:
        batcher.close()
    for p, n, got in zip(prompts, lengths, results):
        assert got == generate(model, torch.tensor(p), n)[0, len(p):].tolist()
    assert all(r.finish_reason == "length" for r in reqs)
    if family == "mmfree":
        assert batcher.max_live > 1  # requests really shared decode steps
        assert batcher.steps < sum(lengths)


def test_seeded_sampling_is_reproducible():
    batcher = ContinuousBatcher(TorchStepModel(_mmfree()), max_batch=4)
    try:
        params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, seed=7)
        a, b = (batcher.submit([1, 2, 3], params) for _ in range(2))
        assert a.result() == b.result()
    finally:
        batcher.close()


def _call(app, method, path, body=None):
    """Drive the ASGI app in-process; returns (status, headers, body bytes)."""
    messages = []
    payload = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")

    async def receive():
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message):
        messages.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": path, "headers": []}, receive, send))
    start = messages[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in messages[1:])


@pytest.fixture(scope="module")
def app():
    tok = train_tokenizer(TEXT, vocab_size=300)
    model = _mmfree(tok.get_vocab_size())
    batcher = ContinuousBatcher(TorchStepModel(model), max_batch=4)
    yield App(batcher, tok, "tiny", max_prompt_tokens=64), model, tok
    batcher.close()


def test_completion_matches_greedy_generation_and_streams_the_same_text(app):
    server, model, tok = app
    body = {"prompt": "To be, or not", "max_tokens": 12, "temperature": 0}
    status, headers, raw = _call(server, "POST", "/v1/completions", body)
    assert status == 200 and headers[b"content-type"] == b"application/json"
    out = json.loads(raw)
    ids = tok.encode("To be, or not").ids
    expected = generate(model, torch.tensor(ids), 12)[0, len(ids):].tolist()
    assert out["choices"][0]["text"] == tok.decode(expected)
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}
    status, headers, raw = _call(server, "POST", "/v1/completions", {**body, "stream": True})
    events = [e[len("data: "):] for e in raw.decode().split("\n\n") if e]
    assert headers[b"content-type"] == b"text/event-stream" and events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == out["choices"][0]["text"]


def test_chat_and_errors(app):
    server, _, _ = app
    status, _, raw = _call(server, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "Speak"}], "max_tokens": 4, "temperature": 0})
    out = json.loads(raw)
    assert status == 200 and out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert _call(server, "GET", "/v1/models")[0] == 200
    for body, match in [(b"{oops", "not valid JSON"), ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
                        ({"prompt": ""}, "prompt"), ({"prompt": "x " * 80}, "exceeds"), ({"messages": []}, "messages")]:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        status, _, raw = _call(server, "POST", path, body)
        assert status == 400 and match in json.loads(raw)["error"]["message"]
    assert _call(server, "GET", "/nope")[0] == 404


def test_served_over_http_on_loopback(app):
    uvicorn = pytest.importorskip("uvicorn")
    server_app, _, _ = app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(server_app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "To be", "max_tokens": 3, "temperature": 0}).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 3
    finally:
        server.should_exit = True
        thread.join(timeout=10)


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
