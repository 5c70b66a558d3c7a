"""The staged true-sequential walk (`quant.staged`) against the traced walk it replaces for the blocks it knows
(`CalibrationStream.collect` per stage, forced with `staged.layout_of` patched off): bit-identical quantized
tensors and stream, for GPTQ and both ShiftAdd modes, asymmetric or not, activations in memory or on disk, on
Llama, Mistral, Qwen2, OPT (pre- and post-norm) and GPT-2; one pass per stream; the traced walk still serves
mixed bits and blocks it does not know."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mulfree.quant import blockwise, staged
from mulfree.quant.base import is_linear
from mulfree.quant.config import WalkOptions
from mulfree.quant.gptq import GPTQ
from mulfree.quant.shiftadd import ShiftAdd
from mulfree.quant.walker import decoder_blocks, quantize_model

METHODS = {
    "gptq": lambda: GPTQ(3, 16),
    "shiftadd-acc": lambda: ShiftAdd(2, 8, "acc", 2, 2, incoherence="hadamard-io"),
    "shiftadd-lat": lambda: ShiftAdd(3, 16, "lat", 1, 2),
}


def _llama_like(cls):
    return lambda layers: cls(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64)


def _opt(pre_norm: bool):
    return lambda layers: transformers.OPTConfig(
        vocab_size=300, hidden_size=32, ffn_dim=48, num_hidden_layers=layers, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64, do_layer_norm_before=pre_norm)


FAMILIES = {
    "llama": _llama_like(transformers.LlamaConfig),
    "mistral": _llama_like(transformers.MistralConfig),
    "qwen2": _llama_like(transformers.Qwen2Config),
    "opt": _opt(True),
    "opt-post-norm": _opt(False),  # OPT-350m's layout
    "gpt2": lambda layers: transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=layers, n_head=4,
                                                   n_positions=64, bos_token_id=0, eos_token_id=0),
}


def _model(layers: int = 2, family: str = "llama"):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(FAMILIES[family](layers)).eval()


def _calib() -> torch.Tensor:
    return torch.randint(0, 300, (5, 12), generator=torch.Generator().manual_seed(1))


def _quantized(monkeypatch, traced: bool, method, family: str = "llama", **options) -> dict[str, torch.Tensor]:
    """The tiny model's tensors after the staged walk, or after the traced one (`staged.layout_of` patched off)."""
    with monkeypatch.context() as m:
        if traced:
            m.setattr(staged, "layout_of", lambda *a: None)
        model = _model(family=family)
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


def _linears(block: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in block.named_modules() if name and is_linear(m)}


@pytest.mark.parametrize("name", ["gptq", "shiftadd-acc"])
@pytest.mark.parametrize("family", ["mistral", "qwen2", "opt", "opt-post-norm", "gpt2"])
def test_staged_walk_equals_traced_walk_for_other_known_blocks(monkeypatch, family, name):
    model = _model(family=family)
    block = decoder_blocks(model)[1][0]
    assert staged.layout_of(block, _linears(block)) is not None
    fast = _quantized(monkeypatch, False, METHODS[name](), family=family)
    slow = _quantized(monkeypatch, True, METHODS[name](), family=family)
    assert fast.keys() == slow.keys()
    for key in fast:
        assert torch.equal(fast[key], slow[key]), key


def test_staged_walk_with_tuning_and_spilled_activations_equals_traced(monkeypatch, tmp_path):
    def run(traced: bool, out):
        with monkeypatch.context() as m:
            if traced:
                m.setattr(staged, "layout_of", lambda *a: None)
            _model(3).save_pretrained(tmp_path / "src")
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
    model = _model()
    block = decoder_blocks(model)[1][0]
    calls = []
    block.post_attention_layernorm.register_forward_hook(lambda *_: calls.append(1))  # the FP copy inherits it
    o_calls = []
    block.self_attn.register_forward_hook(lambda *_: o_calls.append(1))
    quantize_model(model, GPTQ(3, 16), _calib(), WalkOptions(progress=False, batch_size=2, asymmetric=True))
    assert len(calls) == (1 + 2) * 3  # 3 batches of 2, 2, 1 windows
    assert len(o_calls) == 1 * 3  # the FP pass only: the quantized stream's attention stops at o_proj


def test_mixed_bits_sequential_off_and_unknown_blocks_take_the_traced_walk(monkeypatch):
    used = []
    real = staged.StagedWalk
    monkeypatch.setattr(staged, "StagedWalk", lambda *a: used.append(1) or real(*a))
    quantize_model(_model(), ShiftAdd(2, 8, "acc", 1, 2, mixed_bits=2.5), _calib(), progress=False)
    quantize_model(_model(), GPTQ(3, 16), _calib(), progress=False, true_sequential=False)
    assert used == []
    quantize_model(_model(family="gpt2"), GPTQ(3, 16), _calib(), progress=False)
    assert used == [1, 1]

    block = decoder_blocks(_model())[1][0]
    assert staged.layout_of(block, _linears(block)) is staged.LLAMA
    block.mlp = torch.nn.Sequential(*block.mlp.children())  # an MLP whose forward the layout cannot assume
    assert staged.layout_of(block, _linears(block)) is None
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, n_embd=32, n_layer=1, n_head=4, n_positions=64, add_cross_attention=True))
    block = decoder_blocks(gpt2)[1][0]  # cross-attention linears: not the staged four
    assert staged.layout_of(block, _linears(block)) is None


@pytest.mark.parametrize("staged_walk", [True, False])
def test_bf16_calibration_covers_the_sums_not_the_solves(monkeypatch, staged_walk):
    # WalkOptions(calib_precision="bf16"): every Hessian sum runs under oneDNN's bf16 fp32-matmul mode, every
    # solve (the asymmetric target) in the caller's mode, which is back afterwards
    from mulfree.quant import base, walker

    seen = {"sums": set(), "solves": set()}
    add_batch, solve = base.HessianStats.add_batch, walker.asymmetric_solve

    def mode() -> str:
        return torch.backends.mkldnn.matmul.fp32_precision

    def spy_add(self, *a, **k):
        seen["sums"].add(mode())
        return add_batch(self, *a, **k)

    def spy_solve(*a, **k):
        seen["solves"].add(mode())
        return solve(*a, **k)

    monkeypatch.setattr(base.HessianStats, "add_batch", spy_add)
    monkeypatch.setattr(walker, "asymmetric_solve", spy_solve)
    if not staged_walk:
        monkeypatch.setattr(staged, "layout_of", lambda *a: None)
    model = _model()
    before = mode()
    assert before != "bf16"
    quantize_model(model, METHODS["gptq"](), _calib(), WalkOptions(progress=False, calib_precision="bf16"))
    assert seen == {"sums": {"bf16"}, "solves": {before}}
    assert mode() == before
