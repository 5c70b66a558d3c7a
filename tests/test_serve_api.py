"""The OpenAI-compatible server driven by the official `openai` client against a real uvicorn on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from mulfree.data.text import train_tokenizer
from mulfree.generation import context_limit, generate
from mulfree.infer.batching import ContinuousBatcher, TorchStepModel
from mulfree.infer.server import Server, build_app
from mulfree.infer.transport import guarded_protocol
from mulfree.models.io import load_model, save_model
from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 50


def _family(text: str, name: str):
    """The metric family `name` of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}[name]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_dir(path):
    """A random MMfree model dir with a trained byte-level BPE tokenizer, as `mulfree train` writes one."""
    tok = train_tokenizer(TEXT, vocab_size=300)
    torch.manual_seed(0)
    m = MMFreeForCausalLM(MMFreeConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                       intermediate_size=64, max_position_embeddings=128))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(std=0.5)
    save_model(m, path, tok)
    return path


class Running:
    """A uvicorn server in a thread on a random loopback port (stopped by `stop`, bounded in time)."""

    def __init__(self, srv: Server, origins: tuple[str, ...] = (), **uvicorn_kw):
        self.srv, self.port = srv, free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_app(srv, origins), host="127.0.0.1", port=self.port,
                                                    log_level="error", timeout_graceful_shutdown=2, **uvicorn_kw))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny")
    model, tok = load_model(model_dir)
    batcher = ContinuousBatcher(TorchStepModel(model), max_batch=4, eos_token_id=None, max_queue=8)
    srv = Server(batcher, tok, "tiny", context_limit=context_limit(model), max_prompt_tokens=64,
                 max_body_bytes=64 * 1024, request_timeout_s=20)
    run = Running(srv, http=guarded_protocol(1.0))
    client = openai.OpenAI(base_url=run.url + "/v1", api_key="x", timeout=20, max_retries=0)
    yield run, client, model, tok
    run.stop()


def greedy(model, tok, prompt: str, n: int) -> str:
    ids = tok.encode(prompt).ids
    return tok.decode(generate(model, torch.tensor(ids), n)[0, len(ids):].tolist())


def test_completion_equals_generate_and_streams_the_same_text(served):
    _run, client, model, tok = served
    out = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0)
    assert out.choices[0].text == greedy(model, tok, "To be, or not", 12)
    assert out.choices[0].finish_reason == "length"
    ids = tok.encode("To be, or not").ids
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 12)
    chunks = list(client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    # prompts as a list of strings and as token ids
    many = client.completions.create(model="tiny", prompt=["To be, or not", "Whether"], max_tokens=5, temperature=0)
    assert [c.text for c in many.choices] == [greedy(model, tok, p, 5) for p in ("To be, or not", "Whether")]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == greedy(model, tok, "To be, or not", 5)


def test_chat_n_seeds_and_models(served):
    _run, client, _model, _tok = served
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Speak"}]}]
    out = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=6, temperature=0, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 18
    assert len({c.message.content for c in out.choices}) == 1 and out.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    kw = {"model": "tiny", "prompt": "To be", "max_tokens": 10, "temperature": 1.0}
    a, b = (client.completions.create(seed=2**70 + 3, **kw).choices[0].text for _ in range(2))
    assert a == b  # a huge seed is accepted and reproducible
    unseeded = {client.completions.create(**kw).choices[0].text for _ in range(4)}
    assert len(unseeded) > 1  # a fresh random seed per request
    assert [m.id for m in client.models.list().data] == ["tiny"] and client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


def test_stop_strings_never_leak_and_usage_ends_with_the_text(served):
    _run, client, model, tok = served
    full = greedy(model, tok, "To be, or not", 30)
    at = next(i for i in range(2, len(full) - 3) if full[i : i + 3].isascii() and full[i : i + 3].isprintable())
    stop = full[at : at + 3]  # a string the greedy text is known to contain
    cut = full[: full.index(stop)]
    out = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=30, temperature=0, stop=[stop])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="To be, or not", max_tokens=30, temperature=0,
                                            stop=stop, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut
    used = chunks[-1].usage.completion_tokens
    assert used == out.usage.completion_tokens < 30
    ids = tok.encode("To be, or not").ids
    gen = generate(model, torch.tensor(ids), 30)[0, len(ids):].tolist()
    assert stop in tok.decode(gen[:used]) and stop not in tok.decode(gen[: used - 1])


