"""Arithmetic task data: addition / multiplication lines in every positional format, their parsers,
balanced sampling over digit lengths and carries, and length-held-out test sets.

Formats (`FORMATS`; see docs/arithmetic.md for the papers they come from), for 239 + 821:

    plain            239+821=1060
    reversed         239+821=0601                answer least-significant digit first (Lee et al.)
    padded           239+821=1060 at width 3;    operands zero-padded to `width`, answer to width+1
                     0239+0821=01060 at width 4  (add) or 2*width (mul): fixed operator positions
    padded-reversed  0239+0821=06010             padded, answer LSD first (the 456-parameter recipe)
    spaced           2 3 9 + 8 2 1 = 1 0 6 0     one space between all characters
    random-space     2 3  9+ 8  2 1=1060         0-3 random spaces between prompt characters (Shen et al.);
                                                 the answer is plain so that it stays predictable
    scratchpad       239+821=932+128,0:;32+28,1:0;2+8,0:60;+,1:060;>1060
                     recursive: each step shows the remaining operand digits LSD first, the carry in
                     and the partial result; multiplication peels one digit of b per step:
                     12*34=12*4=48:48;12*3=360:408;>408
    interleaved      +=910 326 280 001           digit-free prompt (the operation), then one group per place,
                                                 least significant first: a_k b_k c_k (operands zero-padded
                                                 to the answer width, so the last group of an addition is
                                                 0 0 carry). a_k, b_k are given, c_k is the model's output:
                                                 a left-to-right recurrence needs only what streamed past
    index-hint       c2b3a9+c8b2a1=a0b6c0d1      each digit tagged with the letter of its place (units a,
                                                 tens b, ...; Zhou et al. 2023's index hints), answer LSD
                                                 first; with an rng the letters start at a random offset
                                                 (cyclic over a-z) so that every letter is seen in training
    scratchpad-digits 239+821=932+128:0601       reversed, aligned operand copies, then the sum LSD first;
                     239*821=932;1:9320;2:08740=91050;8:002191=912691
                     multiplication: a reversed, then per digit b_j of b (LSD first) `b_j:P_j` with P_j the
                     shifted partial product a*b_j*10^j LSD first at width len(a)+1+j, and from the second
                     step on `=S_j`, the running sum at the same width; the answer is the last field
    columns          *=000,9190900 000,9281810,3130120 ...   (239*821; the long-multiplication columns)
                     digit-free prompt, then one group per place n of the result, least significant first:
                     the carry in (the previous group's total // 10) as a w-digit accumulator, then for every
                     digit pair that lands in the place (a_i b_j with i + j = n; addition: a_n b_n) `,` a_i
                     b_j given, their product (sum) as 2 digits and the running total as w digits, all
                     LSD first (w = 3 for multiplication up to 11-digit operands, 2 for addition). The
                     result's digit n is the units digit of the group's last total: every produced digit
                     is a one-digit product or a one-digit add with carry of characters a fixed distance back

Every line is `prompt + answer`; the prompt ends at the first '='. Answers are always computed.
`output_mask` says which characters a model produces: the whole answer (and the end of line) in every
format but `interleaved` and `columns`, whose operand digits, separators and end are given: `interleaved`
produces only the c_k, `columns` the carries, products and totals.
"""

from __future__ import annotations

import numbers
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mulfree.errors import ConfigError

FORMATS = ("plain", "reversed", "padded", "padded-reversed", "spaced", "random-space", "scratchpad",
           "interleaved", "index-hint", "scratchpad-digits", "columns")  # append only: saved runs name their format
OPS = {"add": "+", "mul": "*"}
MAX_RANDOM_SPACES = 3
HINT_LETTERS = "abcdefghijklmnopqrstuvwxyz"  # index-hint place tags, cyclic beyond 26 places
GIVEN_IN_ANSWER = ("interleaved", "columns")  # formats whose answer holds given characters besides the model's output
_DIGITS = re.compile(r"[0-9]+")
_HINTED = re.compile(r"(?:[a-z][0-9])+")
_SCRATCH_DIGITS = {  # the whole line (prompt optional, so a completion parses too); the answer is the last field
    "add": re.compile(r"(?:[0-9]+\+[0-9]+=)?[0-9]+\+[0-9]+:[0-9]+"),
    "mul": re.compile(r"(?:[0-9]+\*[0-9]+=)?[0-9]+(?:;[0-9]:[0-9]+)(?:;[0-9]:[0-9]+=[0-9]+)*"),
}


