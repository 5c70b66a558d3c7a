"""Import of official matmulfreellm (hgrn_bit) checkpoints."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mulfree.cli import main
from mulfree.errors import CheckpointError
from mulfree.models.io import load_model
from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM
from mulfree.models.official import convert_official

OFFICIAL_CONFIG = {
    "model_type": "hgrn_bit", "architectures": ["HGRNBitForCausalLM"], "vocab_size": 101, "hidden_size": 32,
    "num_hidden_layers": 2, "hidden_ratio": 4, "intermediate_size": None, "attn_mode": "fused_recurrent",
    "num_heads": 1, "expand_ratio": 1, "use_short_conv": False, "conv_size": 4, "share_conv_kernel": True,
    "use_lower_bound": True, "hidden_act": "swish", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "initializer_range": 0.02, "fuse_cross_entropy": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.2",
}


def _official_dir(tmp_path):
    src = MMFreeForCausalLM(MMFreeConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2))
    with torch.no_grad():
        src.model.lower_bounds.normal_()
    state = {k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}  # released weights are bf16
    d = tmp_path / "official"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    (d / "tokenizer.model").write_bytes(b"sentencepiece stand-in")
    return d, state


def test_convert_official_keeps_every_weight(tmp_path):
    d, state = _official_dir(tmp_path)
    assert main(["convert-official", "--src", str(d), "--out", str(tmp_path / "ours")]) == 0
    model, _ = load_model(tmp_path / "ours")
    assert model.config.intermediate_size == 256 * 1  # official GLU rule for d=32: int(85.3) -> 256
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k].float()), k
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == b"sentencepiece stand-in"


def test_convert_official_rejects_unsupported_and_foreign_checkpoints(tmp_path):
    d, _ = _official_dir(tmp_path)
    (d / "config.json").write_text(json.dumps({**OFFICIAL_CONFIG, "use_short_conv": True}))
    with pytest.raises(CheckpointError, match="short convolutions"):
        convert_official(d, tmp_path / "x")
    (d / "config.json").write_text(json.dumps({**OFFICIAL_CONFIG, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not 'hgrn_bit'"):
        convert_official(d, tmp_path / "x")
    (d / "config.json").write_text(json.dumps({**OFFICIAL_CONFIG, "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="has shape"):
        convert_official(d, tmp_path / "x")


def test_two_heads_and_eps_map_to_the_official_forward(tmp_path):
    d, _ = _official_dir(tmp_path)
    (d / "config.json").write_text(json.dumps({**OFFICIAL_CONFIG, "num_heads": 2, "rms_norm_eps": 1e-5}))
    model = convert_official(d, tmp_path / "ours")
    assert model.config.rms_norm_eps == 1e-5 and model.config.bitlinear_eps == 1e-6
    assert model.model.norm.eps == model.model.layers[0].attn.g_norm.eps == 1e-5
    assert model.lm_head.norm.eps == model.model.layers[1].mlp.down_proj.norm.eps == 1e-6
    (d / "config.json").write_text(json.dumps({**OFFICIAL_CONFIG, "num_heads": 3}))
    with pytest.raises(CheckpointError, match="not divisible by num_heads 3"):
        convert_official(d, tmp_path / "x")


def test_config_without_bitlinear_eps_keeps_its_old_meaning(tmp_path):
    """Dirs saved before `bitlinear_eps` existed used rms_norm_eps in every BitLinear: they still do, bit for bit;
    new presets state the official 1e-6."""
    from mulfree.models.io import save_model

    model = MMFreeForCausalLM(MMFreeConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, rms_norm_eps=1e-5))
    save_model(model, tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    cfg.pop("bitlinear_eps")
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "old" / "checksums.json").unlink(missing_ok=True)  # old dirs predate checksums too
    old, _ = load_model(tmp_path / "old")
    assert old.lm_head.norm.eps == old.model.layers[0].attn.i_proj.norm.eps == 1e-5
    ids = torch.randint(0, 101, (2, 9))
    assert torch.equal(old(ids)[0], model(ids)[0])
    assert MMFreeConfig.from_preset("tiny").bitlinear_eps == 1e-6