def test_logprobs(served):
    _run, client, _model, _tok = served
    out = client.completions.create(model="tiny", prompt="To be", max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) <= 2 and abs(max(top.values()) - chosen) < 1e-5  # greedy: the top token
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    chunks = list(client.completions.create(model="tiny", prompt="To be", max_tokens=6, temperature=0, logprobs=2,
                                            stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    # text_offset counts on through the stream (each chunk restarted it at 0), as in the whole answer
    assert [o for p in parts for o in p.text_offset] == lp.text_offset


def post(run, path, content, headers=None):
    with httpx.Client(timeout=20) as c:
        return c.post(run.url + path, content=content, headers={"content-type": "application/json", **(headers or {})})


BAD = [
    ({"prompt": "x", "temperature": float("nan")}, 400), ({"prompt": "x", "top_p": float("inf")}, 400),
    ({"prompt": "x", "stop": 5}, 400), ({"prompt": "x", "max_tokens": "3"}, 400), ({"prompt": 7}, 400),
    ({"prompt": "x", "max_tokens": -1}, 400), ({"prompt": ""}, 400), ({"prompt": "x " * 80}, 400),
    ({"prompt": [10**9]}, 400), ({"prompt": "x", "n": 0}, 400), ({"prompt": "x", "logprobs": 9}, 400),
    ({"prompt": "x", "echo": True, "stream": True}, 400), ({"prompt": "x", "presence_penalty": 1}, 400),
    ({"prompt": "x", "max_tokens": 10**6}, 400), ({"prompt": ["x"] * 20, "n": 4}, 400),
    ({"prompt": "x", "n": 16}, 429), ({"prompt": "x", "response_format": {"type": "json_object"}}, 400),
    ({"prompt": "x", "model": "other"}, 404), ({"prompt": "ab\ud800"}, 400), ({"prompt": ["x", "\udc00"]}, 400),
    ({"prompt": "x", "stream": "yes"}, 400), ({"prompt": [True]}, 400), ({"prompt": [1.5]}, 400),
]


def test_bad_input_is_a_4xx_json_error_and_the_server_keeps_serving(served):
    run, client, _, _ = served
    for body, status in BAD:
        raw = json.dumps({"model": "tiny", **body}).replace("NaN", "NaN").encode()
        r = post(run, "/v1/completions", raw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    for raw, status in [(b"{oops", 400), (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400), (b"[1]", 400),
                        (b'{"model": "tiny", "messages": []}', 400), (b"x" * (65 * 1024), 413),
                        (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400),
                        (b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400),
                        (b'{"model": "tiny", "prompt": ' + b"[" * 30000 + b"]" * 30000 + b"}", 400)]:
        path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
        r = post(run, path, raw)
        assert r.status_code == status and "error" in r.json(), raw[:40]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, status in [({"modalities": ["text", "audio"]}, 400), ({"audio": {"voice": "alloy"}}, 400),
                          ({"web_search_options": {}}, 400), ({"functions": [{"name": "f"}]}, 400),
                          ({"modalities": ["text"], "audio": None, "user": "u", "store": False}, 200)]:
        r = post(run, "/v1/chat/completions", json.dumps({**chat, **extra}).encode())  # were accepted and ignored
        assert r.status_code == status, (extra, r.text)
    with socket.create_connection(("127.0.0.1", run.port), timeout=5) as sock:  # a 100 MB body announced: 413 at once
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100000000\r\n\r\n{")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    with httpx.Client(timeout=5) as c:
        assert c.get(run.url + "/nope").json()["error"]["code"] == "not_found"
        assert c.get(run.url + "/health").status_code == 200
        head = c.head(run.url + "/health")  # a load balancer's probe (405 before)
        assert head.status_code == 200 and head.content == b""
        metrics = c.get(run.url + "/metrics").text
    assert "mulfree_requests_total" in metrics and "mulfree_queue_depth" in metrics
    assert 'status="400"' in metrics
    steps = _family(metrics, "mulfree_decode_steps")
    assert steps.type == "counter"  # it only grows: a counter, so that rate() applies (it was a gauge)
    out = client.completions.create(model="tiny", prompt="To be", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    after = _family(httpx.get(run.url + "/metrics", timeout=5).text, "mulfree_decode_steps")
    assert after.samples[0].value >= steps.samples[0].value + 2


def test_error_messages_name_the_real_problem(served):
    """A union field's error is the broken constraint, or what the field takes, never "should be a valid string"
    for a list; surrogates and unreadable numbers are named."""
    run = served[0]
    cases = [({"prompt": [-1]}, "prompt.0: Input should be greater than or equal to 0"),
             ({"prompt": [1.5]}, "prompt: should be a string, a list of strings, a list of token ids"),
             ({"prompt": "x", "stop": ["a"] * 5}, "stop: List should have at most 4 items"),
             ({"prompt": "ab\ud800"}, "the prompt is not valid Unicode (a lone surrogate, U+D800, at character 2)")]
    for body, message in cases:
        assert post(run, "/v1/completions", json.dumps({"model": "tiny", **body})).json()["error"]["message"].startswith(
            message)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    err = post(run, "/v1/chat/completions", json.dumps(chat)).json()["error"]
    assert (err["message"], err["param"]) == ("messages.0.content.0.type: Input should be 'text'",
                                              "messages.0.content.0.type")
    raw = b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"
    assert "number too long" in post(run, "/v1/completions", raw).json()["error"]["message"]


def raw_exchange(port: int, data: bytes) -> bytes:
    """What the server answers to `data` sent on a fresh connection, until it closes it."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except ConnectionResetError:  # it closed with our unread bytes pending: what it sent before is in `out`
            pass
    return out


def test_http_framing_errors_are_json_and_echoes_are_bounded(served):
    run, client, _, _ = served
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    for broken in [head + b"content-length: -5\r\n\r\n{}", head + b"content-length: 2\r\ncontent-length: 3\r\n\r\n{}",
                   head + b"transfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", b"\x00\xff" * 50 + b"\r\n\r\n",
                   b"GET /health HTTP/1.1\r\nhost: x\r\nx-a: " + b"a" * 200_000 + b"\r\n\r\n"]:
        status, _, body = raw_exchange(run.port, broken).partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in status, broken[:60]
        assert json.loads(body)["error"]["code"] == "bad_http_request"
    long_path = "/" + "a" * 60_000
    for r in (httpx.get(run.url + long_path, timeout=5),
              post(run, "/v1/completions", json.dumps({"model": "m" * 30_000, "prompt": "x"}))):
        assert r.status_code == 404 and len(r.json()["error"]["message"]) < 300
    assert client.completions.create(model="tiny", prompt="To be", max_tokens=2, temperature=0).usage.total_tokens


def test_idle_and_half_sent_connections_are_closed_and_health_stays_fast(served):
    run, client, _, _ = served
    socks = []
    try:
        for i in range(300):  # idle, and a request head that never ends (slowloris)
            s = socket.create_connection(("127.0.0.1", run.port), timeout=5)
            if i % 3 == 0:
                s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
            socks.append(s)
        t = time.monotonic()
        assert httpx.get(run.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - t < 1.0
        time.sleep(1.3)  # past the 1 s header timeout: the server has closed them all
        for s in socks:
            s.settimeout(2)
            assert s.recv(1) == b""
    finally:
        for s in socks:
            s.close()
    assert client.completions.create(model="tiny", prompt="To be", max_tokens=2, temperature=0).usage.total_tokens


def test_disconnect_mid_stream_frees_the_slot(served):
    run, client, _, _ = served
    batcher = run.srv.batcher
    body = json.dumps({"model": "tiny", "prompt": "To be", "max_tokens": 100, "temperature": 1.0, "stream": True})
    responses = json.dumps({"model": "tiny", "input": "To be", "max_output_tokens": 100, "stream": True})
    with httpx.Client(timeout=20) as c:
        for path, content in [("/v1/completions", body)] * 3 + [("/v1/responses", responses)]:
            # fill every slot with a stream and drop it after its first event
            with c.stream("POST", run.url + path, content=content, headers={"content-type": "application/json"}) as r:
                next(r.iter_lines())
    deadline = time.monotonic() + 5
    while batcher.live and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.live == 0  # cancelled within a step or so, not run to max_tokens
    raw = json.dumps({"model": "tiny", "prompt": "To be", "max_tokens": 4000, "temperature": 1.0}).encode()
    with socket.create_connection(("127.0.0.1", run.port), timeout=5) as sock:  # a non-streamed one, dropped
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(raw), raw))
        deadline = time.monotonic() + 5
        while not batcher.live and time.monotonic() < deadline:
            time.sleep(0.01)
        steps = batcher.steps
    deadline = time.monotonic() + 5
    while batcher.live and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.live == 0 and batcher.steps - steps < 100  # of its 4000
    t = time.monotonic()
    client.completions.create(model="tiny", prompt="To be", max_tokens=2, temperature=0)
    assert time.monotonic() - t < 5


def test_a_dead_decode_loop_shows_in_health(tmp_path):
    model, tok = load_model(tiny_model_dir(tmp_path / "m"))
    batcher = ContinuousBatcher(TorchStepModel(model), max_batch=2)
    run = Running(Server(batcher, tok, "m", context_limit=context_limit(model), request_timeout_s=5))
    try:
        with httpx.Client(timeout=10) as c:
            assert c.get(run.url + "/health").status_code == 200

            def boom():
                raise SystemError("injected")

            batcher._step = boom
            batcher._waiting.put(None)  # wake the loop into the failing step
            batcher._thread.join(timeout=5)
            r = c.get(run.url + "/health")
            assert r.status_code == 503 and "injected" in r.json()["error"]["message"]
            r = c.post(run.url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 503 and "error" in r.json()
    finally:
        run.stop()


def test_an_api_key_guards_the_v1_routes_only(tmp_path):
    model, tok = load_model(tiny_model_dir(tmp_path / "m"))
    batcher = ContinuousBatcher(TorchStepModel(model), max_batch=2)
    run = Running(Server(batcher, tok, "m", context_limit=context_limit(model), request_timeout_s=5,
                         max_body_bytes=64 * 1024, api_key="k3y-Secret"))
    try:
        good = openai.OpenAI(base_url=run.url + "/v1", api_key="k3y-Secret", timeout=20, max_retries=0)
        out = good.completions.create(model="m", prompt="To be", max_tokens=4, temperature=0)
        assert out.choices[0].text == greedy(model, tok, "To be", 4)
        assert [m.id for m in good.models.list()] == ["m"]
        for key in ("k3y-secret", "k3y-Secret-", "x"):  # case, a longer one, another
            bad = openai.OpenAI(base_url=run.url + "/v1", api_key=key, timeout=20, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as err:
                bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert err.value.body == {"message": "incorrect API key", "type": "invalid_request_error", "param": None,
                                      "code": "invalid_api_key"}
            with pytest.raises(openai.AuthenticationError):
                bad.responses.create(model="m", input="hi", max_output_tokens=2)
        with httpx.Client(timeout=10) as c:
            for headers in ({}, {"authorization": "Basic k3y-Secret"}, {"authorization": "Bearer"},
                            {"authorization": b"Bearer \xff\xfe"}):
                r = c.get(run.url + "/v1/models/m", headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]["code"] == "invalid_api_key"
            # refused before the body is read: an unauthorized 1 MB body is a 401, not a 413
            r = c.post(run.url + "/v1/completions", content=b"x" * (1 << 20), headers={"authorization": "Bearer no"})
            assert r.status_code == 401
            assert c.get(run.url + "/health").status_code == 200 and c.head(run.url + "/metrics").status_code == 200
            r = c.get(run.url + "/v1/models", headers={"authorization": "bearer  k3y-Secret"})  # any case, spaces
            assert r.status_code == 200
    finally:
        run.stop()


def test_api_key_sources_and_bad_keys():
    from mulfree.commands.serve import ServeConfig, api_key, is_loopback
    from mulfree.errors import ConfigError

    assert api_key(ServeConfig(), {}) is None
    assert api_key(ServeConfig(), {"MULFREE_API_KEY": "abc"}) == "abc"
    assert api_key(ServeConfig(api_key="flag"), {"MULFREE_API_KEY": "env"}) == "flag"
    with pytest.raises(ConfigError, match=r"\$MULFREE_API_KEY must be 1 to 1024 visible ASCII"):
        api_key(ServeConfig(), {"MULFREE_API_KEY": ""})  # set but empty: never silently no key
    for bad in ("a b", "", "é", "x" * 1025, "tab\there"):
        with pytest.raises(ConfigError, match="--api-key must be"):
            ServeConfig(api_key=bad)
    with pytest.raises(ConfigError, match=r"got '\\r' at character 4"):  # a key file written on Windows
        api_key(ServeConfig(), {"MULFREE_API_KEY": "key\r"})
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")


def test_responses_api_equals_chat_and_streams_the_same_text(served):
    from mulfree.infer.protocol import ChatMessage, chat_prompt

    _run, client, model, tok = served
    r = client.responses.create(model="tiny", input="To be", max_output_tokens=6, temperature=0)
    expect = greedy(model, tok, chat_prompt([ChatMessage(role="user", content="To be")]), 6)
    assert r.output_text == expect and r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 6 and r.usage.total_tokens == r.usage.input_tokens + 6 and r.model == "tiny"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "To be"}], max_tokens=6,
                                          temperature=0)
    assert chat.choices[0].message.content == expect  # one prompt, one batcher job: the same text
    events = list(client.responses.create(model="tiny", input="To be", max_output_tokens=6, temperature=0,
                                          stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expect
    assert events[-1].response.output_text == expect and events[-1].response.id == events[0].response.id
    # instructions and earlier turns, as the chat template sees them
    turns = [{"role": "user", "content": "Whether"}, {"role": "assistant", "content": [{"type": "output_text",
                                                                                          "text": "tis"}]},
             {"role": "user", "content": [{"type": "input_text", "text": "nobler"}]}]
    r = client.responses.create(model="tiny", instructions="Speak.", input=turns, max_output_tokens=5, temperature=0)
    msgs = [ChatMessage(role=m, content=c) for m, c in
            [("system", "Speak."), ("user", "Whether"), ("assistant", "tis"), ("user", "nobler")]]
    assert r.output_text == greedy(model, tok, chat_prompt(msgs), 5)


def test_echo_scores_the_prompt_as_lm_eval_reads_it(served):
    """echo + logprobs (what lm-eval's `local-completions` sends to score a context and continuation): the prompt's
    token logprobs equal the model's own, and lm-eval's parser turns them into the loglikelihood its direct
    scorer (`MulfreeLM`) computes."""
    lm_eval_api = pytest.importorskip("lm_eval.models.openai_completions")
    from mulfree.lmeval import MulfreeLM

    _run, client, model, tok = served
    ctx, cont = tok.encode("To be, or not").ids, tok.encode(" to be, that is").ids
    out = client.completions.create(model="tiny", prompt=ctx + cont, max_tokens=1, temperature=0, logprobs=1,
                                    echo=True, seed=1234)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ctx + cont) + 1
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ctx + cont]))[0][0], -1)
    expect = ref[torch.arange(len(ctx + cont) - 1), torch.tensor((ctx + cont)[1:])]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:len(ctx + cont)]), expect, atol=1e-5)
    assert out.choices[0].text.startswith(tok.decode(ctx + cont))
    parsed = lm_eval_api.LocalCompletionsAPI.parse_logprobs(out.model_dump(), ctxlens=[len(ctx)])
    direct = MulfreeLM(model, tok)._score(ctx, cont)
    assert abs(parsed[0][0] - direct[0]) < 1e-4 and parsed[0][1] == direct[1]
    # a text prompt echoes as given; without logprobs, text only; max_tokens 0 scores the prompt alone
    plain = client.completions.create(model="tiny", prompt="To be", max_tokens=3, temperature=0, echo=True)
    assert plain.choices[0].text == "To be" + greedy(model, tok, "To be", 3) and plain.choices[0].logprobs is None
    only = client.completions.create(model="tiny", prompt="To be", max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].text == "To be" and len(only.choices[0].logprobs.token_logprobs) == len(tok.encode("To be").ids)


def test_responses_logprobs_equal_chat_logprobs(served):
    _run, client, _model, _tok = served
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "To be"}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2)
    expect = [e.model_dump() for e in chat.choices[0].logprobs.content]
    r = client.responses.create(model="tiny", input="To be", max_output_tokens=6, temperature=0, top_logprobs=2,
                                include=["message.output_text.logprobs"])
    got = [e.model_dump() for e in r.output[0].content[0].logprobs]
    assert len(got) == 6 and got == expect and all(len(e["top_logprobs"]) == 2 for e in got)
    events = list(client.responses.create(model="tiny", input="To be", max_output_tokens=6, temperature=0,
                                          top_logprobs=2, stream=True))
    streamed = [e.model_dump() for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    assert streamed == expect and [e.model_dump() for e in events[-1].response.output[0].content[0].logprobs] == expect
    plain = client.responses.create(model="tiny", input="To be", max_output_tokens=2, temperature=0)
    assert plain.output[0].content[0].logprobs == []


def test_responses_api_refuses_what_it_cannot_do(served):
    _run, client, _model, _tok = served
    cases = [({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools are not supported"),
             ({"store": True}, "not stored here"), ({"previous_response_id": "resp_1"}, "not stored here"),
             ({"input": []}, "input: List should have at least 1 item"),
             ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
              "input.0.content.0.type"),
             ({"max_output_tokens": 0}, "max_output_tokens"), ({"reasoning": {"effort": "high"}}, "reasoning"),
             ({"text": {"format": {"type": "json_object"}}}, "text.format"), ({"input": 7}, "input: should be"),
             ({"include": ["file_search_call.results"]}, "include ['file_search_call.results'] is not supported"),
             ({"top_logprobs": 21}, "top_logprobs"), ({"truncation": "auto"}, "truncation: auto is not supported")]
    for extra, needle in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(**{"model": "tiny", "input": "x", "max_output_tokens": 2, **extra})
        assert needle in err.value.body["message"], (extra, err.value.body)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="other", input="x")
    assert client.responses.create(model="tiny", input="x", max_output_tokens=2, store=False).output_text is not None


def test_response_objects_and_events_fit_the_official_schema():
    """Every object the endpoint sends, validated strictly by the openai package's own models."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    from mulfree.infer.responses import Reply, ResponsesRequest

    reply = Reply(ResponsesRequest(model="m", input="x", metadata={"k": "v"}), "m")
    lp = [{"token": t, "logprob": -0.5, "bytes": [ord(t)], "top_logprobs": [{"token": t, "logprob": -0.5,
                                                                               "bytes": [ord(t)]}]} for t in "hi"]
    for status in ("completed", "incomplete"):
        done = Response.model_validate(reply.response(status, "hi", (3, 2, 1), lp), strict=True)
        assert done.output_text == "hi" and done.usage.total_tokens == 5 and done.metadata == {"k": "v"}
        assert done.output[0].content[0].logprobs[1].token == "i"
    events = TypeAdapter(list[ResponseStreamEvent]).validate_python(
        reply.opening() + [reply.delta("h"), reply.delta("i")] + reply.closing("hi", "completed", (3, 2, 1)))
    assert events[-1].type == "response.completed" and events[-1].response.status == "completed"


def test_the_sdk_stream_helper_builds_the_final_response_from_our_events():
    """`client.responses.stream(...)`'s accumulator (an SDK internal, so skipped where it moved) takes a completed
    stream's events in order and builds the final response."""
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    from mulfree.infer.responses import Reply, ResponsesRequest

    streaming = pytest.importorskip("openai.lib.streaming.responses._responses")
    reply = Reply(ResponsesRequest(model="m", input="x"), "m")
    events = TypeAdapter(list[ResponseStreamEvent]).validate_python(
        reply.opening() + [reply.delta("h"), reply.delta("i")] + reply.closing("hi", "completed", (3, 2, 0)))
    state = streaming.ResponseStreamState(input_tools=openai.NOT_GIVEN, text_format=openai.NOT_GIVEN)
    for event in events:
        state.handle_event(event)
    assert state._completed_response.output_text == "hi"



def test_log_flags_parse():
    """--log-level and --no-access-log (a busy server's log had a line per request); a bad level is argparse's."""
    from mulfree.cli import build_parser
    from mulfree.commands.flags import from_args
    from mulfree.commands.serve import ServeConfig

    parse = build_parser().parse_args
    cfg = from_args(ServeConfig, parse(["serve", "--model", "m", "--log-level", "warning", "--no-access-log"]))
    assert (cfg.log_level, cfg.access_log) == ("warning", False)
    cfg = from_args(ServeConfig, parse(["serve", "--model", "m"]))
    assert (cfg.log_level, cfg.access_log) == ("info", True)
    with pytest.raises(SystemExit):
        parse(["serve", "--model", "m", "--log-level", "loud"])


def test_token_limit_errors_name_the_field_sent(served):
    _run, client, _model, _tok = served
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="tiny", input="x", max_output_tokens=100_000)
    assert err.value.body["param"] == "max_output_tokens" and "max_output_tokens (100000)" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=100_000)
    assert err.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=100_000)
    assert err.value.body["param"] == "max_tokens"


def test_browser_pages_from_allowed_origins_only(tmp_path):
    """CORS: a preflight and a keyed request from an allowed origin get its Access-Control headers; another origin
    gets none (the browser then refuses the answer); bad origins stop start-up."""
    from mulfree.commands.serve import ServeConfig
    from mulfree.errors import ConfigError

    model, tok = load_model(tiny_model_dir(tmp_path / "m"))
    batcher = ContinuousBatcher(TorchStepModel(model), max_batch=2)
    run = Running(Server(batcher, tok, "m", context_limit=context_limit(model), request_timeout_s=5, api_key="k"),
                  origins=("https://chat.example.com",))
    try:
        with httpx.Client(timeout=10) as c:
            pre = c.options(run.url + "/v1/chat/completions", headers={
                "origin": "https://chat.example.com", "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type"})
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == "https://chat.example.com"
            assert "authorization" in pre.headers["access-control-allow-headers"].lower()
            r = c.post(run.url + "/v1/completions", json={"model": "m", "prompt": "To be", "max_tokens": 2},
                       headers={"origin": "https://chat.example.com", "authorization": "Bearer k"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://chat.example.com"
            other = c.options(run.url + "/v1/chat/completions", headers={
                "origin": "https://evil.example", "access-control-request-method": "POST"})
            assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
            r = c.get(run.url + "/v1/models", headers={"origin": "https://evil.example", "authorization": "Bearer k"})
            assert "access-control-allow-origin" not in r.headers
    finally:
        run.stop()
    for bad in ("https://chat.example.com/", "chat.example.com", "ftp://x", "https://x:0"):
        with pytest.raises(ConfigError, match="is not a web origin"):
            ServeConfig(allowed_origins=(bad,))
    assert ServeConfig(allowed_origins=("*", "http://localhost:3000")).allowed_origins[0] == "*"


def test_served_model_name_flag():
    """--served-model-name: the API's model id, whatever the dir is called; one a client could not send is refused."""
    from mulfree.cli import build_parser
    from mulfree.commands.flags import from_args
    from mulfree.commands.serve import ServeConfig
    from mulfree.errors import ConfigError

    parse = build_parser().parse_args
    cfg = from_args(ServeConfig, parse(["serve", "--model", "runs/mm-packed", "--served-model-name", "mmfree-1.3b"]))
    assert cfg.served_model_name == "mmfree-1.3b"
    assert from_args(ServeConfig, parse(["serve", "--model", "m"])).served_model_name is None
    for bad in ("my model", "", "x" * 257, "modèle"):
        with pytest.raises(ConfigError, match="--served-model-name .* must be 1 to 256 visible ASCII"):
            ServeConfig(served_model_name=bad)