def check_format(fmt: str) -> str:
    """Return fmt if it is a known format, else raise ConfigError naming the choices."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown arithmetic format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    return fmt


def check_op(op: str) -> str:
    """Return op if it is `add` or `mul`, else raise ConfigError."""
    if op not in OPS:
        raise ConfigError(f"unknown arithmetic task {op!r}", f"choose one of {', '.join(OPS)}")
    return op


def check_digits(n: int) -> int:
    """Return n if it is a usable operand length (>= 1), else raise ConfigError."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"operand length must be an integer >= 1, got {n!r}", "pass --digits 1 or more")
    return n


def format_chars(fmt: str) -> str:
    """Characters a format needs beyond `mulfree.data.chartok.ARITH_CHARS` (the index-hint letters)."""
    return HINT_LETTERS if check_format(fmt) == "index-hint" else ""


def compute(a: int, b: int, op: str) -> int:
    """The exact result of `a op b`."""
    return a + b if check_op(op) == "add" else a * b


def answer_width(width: int, op: str) -> int:
    """Width of the zero-padded answer for operands padded to `width` (the largest result fits)."""
    return width + 1 if op == "add" else 2 * width


def _scratchpad(a: int, b: int, op: str) -> str:
    if op == "mul":
        steps, acc = [], 0
        for i, d in enumerate(reversed(str(b))):
            part = a * int(d) * 10**i
            acc += part
            steps.append(f"{a}*{d}={part}:{acc};")
        return "".join(steps) + f">{acc}"
    ra, rb = str(a)[::-1], str(b)[::-1]
    steps, carry, partial = [], 0, ""
    while ra or rb:
        steps.append(f"{ra}+{rb},{carry}:{partial};")
        s = int(ra[:1] or 0) + int(rb[:1] or 0) + carry
        partial, carry = str(s % 10) + partial, s // 10
        ra, rb = ra[1:], rb[1:]
    steps.append(f"+,{carry}:{partial};")
    return "".join(steps) + f">{a + b}"


def _reversed(value: int, width: int) -> str:
    """The digits of a non-negative `value`, zero-padded to `width`, least significant first."""
    return str(value).zfill(width)[::-1]


def _interleaved(a: int, b: int, op: str, width: int | None) -> str:
    n = answer_width(max(width or 0, len(str(a)), len(str(b))), op)
    da, db, dc = (_reversed(v, n) for v in (a, b, compute(a, b, op)))
    return f"{OPS[op]}=" + " ".join(x + y + z for x, y, z in zip(da, db, dc))


def _hinted(number: int, offset: int, lsd_first: bool = False) -> str:
    """Digits of `number`, each after the letter of its place (units = HINT_LETTERS[offset], tens next, ...)."""
    places = list(enumerate(reversed(str(number))))
    if not lsd_first:
        places.reverse()
    return "".join(HINT_LETTERS[(offset + k) % len(HINT_LETTERS)] + d for k, d in places)


def _scratchpad_digits(a: int, b: int, op: str) -> str:
    if op == "add":
        w = max(len(str(a)), len(str(b)))
        return f"{_reversed(a, w)}+{_reversed(b, w)}:{_reversed(a + b, w + 1)}"
    ra = str(a)[::-1]
    steps, acc = [ra], 0
    for j, d in enumerate(reversed(str(b))):
        part = a * int(d) * 10**j
        acc += part
        width = len(ra) + 1 + j
        step = f"{d}:{_reversed(part, width)}"
        steps.append(step if j == 0 else f"{step}={_reversed(acc, width)}")
    return ";".join(steps)


