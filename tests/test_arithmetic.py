"""Arithmetic data: every format round-trips through its parser, answers are computed, sampling is
balanced and held-out problems never reach training, and bad input gives clear errors."""

import random
from collections import Counter

import numpy as np
import pytest

from mulfree.data.arithmetic import (
    FORMATS,
    ArithTask,
    digit_accuracy,
    format_chars,
    format_problem,
    held_out_problems,
    make_test_set,
    parse_answer,
    sample_of_length,
    sample_operands,
    split_line,
)
from mulfree.data.chartok import ARITH_CHARS, CharTokenizer
from mulfree.errors import CheckpointError, ConfigError, DataError


def _carries(a: int, b: int) -> int:
    n, carry, count = 0, 0, 0
    while a or b:
        carry = int(a % 10 + b % 10 + carry >= 10)
        count += carry
        a, b, n = a // 10, b // 10, n + 1
    return count


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op", ["add", "mul"])
def test_format_parse_round_trip_random_problems(fmt, op):
    rng = random.Random(f"{fmt}-{op}")
    tok = CharTokenizer(ARITH_CHARS + format_chars(fmt))
    for _ in range(300):
        a, b = rng.randrange(10 ** rng.randint(1, 9)), rng.randrange(10 ** rng.randint(1, 9))
        line = format_problem(a, b, op, fmt, rng=rng, width=rng.choice([None, 3, 12]))
        expected = a + b if op == "add" else a * b
        assert parse_answer(line, fmt) == expected
        prompt, answer = split_line(line)
        assert prompt.endswith("=") and prompt + answer == line
        assert parse_answer(answer, fmt) == expected  # a model's completion parses the same way
        assert parse_answer(answer + "\n123", fmt) == expected  # text after the end marker is ignored
        assert tok.decode(tok.encode(line, eos=True)) == line


def test_formats_match_the_reference_examples():
    assert format_problem(239, 821, "add", "plain") == "239+821=1060"
    assert format_problem(239, 821, "add", "reversed") == "239+821=0601"
    assert format_problem(239, 821, "add", "padded", width=4) == "0239+0821=01060"
    assert format_problem(239, 821, "add", "padded-reversed", width=10) == "0000000239+0000000821=06010000000"
    assert format_problem(239, 821, "add", "spaced") == "2 3 9 + 8 2 1 = 1 0 6 0"
    assert format_problem(12, 34, "mul", "scratchpad") == "12*34=12*4=48:48;12*3=360:408;>408"
    assert format_problem(239, 821, "add", "scratchpad") == "239+821=932+128,0:;32+28,1:0;2+8,0:60;+,1:060;>1060"


def test_padded_operators_sit_at_fixed_positions():
    rng = random.Random(0)
    lines = [format_problem(rng.randrange(1000), rng.randrange(1000), "mul", "padded", width=3) for _ in range(50)]
    assert {(line.index("*"), line.index("="), len(line)) for line in lines} == {(3, 7, 14)}


def test_random_space_moves_positions_but_keeps_content():
    rng = random.Random(1)
    lines = {format_problem(123, 456, "add", "random-space", rng=rng) for _ in range(30)}
    assert len({line.index("=") for line in lines}) > 3
    assert {line.replace(" ", "") for line in lines} == {"123+456=579"}
    assert format_problem(123, 456, "add", "random-space") == format_problem(123, 456, "add", "random-space")


def test_answers_are_computed_not_looked_up():
    rng = random.Random(2)
    for _ in range(200):
        a, b = rng.randrange(10**30), rng.randrange(10**30)
        assert parse_answer(format_problem(a, b, "mul", "reversed"), "reversed") == a * b


@pytest.mark.parametrize("text, fmt", [
    ("12+34=", "plain"), ("12+34=5a", "plain"), ("12+34=4 6", "plain"), ("", "reversed"),
    ("12+34=46", "scratchpad"), ("=>", "scratchpad"), ("- 4", "spaced"), ("12+34=4.6", "padded"),
])
def test_malformed_answers_parse_to_none(text, fmt):
    assert parse_answer(text, fmt) is None


def test_bad_input_raises_clear_errors():
    with pytest.raises(ConfigError, match="unknown arithmetic format 'bogus'.*reversed"):
        format_problem(1, 2, "add", "bogus")
    with pytest.raises(ConfigError, match="unknown arithmetic format"):
        parse_answer("1+2=3", "bogus")
    with pytest.raises(ConfigError, match="unknown arithmetic task 'div'"):
        format_problem(1, 2, "div", "plain")
    with pytest.raises(ConfigError, match=">= 1"):
        ArithTask("add", "plain", 0)
    with pytest.raises(ConfigError, match="non-negative"):
        format_problem(-1, 2, "add", "plain")
    for a in (True, 1.5, "12"):  # bool is an int to Python, and 1.5 + 5 once formatted as "1.5+5=6.5"
        with pytest.raises(ConfigError, match="operands must be integers"):
            format_problem(a, 5, "add", "plain")
    assert format_problem(np.int64(12), 5, "add", "plain") == "12+5=17"
    with pytest.raises(DataError, match="not in the arithmetic vocabulary"):
        CharTokenizer().encode("1/2")


def test_digit_accuracy_aligns_units_and_penalises_errors():
    assert digit_accuracy(1060, 1060) == 1.0
    assert digit_accuracy(1069, 1060) == 0.75
    assert digit_accuracy(60, 1060) == 0.5
    assert digit_accuracy(11060, 1060) == 0.8
    assert digit_accuracy(None, 1060) == 0.0


def test_sampling_is_balanced_over_lengths_and_carries():
    rng = random.Random(3)
    pairs = [sample_operands(rng, "add", range(1, 4)) for _ in range(6000)]
    longest = Counter(max(len(str(a)), len(str(b))) for a, b in pairs)
    assert all(abs(longest[n] / 6000 - 1 / 3) < 0.03 for n in (1, 2, 3))
    three = [sample_of_length(rng, "add", 3) for _ in range(4000)]
    assert all(len(str(a)) == len(str(b)) == 3 for a, b in three)
    carries = Counter(_carries(a, b) for a, b in three)
    assert all(abs(carries[k] / 4000 - 1 / 4) < 0.03 for k in range(4))


def test_test_set_is_held_out_from_training():
    test_set = make_test_set("add", [1, 2, 3], 200, seed=5)
    assert len(test_set[1]) == 100 and len(test_set[3]) == 200
    held = held_out_problems(test_set)
    assert set(test_set[3]) <= held and not set(test_set[1]) & held  # 1-digit space is too small to hold out
    task = ArithTask("add", "reversed", 3, held_out=held)
    rng = random.Random(6)
    assert not {task.sample(rng) for _ in range(20000)} & held


def test_char_tokenizer_save_load(tmp_path):
    tok = CharTokenizer()
    tok.save(tmp_path)
    again = CharTokenizer.load(tmp_path)
    assert again.encode("12+3=15") == tok.encode("12+3=15") and again.vocab_size == tok.vocab_size
    with pytest.raises(CheckpointError, match="character tokenizer"):
        CharTokenizer.load(tmp_path / "missing")
