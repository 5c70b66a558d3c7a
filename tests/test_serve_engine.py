"""`mulfree serve` on the packed engine: greedy output equals `PackedModel.generate` alone and among
concurrent requests; the real CLI process serves, and SIGTERM drains it and exits within a bound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_serve_api import Running, free_port, tiny_model_dir

from mulfree.infer.batching import ContinuousBatcher, PackedStepModel
from mulfree.infer.engine import PackedModel
from mulfree.infer.server import Server

PROMPTS = ["To be, or not", "Whether 'tis", "the question", "nobler in", "suffer", "To", "mind to", "be, or"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("packed") / "tiny")


def test_packed_server_greedy_equals_generate_alone_and_concurrently(model_dir):
    direct = PackedModel.load(model_dir)
    tok = direct.tokenizer
    expected = {p: tok.decode(direct.generate(tok.encode(p).ids, 10)) for p in PROMPTS}
    served = PackedModel.load(model_dir)
    batcher = ContinuousBatcher(PackedStepModel(served), max_batch=8, max_queue=32)
    run = Running(Server(batcher, tok, "tiny", request_timeout_s=20))
    try:
        client = openai.OpenAI(base_url=run.url + "/v1", api_key="x", timeout=20, max_retries=0)
        alone = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0)
        assert alone.choices[0].text == expected[PROMPTS[0]]
        got: dict[str, str] = {}

        def ask(p: str) -> None:
            got[p] = client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert got == expected
        assert batcher.max_live > 1  # they really shared decode steps
    finally:
        run.stop()


def start_cli_server(model_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    """`mulfree serve --model model_dir *flags` in a subprocess on a free port, once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mulfree", "serve", "--model", str(model_dir), "--port",
                             str(port), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=10)
    pytest.fail("the server did not come up")


def test_cli_serves_the_packed_engine_and_sigterm_drains(model_dir):
    template = "{% for m in messages %}<<{{ m.content }}>>{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    config = model_dir / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": template}))
    proc, url = start_cli_server(model_dir, "--shutdown-timeout", "5")
    try:
        with httpx.Client(timeout=20) as c:
            chat = c.post(url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                               "messages": [{"role": "user", "content": "Hi"}]})
            tok = PackedModel.load(model_dir).tokenizer
            assert chat.json()["usage"]["prompt_tokens"] == len(tok.encode("<<Hi>>A:").ids)  # the model's template
            body = {"model": "tiny", "prompt": "To be", "max_tokens": 40, "temperature": 0, "stream": True}
            with c.stream("POST", url + "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                proc.send_signal(signal.SIGTERM)  # mid-stream: the stream is drained, then the process exits
                rest = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert rest[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_requests_past_the_shutdown_deadline_end_with_a_503(model_dir):
    proc, url = start_cli_server(model_dir, "--shutdown-timeout", "1", "--max-tokens-limit", "1000000")
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 1000000, "temperature": 0}  # greedy: no end of text
    plain: dict = {}
    try:
        waiter = threading.Thread(target=lambda: plain.update(r=httpx.post(url + "/v1/completions", json=body,
                                                                           timeout=30)))
        waiter.start()
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                deadline = time.monotonic() + 10
                while c.get(url + "/health").json()["live"] < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)  # both requests decoding
                t = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                rest = [x for x in lines if x.startswith("data: ")]
            waiter.join(30)
        assert 0.9 < time.monotonic() - t < 8, rest[-3:]  # ended at the deadline, not run to max_tokens
        error = json.loads(rest[-2][6:])["error"]
        assert rest[-1] == "data: [DONE]" and "the server is shutting down" in error["message"]
        assert plain["r"].status_code == 503 and "shutting down" in plain["r"].json()["error"]["message"]
        assert proc.wait(timeout=15) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_engine_choice(model_dir, tmp_path):
    from mulfree.commands.serve import ServeConfig, _load
    from mulfree.errors import CheckpointError
    from mulfree.infer.batching import TorchStepModel

    packed_dir = tmp_path / "packed"
    PackedModel.load(model_dir).save(packed_dir)
    for d, engine, kind in [(model_dir, "auto", PackedStepModel), (model_dir, "packed", PackedStepModel),
                            (model_dir, "torch", TorchStepModel), (packed_dir, "auto", PackedStepModel)]:
        step, loaded, _ = _load(str(d), ServeConfig(engine=engine))
        assert isinstance(step, kind) and loaded.tokenizer is not None
    with pytest.raises(CheckpointError, match="packed engine only"):
        _load(str(packed_dir), ServeConfig(engine="torch"))