def _column_width(op: str, la: int, lb: int) -> int:
    """Digits of a `columns` accumulator: the largest column total (carry in plus the place's pair
    results, below 90 * min(la, lb) for multiplication, 19 for addition) fits."""
    return 2 if op == "add" else max(3, len(str(90 * min(la, lb))))


def _columns(a: int, b: int, op: str) -> str:
    ra, rb = str(a)[::-1], str(b)[::-1]
    if op == "add":
        n = max(len(ra), len(rb))
        ra, rb = _reversed(a, n), _reversed(b, n)
        places = [[(k, k)] for k in range(n)] + [[]]
    else:
        places = [[(i, n - i) for i in range(len(ra)) if 0 <= n - i < len(rb)] for n in range(len(ra) + len(rb))]
    w = _column_width(op, len(ra), len(rb))
    groups, carry = [], 0
    for pairs in places:
        total = carry
        group = _reversed(total, w)
        for i, j in pairs:
            x, y = int(ra[i]), int(rb[j])
            part = x + y if op == "add" else x * y
            total += part
            group += f",{x}{y}{_reversed(part, 2)}{_reversed(total, w)}"
        groups.append(group)
        carry = total // 10
    return " ".join(groups)


def format_problem(
    a: int, b: int, op: str, fmt: str, rng: random.Random | None = None, width: int | None = None
) -> str:
    """The whole training line (prompt and answer) for `a op b` in format `fmt`.

    Args:
        a, b: non-negative operands.
        op: `add` or `mul`.
        fmt: one of FORMATS.
        rng: randomness for `random-space` (None: a generator seeded by (a, b), so the line is
            reproducible) and for `index-hint`'s first letter (None: `a` at the units).
        width: padding width for the padded formats and `interleaved`; defaults to the longer operand
            and never truncates (an operand longer than width widens the line).
    Example: format_problem(239, 821, "add", "reversed") == "239+821=0601"
    """
    check_op(op)
    check_format(fmt)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (a, b)):
        raise ConfigError(f"operands must be integers, got {a!r} and {b!r}", "pass natural numbers")
    a, b = int(a), int(b)
    if a < 0 or b < 0:
        raise ConfigError(f"operands must be non-negative, got {a} and {b}", "pass natural numbers")
    c, sym = compute(a, b, op), OPS[op]
    if fmt in ("plain", "reversed"):
        ans = str(c)
        return f"{a}{sym}{b}=" + (ans[::-1] if fmt == "reversed" else ans)
    if fmt in ("padded", "padded-reversed"):
        w = max(width or 0, len(str(a)), len(str(b)))
        ans = f"{c:0{answer_width(w, op)}d}"
        return f"{a:0{w}d}{sym}{b:0{w}d}=" + (ans[::-1] if fmt == "padded-reversed" else ans)
    if fmt == "spaced":
        return " ".join(f"{a}{sym}{b}={c}")
    if fmt == "random-space":
        rng = rng if rng is not None else random.Random(a * 1_000_003 + b)
        chars = f"{a}{sym}{b}="
        out = chars[0]
        for ch in chars[1:]:
            out += " " * rng.randint(0, MAX_RANDOM_SPACES) + ch
        return out + str(c)
    if fmt == "interleaved":
        return _interleaved(a, b, op, width)
    if fmt == "index-hint":
        offset = rng.randrange(len(HINT_LETTERS)) if rng is not None else 0
        return f"{_hinted(a, offset)}{sym}{_hinted(b, offset)}=" + _hinted(c, offset, lsd_first=True)
    if fmt == "scratchpad-digits":
        return f"{a}{sym}{b}=" + _scratchpad_digits(a, b, op)
    if fmt == "columns":
        return f"{sym}=" + _columns(a, b, op)
    return f"{a}{sym}{b}=" + _scratchpad(a, b, op)


def split_line(line: str) -> tuple[str, str]:
    """Split a line into (prompt ending with the first '=', answer text)."""
    i = line.find("=")
    if i < 0:
        raise ConfigError(f"not an arithmetic line: {line!r}", "a line holds a prompt ending in '='")
    return line[: i + 1], line[i + 1 :]


