"""Whole-model properties of MMfree and Transformer++: step vs parallel, causality, configs, save/load."""

import json

import pytest
import torch

from mulfree.errors import CheckpointError, ConfigError
from mulfree.models.io import load_model, save_model
from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM
from mulfree.models.transformer import TransformerConfig, TransformerForCausalLM

TINY = dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, intermediate_size=80)


def _mmfree(large_init: bool = True, **kw) -> MMFreeForCausalLM:
    model = MMFreeForCausalLM(MMFreeConfig(**{**TINY, **kw}))
    if large_init:  # small-init models hide state bugs (tiny logit differences)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(std=0.5)
            model.model.lower_bounds.normal_(std=1.0)
    return model.eval()


def _transformer() -> TransformerForCausalLM:
    return TransformerForCausalLM(TransformerConfig(**TINY, num_attention_heads=4)).eval()


def _stepwise(model, ids, chunks):
    state, outs, pos = None, [], 0
    for n in chunks:
        logits, state = model(ids[:, pos : pos + n], state)
        outs.append(logits)
        pos += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("output_gate", ["official", "paper"])
def test_mmfree_step_form_equals_parallel_form(output_gate):
    model = _mmfree(output_gate=output_gate)
    ids = torch.randint(0, 97, (2, 29))
    with torch.no_grad():
        full, _ = model(ids)
        one_by_one = _stepwise(model, ids, [1] * 29)
        prefill_then_step = _stepwise(model, ids, [13, 1, 1, 14])
    assert (one_by_one - full).abs().max() < 1e-4
    assert (prefill_then_step - full).abs().max() < 1e-4


def test_transformer_kv_cache_equals_full_forward():
    model = _transformer()
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        full, _ = model(ids)
        assert (_stepwise(model, ids, [1] * 21) - full).abs().max() < 1e-4
        assert (_stepwise(model, ids, [8, 5, 1, 7]) - full).abs().max() < 1e-4


@pytest.mark.parametrize("make", [_mmfree, _transformer], ids=["mmfree", "transformer"])
def test_causality(make):
    model = make()
    ids = torch.randint(0, 97, (1, 24))
    t = 15
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % 97
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.equal(a[:, t:], b[:, t:])


def test_lower_bounds_start_at_zero_and_grow_with_depth():
    model = MMFreeForCausalLM(MMFreeConfig(**{**TINY, "num_hidden_layers": 4}))
    lb = model.model.layer_lower_bounds()
    torch.testing.assert_close(lb[:, 0], torch.tensor([0.0, 0.25, 0.5, 0.75]))


def test_official_parameter_names_and_paper_sizes():
    keys = set(MMFreeForCausalLM(MMFreeConfig(**TINY)).state_dict())
    for k in ["model.embeddings.weight", "model.lower_bounds", "model.norm.weight", "lm_head.weight",
              "lm_head.norm.weight", "model.layers.2.attn.g_norm.weight", "model.layers.0.attn.f_proj.norm.weight",
              "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.norm.weight"]:
        assert k in keys
    with torch.device("meta"):
        n370 = sum(p.numel() for p in MMFreeForCausalLM(MMFreeConfig.from_preset("370m")).parameters())
        t370 = sum(p.numel() for p in TransformerForCausalLM(TransformerConfig.from_preset("370m")).parameters())
    assert abs(n370 - 374.1e6) < 0.1e6  # reference: 374.1M for the released 370M shape
    assert abs(n370 - t370) / n370 < 0.001  # equal-size baseline


def test_config_round_trip_and_errors(tmp_path):
    cfg = MMFreeConfig.from_preset("tiny", vocab_size=123)
    assert MMFreeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.intermediate_size == 768
    with pytest.raises(ConfigError, match="unknown preset"):
        MMFreeConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="model_type"):
        MMFreeConfig.from_dict(TransformerConfig().to_dict())
    with pytest.raises(ConfigError, match="hidden_size"):
        MMFreeConfig(hidden_size=0)


@pytest.mark.parametrize("make", [_mmfree, _transformer], ids=["mmfree", "transformer"])
def test_save_load_gives_identical_logits(tmp_path, make):
    model = make()
    save_model(model, tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m")
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert tok is None
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]  # no temp files left


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    save_model(_mmfree(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "m")
    # A transformer config next to MMfree weights: wrong model.
    save_model(_mmfree(), tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text(json.dumps(_transformer().config.to_dict()))
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path / "w")


def test_saved_dirs_carry_checksums_that_catch_damage(tmp_path):
    from mulfree.data.text import train_tokenizer
    from mulfree.integrity import MANIFEST, read_manifest

    save_model(_mmfree(vocab_size=300), tmp_path / "m", train_tokenizer("to be or not to be " * 50, 280))
    assert sorted(read_manifest(tmp_path / "m")) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    load_model(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1  # one payload bit: a valid file that only the checksum can tell apart
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / MANIFEST).unlink()  # a dir written before checksums still loads
    load_model(tmp_path / "m")


def test_load_checks_tokenizer_dtypes_and_values(tmp_path):
    from safetensors.torch import load_file, save_file

    from mulfree.data.text import train_tokenizer

    save_model(_mmfree(), tmp_path / "m", train_tokenizer("to be or not to be " * 50, 280))
    (tmp_path / "m" / "checksums.json").unlink()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**8}))
    with pytest.raises(CheckpointError, match="config.json: config field 'num_hidden_layers'"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="beyond the model's vocab_size 97"):  # a 280-token tokenizer
        load_model(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state["model.norm.weight"][0] = float("inf")
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="model.norm.weight holds NaN or infinite"):
        load_model(tmp_path / "m")
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="model.norm.weight has dtype torch.int32"):
        load_model(tmp_path / "m")
