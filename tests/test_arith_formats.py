"""The interleaved, index-hint and digit-scratchpad formats, the interleaved per-character loss mask and its
forced decoding, the BitNet-style Transformer (`--model bitnet`), the CPU-time budget and the grid benchmark."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from mulfree.arith import (
    build_model,
    collate,
    encode_line,
    evaluate_task,
    forced_complete,
    greedy_complete,
    load_run,
    make_batch_fn,
    tokenizer_for,
    train_arith,
)
from mulfree.cli import main
from mulfree.data.arithmetic import (
    ArithTask,
    format_problem,
    make_test_set,
    output_mask,
    parse_answer,
    split_line,
)
from mulfree.models.io import read_config
from mulfree.models.transformer import TransformerConfig
from mulfree.settings import TrainConfig
from mulfree.train import lm_loss

NEW = ("interleaved", "index-hint", "scratchpad-digits", "columns")
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}


def test_templates():
    assert format_problem(239, 821, "add", "interleaved") == "+=910 326 280 001"
    assert format_problem(12, 34, "mul", "interleaved") == "*=248 130 004 000"
    assert format_problem(239, 821, "add", "interleaved", width=4) == "+=910 326 280 001 000"
    assert format_problem(239, 821, "add", "index-hint") == "c2b3a9+c8b2a1=a0b6c0d1"
    assert format_problem(239, 821, "add", "index-hint", rng=random.Random(0))[:2] in {
        f"{letter}2" for letter in "abcdefghijklmnopqrstuvwxyz"}
    assert format_problem(239, 821, "add", "scratchpad-digits") == "239+821=932+128:0601"
    assert format_problem(5, 821, "add", "scratchpad-digits") == "5+821=500+128:6280"
    assert format_problem(239, 821, "mul", "scratchpad-digits") == "239*821=932;1:9320;2:08740=91050;8:002191=912691"
    assert format_problem(239, 7, "mul", "scratchpad-digits") == "239*7=932;7:3761"
    assert format_problem(12, 34, "mul", "columns") == "*=000,2480800 000,2360600,1440010 100,1330400 000"
    assert format_problem(239, 821, "add", "columns") == "+=00,910101 10,325060 00,280101 10"
    assert format_problem(5, 821, "add", "columns") == "+=00,516060 00,022020 00,088080 00"


@pytest.mark.parametrize("fmt", NEW)
@pytest.mark.parametrize("op", ["add", "mul"])
def test_round_trip_1_to_8_digits(fmt, op):
    rng = random.Random(f"{fmt}-{op}")
    tok = tokenizer_for(fmt)
    for _ in range(400):
        a, b = (rng.randrange(10 ** (n - 1) if n > 1 else 0, 10**n) for n in (rng.randint(1, 8), rng.randint(1, 8)))
        line = format_problem(a, b, op, fmt, rng=rng, width=rng.choice([None, 5]))
        expected = a + b if op == "add" else a * b
        prompt, answer = split_line(line)
        assert parse_answer(line, fmt) == parse_answer(answer, fmt) == expected, line
        assert parse_answer(answer + "\n99", fmt) == expected
        assert tok.decode(tok.encode(line, eos=True)) == line
        if fmt in ("interleaved", "columns"):
            assert not any(ch.isdigit() for ch in prompt)  # nothing digit-revealing before the stream


@pytest.mark.parametrize("text, fmt", [
    ("", "interleaved"), ("+=", "interleaved"), ("+=91 326", "interleaved"), ("+=910  326", "interleaved"),
    ("+=910 3261", "interleaved"), ("+=910 32*", "interleaved"), ("910,326", "interleaved"),
    ("", "index-hint"), ("c2b3a9+c8b2a1=", "index-hint"), ("a0b6c", "index-hint"), ("0a6b", "index-hint"),
    ("a0bb6", "index-hint"), ("a0 b6", "index-hint"),
    ("", "scratchpad-digits"), ("239+821=932+128", "scratchpad-digits"), ("239+821=932", "scratchpad-digits"),
    ("932+128:06a1", "scratchpad-digits"), ("239*821=932;1:9320;2:08740", "scratchpad-digits"),
    ("932;12:9320", "scratchpad-digits"), ("932;1:9320;", "scratchpad-digits"), ("932+128=0601", "scratchpad-digits"),
    ("", "columns"), ("*=", "columns"), ("*=000,248080", "columns"), ("*=000,2480800  000", "columns"),
    ("*=000,2480800,", "columns"), ("*=0,2480800", "columns"), ("*=000,24808a0", "columns"), ("000;2480800", "columns"),
])
def test_malformed_parses_to_none(text, fmt):
    assert parse_answer(text, fmt) is None


def test_interleaved_loss_mask_covers_exactly_the_output_digits():
    tok = tokenizer_for("interleaved")
    rng = random.Random(4)
    for op in ("add", "mul"):
        for _ in range(100):
            a, b = rng.randrange(10 ** rng.randint(1, 8)), rng.randrange(10 ** rng.randint(1, 8))
            line = format_problem(a, b, op, "interleaved")
            mask = output_mask(line, "interleaved")
            assert len(mask) == len(line) + 1 and not mask[-1]
            groups = split_line(line)[1].split(" ")
            produced = "".join(ch for ch, m in zip(line, mask) if m)
            assert produced == "".join(g[2] for g in groups)  # exactly the c_k, in order
            x, y = collate([encode_line(tok, line, "interleaved")], tok.pad_id)
            assert tok.decode([t for t in y[0].tolist() if t != -100]) == produced
            assert all(x[0, j + 1] != tok.eos_id for j in range(x.shape[1] - 1))
    for op in ("add", "mul"):  # columns: everything but the operand pairs, the separators and the end
        for _ in range(100):
            a, b = rng.randrange(10 ** rng.randint(1, 8)), rng.randrange(10 ** rng.randint(1, 8))
            line = format_problem(a, b, op, "columns")
            mask = output_mask(line, "columns")
            assert len(mask) == len(line) + 1 and not mask[-1]
            given = "".join(ch for ch, m in zip(line, mask) if not m and ch.isdigit())
            ra, rb = str(a)[::-1], str(b)[::-1]
            if op == "add":
                n = max(len(ra), len(rb))
                pairs = [(k, k) for k in range(n)]
                ra, rb = ra.ljust(n, "0"), rb.ljust(n, "0")
            else:
                pairs = [(i, n - i) for n in range(len(ra) + len(rb)) for i in range(len(ra)) if 0 <= n - i < len(rb)]
            assert given == "".join(ra[i] + rb[j] for i, j in pairs)  # the operand digits in the algorithm's order
            w, groups = (2, max(len(ra), len(rb)) + 1) if op == "add" else (3, len(ra) + len(rb))
            assert sum(mask) == groups * w + len(pairs) * (2 + w)  # carry in; each pair's result and total
    # the other formats still learn the whole answer and the end of line
    assert output_mask("12+34=46", "reversed") == [False] * 6 + [True] * 3


@pytest.mark.parametrize("kind, fmt, op", [("mmfree", "interleaved", "add"), ("transformerpp", "interleaved", "add"),
                                           ("bitnet", "interleaved", "add"), ("mmfree", "columns", "mul"),
                                           ("transformerpp", "columns", "mul")])
def test_forced_decoding_equals_step_by_step_recompute(kind, fmt, op):
    tok = tokenizer_for(fmt)
    model = build_model(kind, tok.vocab_size, seed=5, **TINY).eval()
    lines = [format_problem(a, b, op, fmt) for a, b in [(12, 34), (99, 1), (7, 8), (123, 4567), (5, 60)]]
    got = forced_complete(model, tok, lines, fmt, batch_size=2)
    for line, text in zip(lines, got):
        ids, flags = tok.encode(line, bos=True), output_mask(line, fmt)
        with torch.no_grad():
            for t, produced in enumerate(flags[:-1], start=1):
                if produced:
                    ids[t] = model(torch.tensor([ids[:t]]))[0][0, -1].argmax().item()
        assert text == tok.decode(ids[len(split_line(line)[0]) + 1:])


def test_bitnet_kv_cache_equals_full_forward():
    model = build_model("bitnet", 30, seed=1, **TINY).eval()
    assert model.config.bitlinear and model.config.model_type == "transformerpp"
    assert sum(type(m).__name__ == "BitLinear" for m in model.modules()) == 2 * 7 + 1  # q k v o gate up down, head
    ids = torch.randint(3, 30, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(ids)
        logits, state = model(ids[:, :6])
        parts = [logits]
        for t in range(6, 17):
            logits, state = model(ids[:, t : t + 1], state)
            parts.append(logits)
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5
    tok = tokenizer_for("reversed")
    model = build_model("bitnet", tok.vocab_size, seed=2, **TINY).eval()
    prompts = ["7+8=", "12+345="]
    for prompt, text in zip(prompts, greedy_complete(model, tok, prompts, max_new_tokens=5)):
        ids, out = tok.encode(prompt), []
        with torch.no_grad():
            for _ in range(5):
                nxt = model(torch.tensor([ids]))[0][0, -1].argmax().item()
                if nxt == tok.eos_id:
                    break
                ids.append(nxt)
                out.append(nxt)
        assert text == tok.decode(out)


def test_old_transformer_configs_load_without_the_flag():
    cfg = TransformerConfig.from_dict({"model_type": "transformerpp", "vocab_size": 21, **TINY,
                                       "num_attention_heads": 2})
    assert cfg.bitlinear is False and cfg.to_dict()["bitlinear"] is False


def _loss_drops(kind: str, fmt: str, op: str, digits: int, steps: int = 40, lr: float = 3e-3) -> tuple[float, float]:
    tok = tokenizer_for(fmt)
    model = build_model(kind, tok.vocab_size, seed=0, **TINY)
    x, y = make_batch_fn(ArithTask(op, fmt, digits), tok, 32)(0, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize("kind, fmt, op, digits", [
    ("mmfree", "interleaved", "add", 3), ("transformerpp", "index-hint", "add", 3),
    ("transformerpp", "scratchpad-digits", "mul", 2), ("bitnet", "reversed", "add", 2),
])
def test_training_smoke_loss_decreases(kind, fmt, op, digits):
    first, last = _loss_drops(kind, fmt, op, digits)
    assert last < 0.7 * first, (first, last)


def test_bitnet_cli_train_save_load_and_cpu_budget(tmp_path, capsys):
    preset, out = tmp_path / "p.json", tmp_path / "run"
    preset.write_text(json.dumps({"model_type": "transformerpp", "vocab_size": 21, "num_attention_heads": 2, **TINY}))
    assert main(["arith", "train", "--task", "add", "--format", "interleaved", "--digits", "2", "--model", "bitnet",
                 "--preset", str(preset), "--steps", "2", "--batch-size", "4", "--test-per-length", "5",
                 "--eval-lengths", "1-3", "--out", str(out)]) == 0
    assert "bitnet/interleaved" in capsys.readouterr().out
    model, tok, task, meta = load_run(out)
    assert meta["model"] == "bitnet" and model.config.bitlinear
    assert read_config(out)["model_type"] == "transformerpp"
    (res, *_) = evaluate_task(model, tok, task, make_test_set("add", [1], 5))
    assert res.n == 5
    cfg = TrainConfig(steps=500, batch_size=4, seq_len=64, lr=1e-3, min_lr=1e-4, warmup=1, eval_every=0,
                      eval_batches=1, save_every=0, progress=False)
    # a CPU budget of 0 s stops the 500-step schedule after its first step; the model is still saved
    _, _, metrics = train_arith(ArithTask("add", "index-hint", 1), "mmfree", tmp_path / "b", cfg, eval_lengths=[1],
                                test_per_length=3, cpu_budget_s=0.0)
    assert metrics["step"] == 1 and metrics["cpu_s"] > 0 and load_run(tmp_path / "b")[3]["fmt"] == "index-hint"


def test_unknown_arith_model_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["arith", "train", "--model", "bitnet2", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'bitnet2'" in capsys.readouterr().err


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "arith_formats.py"
    spec = importlib.util.spec_from_file_location("arith_formats_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_rows_resume_and_report(tmp_path, monkeypatch, capsys):
    bench = _bench()
    argv = ["arith_formats.py", "--task", "add", "--digits", "1", "--models", "bitnet", "--formats", "interleaved",
            "--seeds", "0,1", "--steps", "2", "--per-length", "4", "--eval-lengths", "1-2", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    rows = [json.loads(line) for line in (tmp_path / "grid.jsonl").read_text().splitlines()]
    assert [(r["model"], r["format"], r["seed"], r["steps"]) for r in rows] == [("bitnet", "interleaved", 0, 2),
                                                                               ("bitnet", "interleaved", 1, 2)]
    bench.main()  # resumable: finished runs are skipped
    assert "0 run(s) to do" in capsys.readouterr().out
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{bench.BEGIN}\nold\n{bench.END}\ntail\n")
    monkeypatch.setattr(sys, "argv", ["arith_formats.py", "--report", "--out", str(tmp_path), "--doc", str(doc),
                                      "--png", str(tmp_path / "g.png")])
    bench.main()
    text = doc.read_text()
    assert "| bitnet | `interleaved` | 2 |" in text and " ± " in text and "old" not in text and text.endswith("tail\n")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
