"""convert-official: missing, partial, mis-shaped and lying official checkpoints, and --out over a model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from hostile import Case

CONFIG = {"model_type": "hgrn_bit", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
          "intermediate_size": 32, "num_heads": 1, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2}
CONVERT = ("convert-official", "--src", "{tmp}/official", "--out", "{tmp}/out")


def _official(tmp: Path, config: dict | None = None, edit: Callable[[dict], None] | None = None) -> Path:
    """Write a tiny official-format checkpoint (bf16 safetensors, official key names) into tmp/official."""
    import torch
    from safetensors.torch import save_file

    from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM

    sizes = {k: CONFIG[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")}
    state = {k: v.to(torch.bfloat16) for k, v in MMFreeForCausalLM(MMFreeConfig(**sizes)).state_dict().items()}
    if edit is not None:
        edit(state)
    src = tmp / "official"
    src.mkdir(exist_ok=True)
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({**CONFIG, **(config or {})}))
    return src


def _with(config: dict | None = None, edit: Callable[[dict], None] | None = None) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        _official(tmp, config, edit)

    return setup


def _drop(state: dict) -> None:
    del state["model.layers.1.attn.f_proj.weight"]


def _reshape(state: dict) -> None:
    state["model.layers.0.attn.o_proj.weight"] = state["model.layers.0.attn.o_proj.weight"][:, :8].contiguous()


def _no_weights(tmp: Path) -> None:
    (_official(tmp) / "model.safetensors").unlink()


def _no_config(tmp: Path) -> None:
    (_official(tmp) / "config.json").unlink()


def _config_text(text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (_official(tmp) / "config.json").write_text(text)

    return setup


def _truncated(tmp: Path) -> None:
    path = _official(tmp) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200])


def _missing_shard(tmp: Path) -> None:
    src = _official(tmp)
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.embeddings.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def _pickle_bin(tmp: Path) -> None:
    import pickle

    src = _official(tmp)
    (src / "model.safetensors").unlink()

    class Boom:
        def __reduce__(self):
            return (print, ("code ran",))

    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))


def _out_is_model(tmp: Path) -> None:
    import shutil

    _official(tmp)
    shutil.copytree(tmp / "model", tmp / "out")


CASES = [
    Case("fid-no-config", "official dir without config.json", CONVERT, "config.json is missing", setup=_no_config),
    Case("fid-config-not-json", "official config.json that is not JSON", CONVERT, "not valid JSON",
         setup=_config_text("{model_type: hgrn_bit")),
    Case("fid-config-list", "official config.json holding a JSON list", CONVERT, "not 'hgrn_bit'",
         setup=_config_text("[1, 2]")),
    Case("fid-no-weights", "official dir with a config but no weight files", CONVERT, "no weights", setup=_no_weights),
    Case("fid-missing-shard", "a shard named by model.safetensors.index.json is missing", CONVERT, "shard",
         setup=_missing_shard),
    Case("fid-truncated", "truncated official model.safetensors", CONVERT, "cannot read", setup=_truncated),
    Case("fid-pickle", "a malicious pytorch_model.bin (no code may run)", CONVERT, "cannot read", setup=_pickle_bin),
    Case("fid-partial", "official weights with one projection missing", CONVERT, "missing", setup=_with(edit=_drop)),
    Case("fid-wrong-shape", "an official projection of the wrong shape", CONVERT, "has shape",
         setup=_with(edit=_reshape)),
    Case("fid-two-heads", "num_heads 2 with eps 1e-5 (converted: heads only reshape the recurrence)", CONVERT, None,
         setup=_with({"num_heads": 2, "rms_norm_eps": 1e-5})),
    Case("fid-out-model", "--out over an existing model (without --overwrite)", CONVERT, "already holds a model",
         copy=("model",), setup=_out_is_model),
    Case("fid-out-overwrite", "--out over an existing model with --overwrite", CONVERT + ("--overwrite",), None,
         copy=("model",), setup=_out_is_model),
]

# Config fields that disagree with the weights or with the official code: (id, what, change, expected text).
_CONFIG_LIES = [
    ("fid-model-type", "unknown model_type (llama)", {"model_type": "llama"}, "not 'hgrn_bit'"),
    ("fid-lying-layers", "config says 100000000 layers (nothing may be allocated)", {"num_hidden_layers": 10**8},
     "num_hidden_layers"),
    ("fid-lying-depth", "config says 3 layers for a 2-layer checkpoint", {"num_hidden_layers": 3}, "holds 2 layers"),
    ("fid-lying-vocab", "config says vocab_size 1e11 (a float)", {"vocab_size": 1e11}, "vocab_size"),
    ("fid-lying-width", "config says hidden_size 4096 for 16-wide weights", {"hidden_size": 4096}, "hidden_size"),
    ("fid-lying-inter", "config says intermediate_size 100000 for 32-wide GLU weights", {"intermediate_size": 10**5},
     "gate_proj"),
    ("fid-heads-indivisible", "num_heads that does not divide hidden_size", {"num_heads": 3}, "divisible"),
    ("fid-short-conv", "a short-convolution variant the released models never used", {"use_short_conv": True},
     "short convolutions"),
    ("fid-eps-negative", "rms_norm_eps -1", {"rms_norm_eps": -1}, "rms_norm_eps"),
]
CASES += [Case(id_, what, CONVERT, expect, setup=_with(change)) for id_, what, change, expect in _CONFIG_LIES]