def output_mask(line: str, fmt: str) -> list[bool]:
    """One flag per character of `line` and a last one for the end of the line (eos): True where a
    model produces the character (it bears the loss and is generated at evaluation), False where it
    is given (the prompt; in `interleaved` also the operand digits and spaces of the answer, and the
    end, whose place the given operands fix).

    Example: output_mask("+=910 001", "interleaved") is True only at the 0 after `91` and the 1 after `00`.
    """
    prompt, answer = split_line(line)
    if check_format(fmt) == "interleaved":
        produced = [j % 4 == 2 for j in range(len(answer))] + [False]
    elif fmt == "columns":
        given = {j + k for j, ch in enumerate(answer) if ch == "," for k in (0, 1, 2)}
        produced = [ch.isdigit() and j not in given for j, ch in enumerate(answer)] + [False]
    else:
        produced = [True] * (len(answer) + 1)
    return [False] * len(prompt) + produced


def parse_answer(text: str, fmt: str) -> int | None:
    """Read the answer from a whole line or from a model's completion; None when malformed.

    The answer ends at the first newline. Spaces inside the answer are allowed only in the spaced
    formats; the scratchpad answer is what follows the last '>'. Raises ConfigError for an unknown
    format. Example: parse_answer("239+821=0601", "reversed") == 1060
    """
    check_format(fmt)
    if not isinstance(text, str):
        return None
    body = text.split("\n", 1)[0]
    if fmt in ("interleaved", "index-hint", "scratchpad-digits", "columns"):
        return _parse_digit_format(body.strip(), fmt)
    if fmt == "scratchpad":
        if ">" not in body:
            return None
        body = body.rsplit(">", 1)[1]
    elif "=" in body:
        body = body.split("=", 1)[1]
    body = body.strip()
    if fmt in ("spaced", "random-space"):
        body = body.replace(" ", "")
    if not _DIGITS.fullmatch(body):
        return None
    if fmt in ("reversed", "padded-reversed"):
        body = body[::-1]
    return int(body)


def _parse_digit_format(body: str, fmt: str) -> int | None:
    """The answer of an `interleaved`, `index-hint`, `scratchpad-digits` or `columns` line or completion."""
    if fmt == "interleaved":
        body = body.split("=", 1)[1] if "=" in body else body
        groups = body.split(" ")
        if not all(len(g) == 3 and _DIGITS.fullmatch(g) for g in groups):
            return None
        return int("".join(g[2] for g in reversed(groups)))
    if fmt == "index-hint":
        body = body.split("=", 1)[1] if "=" in body else body
        return int(body[1::2][::-1]) if _HINTED.fullmatch(body) else None
    if fmt == "columns":
        return _parse_columns(body.split("=", 1)[1] if "=" in body else body)
    if not any(pattern.fullmatch(body) for pattern in _SCRATCH_DIGITS.values()):
        return None
    return int(re.split(r"[=:]", body)[-1][::-1])


def _parse_columns(body: str) -> int | None:
    """The result of a `columns` answer: the units digit of each group's last total, read MSD first."""
    units = []
    for group in body.split(" "):
        fields = group.split(",")
        w = len(fields[0])
        if w < 2 or not all(_DIGITS.fullmatch(f) for f in fields) or any(len(f) != 4 + w for f in fields[1:]):
            return None
        units.append(fields[-1][-w])
    return int("".join(reversed(units)))


def digit_accuracy(pred: int | None, target: int) -> float:
    """Fraction of digit places right, aligned at the units digit, over the longer of the two numbers
    (format-independent; extra digits count wrong; a missing or malformed answer scores 0)."""
    t = str(target)[::-1]
    if pred is None:
        return 0.0
    p = str(pred)[::-1]
    right = sum(1 for i, d in enumerate(t) if i < len(p) and p[i] == d)
    return right / max(len(t), len(p))


def random_number(rng: random.Random, n: int) -> int:
    """A uniformly random number with exactly n digits (0-9 when n == 1)."""
    check_digits(n)
    return rng.randrange(0, 10) if n == 1 else rng.randrange(10 ** (n - 1), 10**n)


