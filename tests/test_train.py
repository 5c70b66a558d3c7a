"""Training loop: exact resume after an interruption, LR schedule, custom batches, checkpoints."""

from __future__ import annotations

import json
import math
import threading

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


def test_checkpoint_of_an_unfused_optimizer_resumes_fused(tmp_path):
    """Checkpoints of earlier releases hold `fused: None` in their groups; the resumed optimizer keeps its own
    (fused) implementation and the saved moments, and steps as the unfused one would, to float rounding."""
    from mulfree.checkpoint import load_checkpoint, save_checkpoint

    model = _mmfree()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # fused=None: torch's per-tensor loop on the CPU
    for _ in range(2):
        model(_ids(64).view(4, 16))[0].sum().backward()
        opt.step()
    save_checkpoint(tmp_path, 2, model, opt, _cfg())
    fresh = _mmfree()
    fused = torch.optim.AdamW(fresh.parameters(), lr=1e-3, fused=True)
    assert load_checkpoint(tmp_path, fresh, fused)[0] == 2
    assert all(g["fused"] is True for g in fused.param_groups)
    for p, q in zip(opt.param_groups[0]["params"], fused.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["exp_avg_sq"], fused.state[q]["exp_avg_sq"])
    for o in (opt, fused):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.step()
    for p, q in zip(opt.param_groups[0]["params"], fused.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


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


def _strict(path):
    """The records of a JSONL file, refusing the non-standard NaN / Infinity tokens."""
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_non_finite_loss_stops_with_the_last_good_checkpoint_kept(tmp_path):
    ids = _ids()
    model = _mmfree()

    def poisons_at_step_3(step, gen):
        if step == 3:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return random_windows(ids, 4, 16, gen)

    with pytest.raises(ConfigError, match=r"loss became nan at step 4.*checkpoint \(step 3\) stays"):
        train(model, ids, None, _cfg(save_every=1, grad_accum=1), tmp_path / "run", batch_fn=poisons_at_step_3)
    run = tmp_path / "run"
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 3
    assert not (run / "model.safetensors").exists()  # no final model from poisoned weights
    assert [r["step"] for r in _strict(run / "metrics.jsonl")] == [1, 2, 3]
    resumed = train(_mmfree(), ids, None, _cfg(save_every=1, grad_accum=1), run, resume=True)
    straight = train(_mmfree(), ids, None, _cfg(save_every=1, grad_accum=1), tmp_path / "straight")
    assert resumed["loss"] == straight["loss"] and math.isfinite(resumed["loss"])


def test_metrics_are_strict_json_with_null_for_non_finite_values(tmp_path):
    def unscored(step, gen):  # every target ignored: the validation loss is NaN
        x = torch.randint(0, V, (2, 8), generator=gen)
        return x, torch.full_like(x, -100)

    train(_mmfree(), _ids(), None, _cfg(steps=2, grad_accum=1, eval_every=1), tmp_path, val_batch_fn=unscored)
    vals = [r for r in _strict(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert vals and all(r["val_loss"] is None for r in vals)


def test_resume_drops_a_torn_metrics_line_and_stale_temp_files(tmp_path):
    ids = _ids()
    run = tmp_path / "run"
    train(_mmfree(), ids, None, _cfg(steps=4, save_every=2), run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a write cut off by kill -9
    (run / ".model.safetensors.ab12cd34.tmp").write_bytes(b"\0" * 100)
    (run / ".ckpt-6.zz99yy88.tmp").mkdir()
    (run / "ckpt-6").mkdir()  # renamed into place, but the kill came before checkpoint.json pointed to it
    (run / "notes.tmp").write_text("the user's file")
    train(_mmfree(), ids, None, _cfg(steps=6, save_every=2), run, resume=True)
    steps = [r["step"] for r in _strict(run / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    names = sorted(p.name for p in run.iterdir() if p.name != "checksums.json")
    assert names == ["checkpoint.json", "ckpt-6", "config.json", "metrics.jsonl",
                     "model.safetensors", "notes.tmp", "train_config.json"]


def test_resume_refuses_other_training_data(tmp_path):
    from mulfree.errors import DataError

    train(_mmfree(), _ids(), None, _cfg(steps=2), tmp_path)
    with pytest.raises(DataError, match="training data differs"):
        train(_mmfree(), _ids() % 5, None, _cfg(steps=3), tmp_path, resume=True)


def test_checkpoint_bit_flip_is_named(tmp_path):
    train(_mmfree(), _ids(), None, _cfg(steps=2, save_every=2), tmp_path)
    weights = tmp_path / "ckpt-2" / "optimizer.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors does not match its checksum"):
        train(_mmfree(), _ids(), None, _cfg(steps=3), tmp_path, resume=True)


def test_overwrite_keeps_the_old_run_until_the_new_one_is_complete(tmp_path):
    ids = _ids()
    run = tmp_path / "run"
    train(_mmfree(), ids, None, _cfg(steps=2), run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}

    def dies(step, gen):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_mmfree(), ids, None, _cfg(steps=2), run, batch_fn=dies, overwrite=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the unfinished replacement is gone
    train(_mmfree(), ids, None, _cfg(steps=3, seed=1), run, overwrite=True)
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    (run / "tokenizer.json").write_text("{}")
    (run / "tokenizer_config.json").write_text("{}")
    (run / ".tokenizer.json.ab12cd34.tmp").write_text("partial")
    with pytest.raises(CheckpointError, match="before its first checkpoint"):
        train(_mmfree(), _ids(), None, _cfg(steps=1), run, resume=True)
    train(_mmfree(), _ids(), None, _cfg(steps=1), run)
    assert not (run / ".tokenizer.json.ab12cd34.tmp").exists()


def test_stop_event_ends_side_by_side_runs_like_ctrl_c(tmp_path):
    """Runs side by side (the demo) stop each other: a set stop event ends a run after its current step with
    KeyboardInterrupt, and the checkpoints already written stay (the run can resume)."""
    stop = threading.Event()
    losses = []

    def run(out):
        try:
            train(_mmfree(), _ids(), None, _cfg(steps=6, save_every=1, grad_accum=1), out, stop_event=stop)
        except KeyboardInterrupt:
            losses.append(_losses(out / "metrics.jsonl"))

    worker = threading.Thread(target=run, args=(tmp_path / "a",))
    stop.set()
    worker.start()
    worker.join()
    assert losses == [[(1, losses[0][0][1], None)]]  # exactly one step ran
    assert not (tmp_path / "a" / "model.safetensors").exists()
    train(_mmfree(), _ids(), None, _cfg(steps=6, save_every=1, grad_accum=1), tmp_path / "a", resume=True)
    assert [r[0] for r in _losses(tmp_path / "a" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("kw, message", [
    ({"lr": float("inf")}, "--lr must be a finite number"),
    ({"weight_decay": float("nan")}, "--weight-decay must be a finite number"),
    ({"grad_clip": -1.0}, "--grad-clip must be >= 0"),
    ({"seed": 2**70}, "--seed must be <="),
    ({"batch_size": 10**12}, "--batch-size must be <="),
    ({"steps": "3"}, "--steps must be an integer"),
    ({"device": "gpu"}, "--device must be cpu, cuda or cuda:N"),
])
def test_train_config_refuses_non_finite_and_out_of_range_values(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kw)


def test_cuda_without_cuda_and_a_step_beyond_memory_are_refused(tmp_path, monkeypatch):
    from mulfree import train as train_module

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            train(_mmfree(), _ids(), None, _cfg(device="cuda"), tmp_path / "a")
    monkeypatch.setattr(train_module, "_available_bytes", lambda device: 1000)
    with pytest.raises(ConfigError, match="GiB is available"):
        train(_mmfree(), _ids(), None, _cfg(), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_compiled_training_gives_the_eager_losses(tmp_path):
    """--compile: torch.compile around the fused ops (they stay opaque calls) trains to the eager losses."""
    ids = _ids()
    eager = train(_mmfree(), ids, None, _cfg(steps=2, save_every=0), tmp_path / "eager")
    compiled = train(_mmfree(), ids, None, _cfg(steps=2, save_every=0, compile=True), tmp_path / "compiled")
    assert abs(compiled["loss"] - eager["loss"]) < 1e-4
