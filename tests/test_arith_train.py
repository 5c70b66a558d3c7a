"""Arithmetic training/eval drivers: answer-only targets, stateful greedy decoding equal to full
recomputation, errors counted not raised, train -> save -> eval through the CLI."""

import json

import pytest
import torch

from mulfree.arith import (
    build_model,
    collate,
    encode_line,
    evaluate_task,
    greedy_complete,
    load_run,
    make_batch_fn,
    model_config,
)
from mulfree.cli import main
from mulfree.data.arithmetic import ArithTask, make_test_set
from mulfree.data.chartok import CharTokenizer

TOK = CharTokenizer()
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}


def test_batches_learn_only_the_answer():
    ids, flags = encode_line(TOK, "12+345=753", "reversed")
    n_prompt = len("12+345=") + 1  # bos + prompt
    assert flags == [False] * (n_prompt - 1) + [True] * 4
    x, y = collate([(ids, flags), encode_line(TOK, "1+2=3")], TOK.pad_id)
    assert x.shape == y.shape == (2, len(ids) - 1)
    assert TOK.decode([t for t in y[0].tolist() if t != -100]) == "753"
    assert y[0, n_prompt - 2].item() == -100 and y[0, -1].item() == TOK.eos_id
    assert (y[1] != -100).sum().item() == 2  # "3" and eos
    assert torch.equal(collate([(ids, n_prompt)], TOK.pad_id)[1], y[:1])  # (ids, prompt length) items too
    fn = make_batch_fn(ArithTask("add", "reversed", 3), TOK, 8)
    a, b = fn(4, torch.Generator().manual_seed(9)), fn(4, torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kind", ["transformer", "mmfree", "bitnet"])
def test_stateful_greedy_equals_full_recompute(kind):
    model = build_model(kind, TOK.vocab_size, seed=3, **TINY).eval()
    prompts = ["7+8=", "12+345=", "99+1=", "3  4+ 5="]
    got = greedy_complete(model, TOK, prompts, max_new_tokens=6)
    for prompt, text in zip(prompts, got):
        ids = TOK.encode(prompt)
        out = []
        with torch.no_grad():
            for _ in range(6):
                nxt = model(torch.tensor([ids]))[0][0, -1].argmax().item()
                if nxt == TOK.eos_id:
                    break
                ids.append(nxt)
                out.append(nxt)
        assert text == TOK.decode(out)


def test_arith_preset_is_about_one_million_parameters():
    for kind in ("transformer", "bitnet", "mmfree"):
        model = build_model(kind, TOK.vocab_size)
        assert 0.9e6 < sum(p.numel() for p in model.parameters()) < 1.2e6
    assert model_config("transformer", TOK.vocab_size).num_attention_heads == 4


def test_malformed_model_output_counts_wrong_without_crashing():
    class Plus(torch.nn.Module):  # always predicts '+': every answer is malformed
        def forward(self, ids, state=None):
            logits = torch.zeros(*ids.shape, TOK.vocab_size)
            logits[..., TOK.encode("+", bos=False)[0]] = 1.0
            return logits, state

    task = ArithTask("add", "reversed", 2)
    (res,) = evaluate_task(Plus(), TOK, task, make_test_set("add", [2], 10))
    assert (res.n, res.exact, res.per_digit, res.malformed) == (10, 0.0, 0.0, 10)


def test_train_save_eval_cli(tmp_path, capsys):
    out, preset = tmp_path / "run", tmp_path / "tiny.json"
    preset.write_text(json.dumps({"model_type": "mmfree", "vocab_size": TOK.vocab_size, **TINY}))
    rc = main(["arith", "train", "--task", "add", "--format", "padded-reversed", "--digits", "2",
               "--model", "mmfree", "--preset", str(preset), "--steps", "3", "--batch-size", "4",
               "--test-per-length", "5", "--out", str(out), "--seed", "1"])
    assert rc == 0
    assert "mmfree/padded-reversed" in capsys.readouterr().out
    model, _tok, task, meta = load_run(out)
    assert (task.op, task.fmt, task.digits, task.width, meta["model"]) == ("add", "padded-reversed", 2, 2, "mmfree")
    assert model.config.hidden_size == TINY["hidden_size"]
    saved = json.loads((out / "arith_eval.json").read_text())
    assert [r["digits"] for r in saved] == [1, 2, 3, 4, 5]
    png = tmp_path / "h.png"
    assert main(["arith", "eval", "--model", str(out), "--per-length", "5", "--png", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    # Evaluation on the same seed reproduces the numbers written at training time.
    table = capsys.readouterr().out
    assert f"{100 * saved[0]['exact']:5.1f}" in table
    assert main(["arith", "eval", "--model", str(out), "--saved", "--png", str(png)]) == 0
    assert capsys.readouterr().out.splitlines()[:3] == table.splitlines()[:3]


def test_cli_bad_input(tmp_path, capsys):
    assert main(["arith", "train", "--digits", "0", "--out", str(tmp_path / "a")]) == 2
    assert "operand length must be an integer >= 1" in capsys.readouterr().err
    assert main(["arith", "eval", "--model", str(tmp_path / "missing")]) == 2
    assert "arith.json is missing" in capsys.readouterr().err
    assert main(["arith", "eval", "--model", str(tmp_path), "--lengths", "0-2"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["arith", "train", "--format", "bogus", "--out", str(tmp_path / "b")])
    assert exc.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_arith_train_never_writes_into_a_non_empty_dir(tmp_path, capsys):
    out, preset = tmp_path / "out", tmp_path / "tiny.json"
    preset.write_text(json.dumps({"model_type": "mmfree", "vocab_size": TOK.vocab_size, **TINY}))
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "someone else\'s"}')
    args = ["arith", "train", "--digits", "1", "--model", "mmfree", "--preset", str(preset), "--steps", "2",
            "--batch-size", "4", "--test-per-length", "2", "--out", str(out)]
    assert main(args) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert main([*args, "--overwrite"]) == 0
    assert (out / "arith.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.json"]


def test_interrupted_arith_train_continues_to_the_same_model(tmp_path, capsys, monkeypatch):
    """A Ctrl-C in step 8 of 10 keeps the build dir (a checkpoint every tenth of the steps: the last at 7); the
    same command continues from there to the weights and results of an uninterrupted run (before, all was lost)."""
    from mulfree import arith
    from mulfree.models.io import load_model

    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps({"model_type": "transformerpp", "vocab_size": TOK.vocab_size, **TINY,
                                  "num_attention_heads": 2}))

    def args(out):
        return ["arith", "train", "--digits", "2", "--model", "transformerpp", "--preset", str(preset), "--steps",
                "10", "--batch-size", "4", "--test-per-length", "3", "--out", str(out), "--seed", "3"]

    assert main(args(tmp_path / "whole")) == 0
    plain = arith.make_batch_fn

    def interrupting(*a, **k):
        fn = plain(*a, **k)

        def batch(step, gen):
            if step == 7:
                raise KeyboardInterrupt
            return fn(step, gen)

        return batch

    monkeypatch.setattr(arith, "make_batch_fn", interrupting)
    assert main(args(tmp_path / "cut")) == 130  # as Ctrl-C
    assert "the same command continues from there" in capsys.readouterr().err
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".cut.")]
    assert len(kept) == 1 and (kept[0] / "ckpt-7").is_dir() and not (tmp_path / "cut").exists()
    monkeypatch.setattr(arith, "make_batch_fn", plain)
    assert main(args(tmp_path / "cut")) == 0
    a, b = load_model(tmp_path / "whole")[0].state_dict(), load_model(tmp_path / "cut")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "arith_eval.json").read_text() == (tmp_path / "cut" / "arith_eval.json").read_text()
    assert not any(p.name.startswith(".cut.") for p in tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["arith", "train", "--width", "-1"], "--width must be positive"),
    (["arith", "train", "--lr", "nan"], "--lr must be a finite number"),
    (["arith", "train", "--seed", str(2**70)], "--seed must be <="),
    (["arith", "eval", "--per-length", "0"], "--per-length must be positive"),
    (["arith", "eval", "--png", "."], "--png '.' is a directory"),
])
def test_arith_flags_out_of_range(tmp_path, capsys, argv, message):
    extra = ["--out", str(tmp_path / "a")] if argv[1] == "train" else ["--model", str(tmp_path)]
    assert main(argv + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
