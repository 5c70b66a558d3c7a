"""Validated schemas of loaded files: field types and ranges, cross-field rules, the memory estimate checked
against available memory before anything is allocated, packed configs, tokenizers, and the GGUF cache keyed
by file contents."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mulfree.errors import CheckpointError, ConfigError, MulfreeError
from mulfree.models import schema
from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM
from mulfree.models.transformer import TransformerConfig, TransformerForCausalLM


@pytest.mark.parametrize("field, value, words", [
    ("num_hidden_layers", 100_000_000, "in 1..4096"),
    ("vocab_size", 1e11, "must be an integer"),
    ("hidden_size", "32", "must be an integer"),
    ("hidden_size", True, "must be an integer"),
    ("rms_norm_eps", math.nan, "finite"),
    ("rms_norm_eps", 0.0, "rms_norm_eps"),
    ("max_position_embeddings", None, "max_position_embeddings"),
    ("use_lower_bound", 1, "true or false"),
    ("output_gate", 3, "string"),
    ("eos_token_id", 500, "outside the vocabulary"),
])
def test_config_fields_are_typed_and_bounded(field, value, words):
    with pytest.raises(ConfigError, match=field) as err:
        MMFreeConfig(**{"vocab_size": 300, field: value})
    assert words in str(err.value)


def test_cross_field_and_json_number_rules():
    with pytest.raises(ConfigError, match="not divisible by num_attention_heads"):
        TransformerConfig(hidden_size=100, num_attention_heads=3)
    assert MMFreeConfig(rms_norm_eps=1).rms_norm_eps == 1  # a JSON integer where a float belongs is fine
    with pytest.raises(ConfigError, match="model_type"):
        MMFreeConfig.from_dict({"model_type": ["mmfree"]})
    with pytest.raises(ConfigError, match="JSON object"):
        MMFreeConfig.from_dict([1, 2])


def test_from_json_names_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model_type": "mmfree", "num_hidden_layers": -1}))
    with pytest.raises(ConfigError, match=r"c\.json: config field 'num_hidden_layers'"):
        MMFreeConfig.from_json(path)
    path.write_text("[" * 100_000)
    with pytest.raises(ConfigError, match="not valid JSON"):
        MMFreeConfig.from_json(path)


@pytest.mark.parametrize("cls, model_cls", [(MMFreeConfig, MMFreeForCausalLM),
                                            (TransformerConfig, TransformerForCausalLM)])
def test_parameter_estimate_matches_the_models(cls, model_cls):
    for preset in ("tiny", "370m"):
        cfg = cls.from_preset(preset)
        with torch.device("meta"):
            n = sum(p.numel() for p in model_cls(cfg).parameters())
        assert abs(schema.parameter_count(cfg) / n - 1) < 0.01
        assert schema.estimate_model_bytes(cfg) == 4 * schema.parameter_count(cfg)


def test_memory_check_uses_available_memory(monkeypatch):
    assert schema.available_memory() > 0
    monkeypatch.setattr(schema, "available_memory", lambda: 1 << 30)
    schema.check_memory(1 << 29, "x", "the model")
    with pytest.raises(ConfigError, match=r"x: the model needs about 2\.0 GiB of memory, more than the 1\.0 GiB"):
        schema.check_memory(1 << 31, "x", "the model")
    monkeypatch.setattr(schema, "available_memory", lambda: None)  # platform says nothing: no check
    schema.check_memory(1 << 60, "x")


def test_build_model_refuses_a_config_beyond_memory_before_allocating(monkeypatch):
    from mulfree.models.io import build_model

    monkeypatch.setattr(schema, "available_memory", lambda: 1 << 20)
    cfg = MMFreeConfig.from_preset("370m").to_dict()
    with pytest.raises(ConfigError, match="m/config.json: the model needs about 1.4 GiB of memory"):
        build_model(cfg, "m/config.json")


def test_packed_config_validation(tmp_path):
    cfg = {**MMFreeConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1).to_dict(),
           "format": "mulfree-t2", "format_version": 1, "crc32": 123}
    schema.validate_packed_config(cfg, "p/config.json")
    schema.validate_packed_config({**cfg, "engine_extra": [1]}, "p/config.json")  # fields of the loader pass
    for change, words in [({"num_hidden_layers": 100_000_000}, "num_hidden_layers"), ({"crc32": -1}, "crc32"),
                          ({"format": 2}, "format"), ({"format_version": "1"}, "format_version"),
                          ({"vocab_size": 1e11}, "vocab_size"), ({"model_type": "transformerpp"}, "model_type"),
                          ({"hidden_size": 131072, "num_hidden_layers": 4096}, "memory")]:
        with pytest.raises(MulfreeError, match=words):
            schema.validate_packed_config({**cfg, **change}, "p/config.json")
    bad = dict(cfg)
    del bad["vocab_size"]
    with pytest.raises(CheckpointError, match="'vocab_size' is missing"):
        schema.validate_packed_config(bad, "p/config.json")
    with pytest.raises(CheckpointError, match="JSON object"):
        schema.validate_packed_config([cfg], "p/config.json")


def test_hf_config_rules_read_aliases():
    transformers = pytest.importorskip("transformers")
    schema.check_hf_config(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4), "gpt2")
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        schema.check_hf_config(transformers.GPT2Config(n_layer=100_000_000), "gpt2")
    with pytest.raises(CheckpointError, match="vocab_size"):
        schema.check_hf_config({"vocab_size": 1e11}, "raw")


def test_tokenizer_ids_must_fit_the_vocabulary():
    from mulfree.data.text import train_tokenizer

    tok = train_tokenizer("to be or not to be " * 50, 280)
    size = schema.tokenizer_size(tok)
    schema.check_tokenizer(tok, size, "t")
    with pytest.raises(CheckpointError, match=f"ids up to {size - 1}, beyond the model's vocab_size {size - 1}"):
        schema.check_tokenizer(tok, size - 1, "t")


def test_gguf_cache_is_keyed_by_contents(tmp_path, monkeypatch):
    from mulfree.models import pretrained

    monkeypatch.setenv("MULFREE_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path, fill in ((a, 1), (b, 2)):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + bytes(16) + bytes([fill]) * 100)
    assert pretrained.gguf_cache_dir(a) != pretrained.gguf_cache_dir(b)
    assert pretrained.gguf_cache_dir(a) == pretrained.gguf_cache_dir(tmp_path / "a" / ".." / "a" / "m.gguf")
    converted = []
    monkeypatch.setattr(pretrained, "_convert_gguf",
                        lambda gguf, out: converted.append((gguf, out)) or out.mkdir(parents=True, exist_ok=True))
    for path in (a, b, a):
        with pytest.raises(CheckpointError, match="not a Hugging Face model dir"):  # the stub writes no config.json
            pretrained.load_hf_causal_lm(path)
    assert [g for g, _ in converted] == [a, b, a] and converted[0][1] != converted[1][1]
    from mulfree.integrity import write_manifest

    entry = pretrained.gguf_cache_dir(a)  # a complete entry is reused; a damaged one is converted again
    (entry / "config.json").write_text("{}")
    write_manifest(entry, ["config.json"])
    assert pretrained._cache_intact(entry)
    (entry / "config.json").write_text('{"edited": 1}')
    assert not pretrained._cache_intact(entry)


@pytest.mark.parametrize("head, words", [(b"GGUX" + bytes(20), "not a GGUF file"), (b"GGUF", "not a GGUF file"),
                                         (b"GGUF" + bytes([9, 0, 0, 0]) + bytes(16), "invalid GGUF header")])
def test_gguf_header_is_checked_before_any_parser(tmp_path, head, words):
    from mulfree.models.pretrained import check_gguf_header

    (tmp_path / "m.gguf").write_bytes(head)
    with pytest.raises(CheckpointError, match=words):
        check_gguf_header(tmp_path / "m.gguf")


def test_pickle_weights_are_never_loaded(tmp_path):
    import pickle

    from mulfree.models.pretrained import load_hf_causal_lm

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="never loads pickles"):
        load_hf_causal_lm(tmp_path)