def _addends_with_carries(rng: random.Random, la: int, lb: int) -> tuple[int, int]:
    """Operands of lengths la, lb whose number of carries (over the shared digits) is uniform in
    0..min(la, lb), built digit by digit so every carry count is equally likely."""
    m = min(la, lb)
    want = set(rng.sample(range(m), rng.randint(0, m)))
    da, db, carry = [], [], 0
    for i in range(max(la, lb)):
        lo_a = 1 if (i == la - 1 and la > 1) else 0
        lo_b = 1 if (i == lb - 1 and lb > 1) else 0
        if i >= m:
            (da if i < la else db).append(rng.randint(lo_a if i < la else lo_b, 9))
            continue
        for x in rng.sample(range(lo_a, 10), 10 - lo_a):
            lo, hi = (max(lo_b, 10 - x - carry), 9) if i in want else (lo_b, min(9, 9 - x - carry))
            if lo <= hi:
                da.append(x)
                db.append(rng.randint(lo, hi))
                carry = int(x + db[-1] + carry >= 10)
                break
    a = int("".join(map(str, reversed(da))))
    b = int("".join(map(str, reversed(db))))
    return a, b


def sample_operands(rng: random.Random, op: str, lengths: Sequence[int]) -> tuple[int, int]:
    """A training problem balanced over operand lengths (the longer operand's length is uniform over
    `lengths`, the other is as long half the time, else shorter) and, for addition, carry counts."""
    check_op(op)
    n = rng.choice(list(lengths))
    check_digits(n)
    other = n if rng.random() < 0.5 else rng.randint(1, n)
    la, lb = (n, other) if rng.random() < 0.5 else (other, n)
    if op == "add":
        return _addends_with_carries(rng, la, lb)
    return random_number(rng, la), random_number(rng, lb)


def sample_of_length(rng: random.Random, op: str, n: int) -> tuple[int, int]:
    """A test problem whose two operands both have exactly n digits (carry-balanced for addition)."""
    check_op(op)
    check_digits(n)
    return _addends_with_carries(rng, n, n) if op == "add" else (random_number(rng, n), random_number(rng, n))


def make_test_set(op: str, lengths: Sequence[int], per_length: int, seed: int = 0) -> dict[int, list[tuple[int, int]]]:
    """Distinct test problems per operand length (fewer when the length has fewer problems)."""
    rng = random.Random(seed)
    out: dict[int, list[tuple[int, int]]] = {}
    for n in lengths:
        space = (10 if n == 1 else 9 * 10 ** (n - 1)) ** 2
        target, seen = min(per_length, space), set()
        while len(seen) < target:
            seen.add(sample_of_length(rng, op, n))
        out[n] = sorted(seen)
    return out


def held_out_problems(test_set: dict[int, list[tuple[int, int]]], max_fraction: float = 0.1) -> frozenset:
    """The test problems to exclude from training: those of every length whose test set is at most
    `max_fraction` of all problems of that length (tiny lengths such as 1 digit cannot be held out)."""
    keep = set()
    for n, problems in test_set.items():
        space = (10 if n == 1 else 9 * 10 ** (n - 1)) ** 2
        if len(problems) <= max_fraction * space:
            keep.update(problems)
    return frozenset(keep)


@dataclass
class ArithTask:
    """One training task: operation, format, training operand lengths 1..digits and the padding
    width; `held_out` problems (the test set) are never sampled for training."""

    op: str
    fmt: str
    digits: int
    width: int | None = None
    held_out: frozenset[tuple[int, int]] = frozenset()

    def __post_init__(self) -> None:
        check_op(self.op)
        check_format(self.fmt)
        check_digits(self.digits)
        if self.width is None and self.fmt.startswith("padded"):
            self.width = self.digits

    def line(self, a: int, b: int, rng: random.Random | None = None) -> str:
        """The training line for a op b in this task's format."""
        return format_problem(a, b, self.op, self.fmt, rng=rng, width=self.width)

    def sample(self, rng: random.Random) -> tuple[int, int]:
        """A training problem (balanced, never one of the held-out test problems)."""
        while True:
            ab = sample_operands(rng, self.op, range(1, self.digits + 1))
            if ab not in self.held_out:
                return ab
