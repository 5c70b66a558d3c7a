"""ShiftAddLLM PTQ: APoT scales, exact BCQ representation of every stored weight, ALS lowers the
error, quantize -> save -> reload on tiny random Llama / OPT / GPT-2, and one-line CLI errors."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mulfree.cli import main as cli_main  # noqa: E402
from mulfree.errors import ConfigError, DataError  # noqa: E402
from mulfree.ops.bcq import bcq_fit, pack_planes, unpack_planes  # noqa: E402
from mulfree.ops.powers import apot_round, apot_value, shift_scale  # noqa: E402
from mulfree.quant.config import WalkOptions  # noqa: E402
from mulfree.quant.rtn import RTN  # noqa: E402
from mulfree.quant.shiftadd import ShiftAdd, allocate_bits  # noqa: E402
from mulfree.quant.stream import CalibrationStream, capture_inputs, run_block  # noqa: E402
from mulfree.quant.walker import (  # noqa: E402
    calibration_ids,
    decoder_blocks,
    load_quantized,
    quantize_model,
    save_quantized,
)

QUIET = WalkOptions(progress=False)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=300, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=0),
}


def _tiny(arch: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def test_apot_round_is_exact_sum_of_signed_powers():
    a = torch.rand(1000) * 0.05 + 1e-4
    v, e, s = apot_round(a, 3)
    torch.testing.assert_close(apot_value(e, s), v, rtol=0, atol=0)
    assert ((v - a).abs() / a).mean() < 0.01
    v1, e1, s1 = apot_round(a, 1)
    assert torch.equal(v1, torch.ldexp(torch.ones(1000), e1[:, 0].float()))
    x = torch.randn(1000)
    torch.testing.assert_close(shift_scale(x, e, s), x * v, rtol=1e-6, atol=0)


def test_pack_planes_roundtrip_and_layout():
    bits = torch.rand(3, 5, 19) > 0.5
    assert torch.equal(unpack_planes(pack_planes(bits), 19), bits)
    one = torch.tensor([[[True, False, False, False, False, False, False, True]]])
    assert pack_planes(one).item() == 129


def test_als_rounds_lower_bcq_error():
    w = torch.randn(16, 128)
    errs = []
    for rounds in (0, 1, 3, 10):
        b, alpha, _, _ = bcq_fit(w, 3, rounds)
        wq = ((b.float() * 2 - 1) * alpha.unsqueeze(1)).sum(-1)
        errs.append(((w - wq) ** 2).mean().item())
    assert all(b <= a * 1.001 for a, b in zip(errs, errs[1:])) and errs[-1] < 0.8 * errs[0]


@pytest.mark.parametrize("mode", ["acc", "lat"])
def test_every_stored_weight_is_bcq_with_apot_scales(mode):
    torch.manual_seed(0)
    x = torch.randn(256, 40)
    w = torch.randn(20, 40)
    layer = ShiftAdd(2, 8, mode, rounds=2).quantize(w, x.T @ x / 256, None)
    n, k, g, cg = 20, 40, layer.group, layer.col_group
    alpha = apot_value(layer.exps, layer.signs)  # [K/cg, N/g, q], exact sums of signed powers of two
    assert layer.exps.dtype == torch.int8 and layer.signs.abs().max() <= 1
    wq = layer.dequantize()
    combos = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=2)))
    for row, col in itertools.product(range(n), range(k)):
        levels = combos @ alpha[col // cg, row // g]
        assert (levels == wq[row, col]).any()
    b = unpack_planes(layer.planes, k).float() * 2 - 1
    recon = sum(alpha[:, :, i].repeat_interleave(cg, 0)[:k].repeat_interleave(g, 1)[:, :n].T * b[i] for i in range(2))
    assert torch.equal(recon, wq)


def test_layer_error_falls_with_als_rounds():
    model = _tiny("llama")
    calib = torch.randint(0, 300, (4, 32))
    captured = {}
    mlp = model.model.layers[0].mlp.down_proj
    handle = mlp.register_forward_pre_hook(lambda m, a: captured.update(x=a[0].reshape(-1, a[0].shape[-1])))
    model(calib)
    handle.remove()
    x = captured["x"]
    h = x.T @ x / x.shape[0]
    w = mlp.weight.detach()
    errs = [((x @ (w - ShiftAdd(2, 16, "acc", r).quantize(w, h, None).dequantize()).T) ** 2).mean().item()
            for r in (0, 2, 8)]
    assert errs[2] <= errs[1] * 1.02 and errs[1] < errs[0]


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("mode", ["acc", "lat"])
def test_quantize_save_reload(arch, mode, tmp_path):
    model = _tiny(arch)
    calib = torch.randint(0, 300, (4, 16))
    x = torch.randint(0, 300, (1, 12))
    ref = model(x).logits
    method = ShiftAdd(3, 16, mode, rounds=2)
    metas = quantize_model(model, method, calib, QUIET)
    assert len(metas) == sum(1 for n, m in decoder_blocks(model)[1].named_modules() if type(m).__name__ == "ShiftAddLinear")
    y = model(x).logits
    assert (y - ref).abs().max() < 0.5 * ref.abs().max()
    save_quantized(model, None, tmp_path / "q", method, metas, {})
    reloaded, tok = load_quantized(tmp_path / "q")
    assert tok is None
    torch.testing.assert_close(reloaded(x).logits, y)
    one = torch.randn(1, 1, 32)
    layer = reloaded.get_submodule(next(iter(metas)))
    with torch.no_grad():  # single token: lat mode runs the LUT kernel
        torch.testing.assert_close(layer(one), one @ layer.dequantize().T, rtol=1e-5, atol=1e-5)


class _RecordingRTN(RTN):
    """RTN fed calibration statistics, keeping the weight and Hessian the walker handed it for each layer (in call order)."""

    needs_stats = True

    def __init__(self):
        super().__init__(4, 16)
        self.hessians, self.weights = [], []

    def quantize(self, w, h, bias, bits=None):
        self.hessians.append(h)
        self.weights.append(w)
        return super().quantize(w, h, bias, bits)


def _o_proj_input_hessian(block, records):
    """E[x xᵀ] of o_proj's input when `block` runs on the recorded block inputs (independent of the walker)."""
    xs = []
    handle = block.self_attn.o_proj.register_forward_hook(lambda _m, args, _o: xs.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        for hid, args, kw in records:
            run_block(block, hid, args, kw)
    handle.remove()
    x = torch.cat(xs)
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_takes_hessians_through_quantized_stages(true_sequential):
    model, calib = _tiny("llama"), torch.randint(0, 300, (4, 16))
    block = decoder_blocks(model)[1][0]
    records = capture_inputs(model, block, calib, 4)
    h_fp = _o_proj_input_hessian(block, records)
    method = _RecordingRTN()
    quantize_model(model, method, calib, WalkOptions(progress=False, true_sequential=true_sequential))
    h_o = method.hessians[3]  # q, k, v, then o_proj
    h_quant = _o_proj_input_hessian(block, records)  # q/k/v quantized now (o_proj does not feed itself)
    torch.testing.assert_close(h_o, h_quant if true_sequential else h_fp, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(h_fp, h_quant, rtol=1e-3, atol=1e-6)


def test_asymmetric_target_is_the_least_squares_fit_to_the_fp_output():
    from mulfree.quant.walker import asymmetric_target

    g = torch.Generator().manual_seed(0)
    xq = torch.randn(400, 24, generator=g, dtype=torch.float64)
    xf = xq + 0.1 * torch.randn(400, 24, generator=g, dtype=torch.float64)
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    target = asymmetric_target(w, xq.T @ xq / 400, xq.T @ xf / 400, percdamp=0.0)
    best = torch.linalg.lstsq(xq, xf @ w.T).solution.T  # argmin ||X_fp Wᵀ − X_q W'ᵀ||
    torch.testing.assert_close(target.double(), best, rtol=1e-4, atol=1e-5)
    h = xq.T @ xq / 400  # identical streams: the target is W itself, whatever the dampening
    assert torch.equal(asymmetric_target(w.float(), h, h, percdamp=0.01), w.float())


def _linear_input(model, module, calib):
    """Rows of `module`'s input when `model` runs on `calib` (independent of the walker)."""
    xs = []
    handle = module.register_forward_hook(lambda _m, args, _o: xs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(calib, use_cache=False)
    handle.remove()
    return torch.cat(xs).double()


def test_asymmetric_walker_fits_each_layer_to_the_fp_stream():
    from mulfree.quant.walker import asymmetric_target

    model, calib = _tiny("llama"), torch.randint(0, 300, (4, 16))
    fp_model = _tiny("llama")
    method = _RecordingRTN()
    quantize_model(model, method, calib, WalkOptions(progress=False, asymmetric=True))
    assert torch.equal(method.weights[0], decoder_blocks(fp_model)[1][0].self_attn.q_proj.weight)  # streams agree
    q_fp = decoder_blocks(fp_model)[1][1].self_attn.q_proj  # block 1: its input saw the quantized block 0
    xf = _linear_input(fp_model, q_fp, calib)
    xq = _linear_input(model, decoder_blocks(model)[1][1].self_attn.q_proj, calib)
    n = xq.shape[0]
    expected = asymmetric_target(q_fp.weight.detach(), xq.T @ xq / n, xq.T @ xf / n, percdamp=0.01)
    torch.testing.assert_close(method.weights[7], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(method.weights[7], q_fp.weight, rtol=1e-3, atol=1e-4)


def test_block_tuning_lowers_block_error_and_keeps_codes():
    calib = torch.randint(0, 300, (4, 16))
    fp_block = decoder_blocks(_tiny("llama"))[1][0]
    errors, planes = [], []
    for epochs in (0, 20):
        model = _tiny("llama")
        records = capture_inputs(model, decoder_blocks(model)[1][0], calib, 4)
        options = WalkOptions(progress=False, tune_epochs=epochs, tune_lr=1e-2, asymmetric=False)
        quantize_model(model, ShiftAdd(2, 16, "acc", 2), calib, options)  # tuned to the FP block on the same inputs
        block = decoder_blocks(model)[1][0]
        with torch.no_grad():
            errors.append(sum(((run_block(block, *r) - run_block(fp_block, *r)) ** 2).mean() for r in records))
        planes.append(block.self_attn.q_proj.planes.clone())
        assert block.input_layernorm.weight.requires_grad and not block.self_attn.q_proj.planes.requires_grad
    assert torch.equal(planes[0], planes[1])
    assert errors[1] < 0.9 * errors[0]


def _kl_to(teacher: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        lt, lq = (torch.log_softmax(m(ids).logits, -1) for m in (teacher, model))
    return (lt.exp() * (lt - lq)).sum(-1).mean().item()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_distillation_lowers_kl_and_trains_only_float_parameters(arch):
    from mulfree.quant.distill import head_inputs

    def peaked():  # larger weights than the default init: a sharper next-token distribution, larger 2-bit errors
        torch.manual_seed(0)
        config = CONFIGS[arch]()
        config.initializer_range = 0.3
        return transformers.AutoModelForCausalLM.from_config(config).eval()

    calib = torch.randint(0, 300, (4, 16))
    fp = peaked()
    assert torch.allclose(fp.get_output_embeddings()(head_inputs(fp, calib[:1])[0]), fp(calib[:1]).logits, atol=1e-5)
    kls, planes, flags = [], [], []
    for epochs in (0, 10):
        model = peaked()
        quantize_model(model, ShiftAdd(2, 16, "acc", 2), calib, WalkOptions(progress=False, distill_epochs=epochs,
                                                                             distill_lr=1e-2))
        kls.append(_kl_to(fp, model, calib))
        planes.append(decoder_blocks(model)[1][0].self_attn.q_proj.planes.clone())
        flags.append([p.requires_grad for p in model.parameters()])
        assert torch.equal(model.get_input_embeddings().weight, fp.get_input_embeddings().weight)
        assert torch.equal(model.get_output_embeddings().weight, fp.get_output_embeddings().weight)
    assert torch.equal(planes[0], planes[1]) and flags[0] == flags[1]
    assert kls[1] < 0.85 * kls[0]


def test_stream_shares_stats_by_input_and_keyword_overrides_match_options():
    model, calib = _tiny("llama"), torch.randint(0, 300, (4, 16))
    block = decoder_blocks(model)[1][0]
    linears = {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    stream = CalibrationStream(model, block, calib, 2, asymmetric=True)
    stream.enter(block)
    stats, stages = stream.collect(block, linears, RTN(4, 16))
    attn, mlp = ["self_attn." + n for n in ("q_proj", "k_proj", "v_proj")], ["mlp.gate_proj", "mlp.up_proj"]
    assert stages == [attn, ["self_attn.o_proj"], mlp, ["mlp.down_proj"]]
    assert stats[attn[0]] is stats[attn[2]] and stats[mlp[0]] is stats[mlp[1]] and stats[attn[0]].rows == 64
    torch.testing.assert_close(stats[attn[0]].cross(), stats[attn[0]].hessian())  # nothing quantized yet
    metas = [quantize_model(_tiny("llama"), ShiftAdd(2, 16, "lat", 1), calib, options, **kw)
             for options, kw in ((WalkOptions(progress=False, true_sequential=False), {}),
                                 (None, {"progress": False, "true_sequential": False}))]
    assert metas[0] == metas[1]
    assert not RTN(4).needs_hessian and ShiftAdd(2).needs_hessian  # the former name of needs_stats


def test_mixed_bits_allocation_respects_budget():
    bits = allocate_bits({"a": 3.0, "b": 1.0, "c": 2.0}, {"a": 100, "b": 100, "c": 100}, 2, 3, 2.4)
    assert bits == {"a": 3, "b": 2, "c": 2}
    model = _tiny("llama")
    metas = quantize_model(model, ShiftAdd(2, 16, "acc", 1, mixed_bits=2.5), torch.randint(0, 300, (2, 16)), QUIET)
    assert {m["bits"] for m in metas.values()} == {2, 3}


def test_bad_inputs():
    class Bert(torch.nn.Module):
        config = transformers.BertConfig()

    with pytest.raises(ConfigError, match="not supported"):
        decoder_blocks(Bert())

    class Tok:
        def __call__(self, text):
            return {"input_ids": list(range(len(text.split())))}

    with pytest.raises(DataError, match="fewer than one window"):
        calibration_ids(Tok(), "too short", 4, 512)


def _hf_dir(tmp_path):
    from mulfree.data.text import train_tokenizer

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer("to be or not to be " * 200, 300))
    model = _tiny("llama")
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    (tmp_path / "calib.txt").write_text("the quality of mercy is not strained " * 80)
    return tmp_path / "hf"


def test_cli_quantize_and_errors(tmp_path, capsys):
    src = _hf_dir(tmp_path)
    out = tmp_path / "q"
    rc = cli_main(["quantize", "shiftadd", "--model", str(src), "--bits", "2", "--mode", "lat", "--group-size", "16",
                   "--rounds", "1", "--calib-data", str(tmp_path / "calib.txt"), "--calib-samples", "2",
                   "--calib-seqlen", "16", "--tune-epochs", "1", "--distill-epochs", "1", "--out", str(out)])
    assert rc == 0
    model, tok = load_quantized(out)
    assert model.config.quant_method == "shiftadd" and tok is not None
    assert model.config.mulfree_quant["incoherence"] == "hadamard-io"  # the shiftadd default
    assert model.config.mulfree_quant["calibration"]["asymmetric"]  # the walker default, recorded
    assert model.config.mulfree_quant["calibration"]["distill_epochs"] == 1
    rc = cli_main(["quantize", "gptq", "--model", str(src), "--bits", "3", "--calib-data", str(tmp_path / "calib.txt"),
                   "--calib-samples", "2", "--calib-seqlen", "16", "--no-asymmetric", "--calib-precision", "bf16",
                   "--out", str(tmp_path / "g")])
    calibration = load_quantized(tmp_path / "g")[0].config.mulfree_quant["calibration"]
    assert rc == 0 and not calibration["asymmetric"] and calibration["precision"] == "bf16"
    assert model.config.mulfree_quant["calibration"]["precision"] == "fp32"  # the default, recorded
    assert cli_main(["quantize", "gptq", "--model", str(src), "--bits", "9", "--out", str(out)]) == 2
    assert "error: --bits 9 is out of range" in capsys.readouterr().err
    assert cli_main(["quantize", "gptq", "--model", str(src), "--bits", "3", "--tune-epochs", "-1", "--out", str(out)]) == 2
    assert "error: --tune-epochs must be >= 0" in capsys.readouterr().err
    assert cli_main(["quantize", "shiftadd", "--model", str(src), "--bits", "3", "--distill-lr", "0", "--out", str(out)]) == 2
    assert "error: --distill-epochs must be >= 0 and --distill-lr > 0" in capsys.readouterr().err
    rc = cli_main(["quantize", "gptq", "--model", str(src), "--bits", "3", "--calib-data", str(tmp_path / "calib.txt"),
                   "--calib-seqlen", "100000", "--out", str(tmp_path / "q2")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: calibration text has") and "; pass a longer" in last
    # --out holding a model: refused before any work, replaced whole with --overwrite
    before = sorted(p.name for p in out.iterdir())
    assert cli_main(["quantize", "rtn", "--model", str(src), "--bits", "4", "--out", str(out)]) == 2
    assert "already holds a model" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before
    assert cli_main(["quantize", "rtn", "--model", str(src), "--bits", "4", "--out", str(out), "--overwrite"]) == 0
    assert load_quantized(out)[0].config.quant_method == "rtn"


def test_quantized_dir_checksums_and_schema(tmp_path):
    from mulfree.errors import CheckpointError
    from mulfree.integrity import MANIFEST, read_manifest

    model = _tiny("llama")
    method = RTN(4, 16)
    save_quantized(model, None, tmp_path / "q", method, quantize_model(model, method, None, QUIET), {})
    assert {"config.json", "model.safetensors"} <= set(read_manifest(tmp_path / "q"))
    path = tmp_path / "q" / "config.json"
    good = json.loads(path.read_text())
    edited = json.loads(path.read_text())
    edited["mulfree_quant"]["bits"] = 3
    for meta in edited["mulfree_quant"]["layers"].values():
        meta["bits"] = 3
    path.write_text(json.dumps(edited))  # consistent with itself: only the checksum tells
    with pytest.raises(CheckpointError, match="config.json does not match its checksum"):
        load_quantized(tmp_path / "q")
    (tmp_path / "q" / MANIFEST).unlink()
    edited["mulfree_quant"]["bits"] = 9
    path.write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="field 'bits' must be an integer in 2..8, got 9"):
        load_quantized(tmp_path / "q")
    path.write_text(json.dumps(good))  # a dir without a manifest (written before checksums) loads
    load_quantized(tmp_path / "q")
    assert cli_main(["quantize", "rtn", "--model", str(tmp_path / "nowhere"), "--bits", "4", "--out",
                     str(tmp_path / "q")]) == 2  # refused before the (missing) model is even read


def test_collect_stops_each_pass_after_the_linears_it_asks_for(monkeypatch):
    """True-sequential + asymmetric traced walk (the one for block types `quant.staged` does not know): per batch
    the block's MLP norm runs in the first collect, the gate/up and down stages and the advance (4), not in the
    o_proj stage; its FP copy (which inherits the hook) runs whole once, in the collect that keeps its outputs,
    then in the gate/up and down stages only (3). Running every pass whole, as before, made it 5 + 5."""
    from mulfree.quant import staged

    monkeypatch.setattr(staged, "layout_of", lambda *a: None)
    model, calib = _tiny("llama"), torch.randint(0, 300, (4, 16))
    block = decoder_blocks(model)[1][0]
    calls = []
    block.post_attention_layernorm.register_forward_hook(lambda *_: calls.append(1))
    quantize_model(model, _RecordingRTN(), calib, WalkOptions(progress=False, batch_size=2, asymmetric=True))
    assert len(calls) == (4 + 3) * 2  # 2 batches
