"""Training loop: exact resume after an interruption, LR schedule, custom batches, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mulfree.errors import CheckpointError, ConfigError
from mulfree.models.io import load_model
from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM
from mulfree.models.transformer import TransformerConfig, TransformerForCausalLM
from mulfree.train import TrainConfig, lr_at, random_windows, train

V = 64


def _mmfree():
    torch.manual_seed(0)
    return MMFreeForCausalLM(MMFreeConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, intermediate_size=64))


def _ids(n=4000):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(1))


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, seq_len=16, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=2, eval_batches=2,
                save_every=3, grad_accum=2, progress=False)
    return TrainConfig(**{**base, **kw})


def _losses(path):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, path.read_text().splitlines())]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    ids = _ids()
    straight = train(_mmfree(), ids, ids[:600], _cfg(), tmp_path / "a")

    class Killed(Exception):
        pass

    def dies_at_step_4(step, gen):  # same batches as the default sampler until the "kill"
        if step == 4:
            raise Killed
        return random_windows(ids, 4, 16, gen)

    with pytest.raises(Killed):
        train(_mmfree(), ids, ids[:600], _cfg(), tmp_path / "b", batch_fn=dies_at_step_4)
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 3
    torch.manual_seed(123)  # the resumed process starts with a different global RNG and fresh weights
    resumed = train(_mmfree(), ids, ids[:600], _cfg(), tmp_path / "b", resume=True)
    assert _losses(tmp_path / "a" / "metrics.jsonl") == _losses(tmp_path / "b" / "metrics.jsonl")
    assert straight["loss"] == resumed["loss"] and straight["val_loss"] == resumed["val_loss"]
    a, _ = load_model(tmp_path / "a")
    b, _ = load_model(tmp_path / "b")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_loss_decreases_and_saved_model_reproduces_logits(tmp_path):
    ids = torch.arange(4000) % 7  # a periodic stream is easy to learn
    model = _mmfree()
    result = train(model, ids, None, _cfg(steps=30, save_every=0, grad_accum=1, lr=1e-2), tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert result["tokens"] == 30 * 4 * 16
    loaded, _ = load_model(tmp_path)
    x = ids[:40][None]
    model.eval()
    assert torch.equal(model(x)[0], loaded(x)[0])


def test_transformer_and_custom_batches_with_ignored_targets(tmp_path):
    torch.manual_seed(0)
    model = TransformerForCausalLM(TransformerConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64))

    def batches(step, gen):
        x = torch.randint(0, V, (2, 8), generator=gen)
        y = torch.full_like(x, -100)
        y[:, -1] = 5  # only the last position is scored
        return x, y

    result = train(model, None, None, _cfg(steps=3, grad_accum=1), tmp_path, batch_fn=batches,
                   val_batch_fn=batches)
    assert result["tokens"] == 3 * 2 and math.isfinite(result["val_loss"])


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_bad_settings_and_directories(tmp_path):
    with pytest.raises(ConfigError):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(CheckpointError):
        train(_mmfree(), _ids(), None, _cfg(), tmp_path / "none", resume=True)
    train(_mmfree(), _ids(), None, _cfg(steps=1), tmp_path / "run")
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError):
        train(_mmfree(), _ids(), None, _cfg(steps=1), tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


def test_bf16_autocast_step_is_close_to_fp32(tmp_path):
    ids = _ids()
    fp32 = train(_mmfree(), ids, None, _cfg(steps=1, save_every=0), tmp_path / "fp32")
    bf16 = train(_mmfree(), ids, None, _cfg(steps=1, save_every=0, bf16=True), tmp_path / "bf16")
    assert math.isfinite(bf16["loss"]) and abs(bf16["loss"] - fp32["loss"]) < 0.05
