"""The staged true-sequential walk of Llama blocks (`quant.staged`) against the traced walk it replaces for them
(`CalibrationStream.collect` per stage, forced with `staged.supports` patched off): bit-identical quantized
tensors and stream, for GPTQ and both ShiftAdd modes, asymmetric or not, activations in memory or on disk;
one pass per stream; the traced walk still serves mixed bits and other architectures."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mulfree.quant import blockwise, staged
from mulfree.quant.config import WalkOptions
from mulfree.quant.gptq import GPTQ
from mulfree.quant.shiftadd import ShiftAdd
from mulfree.quant.walker import decoder_blocks, quantize_model

METHODS = {
    "gptq": lambda: GPTQ(3, 16),
    "shiftadd-acc": lambda: ShiftAdd(2, 8, "acc", 2, 2, incoherence="hadamard-io"),
    "shiftadd-lat": lambda: ShiftAdd(3, 16, "lat", 1, 2),
}


FAMILIES = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}


def _llama(layers: int = 2, family: str = "llama"):
    torch.manual_seed(0)
    config = FAMILIES[family](
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _calib() -> torch.Tensor:
    return torch.randint(0, 300, (5, 12), generator=torch.Generator().manual_seed(1))


def _quantized(monkeypatch, traced: bool, method, family: str = "llama", **options) -> dict[str, torch.Tensor]:
    """The tiny model's tensors after the staged walk, or after the traced one (`staged.supports` patched off)."""
    with monkeypatch.context() as m:
        if traced:
            m.setattr(staged, "supports", lambda *a: False)
        model = _llama(family=family)
        quantize_model(model, method, _calib(), WalkOptions(progress=False, batch_size=2, **options))
    return model.state_dict()


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("asymmetric", [True, False])
def test_staged_walk_equals_traced_walk_bit_for_bit(monkeypatch, name, asymmetric):
    fast = _quantized(monkeypatch, False, METHODS[name](), asymmetric=asymmetric)
    slow = _quantized(monkeypatch, True, METHODS[name](), asymmetric=asymmetric)
    assert fast.keys() == slow.keys()
    for key in fast:  # block 1's tensors equal only if the streams entering it were equal too
        assert torch.equal(fast[key], slow[key]), key


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_staged_walk_equals_traced_walk_for_llama_family_blocks(monkeypatch, family):
    model = _llama(family=family)
    block = decoder_blocks(model)[1][0]
    linears = {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert staged.supports(block, linears)
    fast = _quantized(monkeypatch, False, METHODS["shiftadd-acc"](), family=family)
    slow = _quantized(monkeypatch, True, METHODS["shiftadd-acc"](), family=family)
    for key in fast:
        assert torch.equal(fast[key], slow[key]), key


def test_staged_walk_with_tuning_and_spilled_activations_equals_traced(monkeypatch, tmp_path):
    def run(traced: bool, out):
        with monkeypatch.context() as m:
            if traced:
                m.setattr(staged, "supports", lambda *a: False)
            _llama(3).save_pretrained(tmp_path / "src")
            blockwise.quantize_blockwise(tmp_path / "src", out, GPTQ(3, 16), _calib(),
                                         WalkOptions(progress=False, batch_size=2, tune_epochs=1), spill_bytes=0)
        from safetensors.torch import load_file

        return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}

    fast, slow = run(False, tmp_path / "fast"), run(True, tmp_path / "slow")
    assert fast.keys() == slow.keys()
    for key in fast:
        assert torch.equal(fast[key], slow[key]), key


def test_staged_walk_runs_each_stream_once():
    """Per batch the MLP norm runs once in the FP block's single pass and twice on the quantized stream (the
    gate/up statistics, then the MLP product); the traced walk ran it 4 + 3 times."""
    model = _llama()
    block = decoder_blocks(model)[1][0]
    calls = []
    block.post_attention_layernorm.register_forward_hook(lambda *_: calls.append(1))  # the FP copy inherits it
    o_calls = []
    block.self_attn.register_forward_hook(lambda *_: o_calls.append(1))
    quantize_model(model, GPTQ(3, 16), _calib(), WalkOptions(progress=False, batch_size=2, asymmetric=True))
    assert len(calls) == (1 + 2) * 3  # 3 batches of 2, 2, 1 windows
    assert len(o_calls) == 1 * 3  # the FP pass only: the quantized stream's attention stops at o_proj


def test_mixed_bits_and_other_architectures_take_the_traced_walk(monkeypatch):
    used = []
    real = staged.StagedWalk
    monkeypatch.setattr(staged, "StagedWalk", lambda *a: used.append(1) or real(*a))
    quantize_model(_llama(), ShiftAdd(2, 8, "acc", 1, 2, mixed_bits=2.5), _calib(), progress=False)
    torch.manual_seed(0)
    opt = transformers.AutoModelForCausalLM.from_config(transformers.OPTConfig(
        vocab_size=300, hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64)).eval()
    quantize_model(opt, GPTQ(3, 16), _calib(), progress=False)
    quantize_model(_llama(), GPTQ(3, 16), _calib(), progress=False, true_sequential=False)
    assert used == []
    quantize_model(_llama(), GPTQ(3, 16), _calib(), progress=False)
    assert used == [1, 1]
