"""Hostile-input table: every case runs one `mulfree` command line in-process against files it may first
corrupt, and must end in the expected way, one line on stderr and no traceback:
- `expect="..."`: exit code 2 and one `error: ...` line containing the text;
- `expect=None`: success (exit code 0), e.g. a NaN that is now a clear value or an input that is valid.

Cases live in `tests/hostile/cases_<area>.py` as a list `CASES`; `tests/test_hostile.py` runs them all, and
`python tests/hostile/render.py docs/reliability.md` writes the table of what was tried and what happened.

A case's argv may name `{tmp}` (a fresh directory for this case) and the shared fixtures `{model}` (a tiny
trained MMfree model dir with tokenizer), `{run}` (its training run dir, with checkpoints and metrics),
`{packed}` (its packed dir) and `{data}` (a small text folder); the fixtures are copied into `{tmp}` first
when `copy=("model", ...)` names them, so a case may corrupt its copy freely. `setup(tmp: Path)` may
then write or damage files in `{tmp}`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FIXTURES = ("model", "run", "packed", "data")


@dataclass(frozen=True)
class Case:
    """One hostile input: `what` is the table's description, `argv` the command line after `mulfree`."""

    id: str
    what: str
    argv: tuple[str, ...]
    expect: str | None
    copy: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None
    exit_code: int = field(default=2)


@dataclass
class Outcome:
    exit_code: int
    stderr: list[str]
    stdout: str

    @property
    def line(self) -> str:
        """The last stderr line (the error, where there is one)."""
        return self.stderr[-1] if self.stderr else ""


def build_fixtures(root: Path) -> dict[str, Path]:
    """The shared tiny model, run, packed dir and text folder (about 10 s on 2 cores)."""
    from mulfree.cli import main

    data = root / "data"
    data.mkdir()
    for k in range(3):
        (data / f"play{k}.txt").write_text(f"PLAY {k}\n" + "ROMEO. But soft, what light?\nJULIET. Ay me.\n" * 30)
    cfg = root / "cfg.json"
    cfg.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 300,
                               "max_position_embeddings": 64, "train": {"eval_batches": 1, "warmup": 1}}))
    run = root / "run"
    assert main(["train", "--config", str(cfg), "--data", str(data), "--out", str(run), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--save-every", "1", "--no-progress"]) == 0
    model = root / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(run / name, model / name)
    packed = root / "packed"
    assert main(["pack", "--model", str(model), "--out", str(packed)]) == 0
    return {"model": model, "run": run, "packed": packed, "data": data}


def run_case(case: Case, tmp: Path, fixtures: dict[str, Path]) -> Outcome:
    """Copy the named fixtures into tmp, run the case's setup and command, and capture what it printed."""
    from mulfree.cli import main

    for name in case.copy:
        src = fixtures[name]
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp / name)
    if case.setup is not None:
        case.setup(tmp)
    paths = {name: str(tmp / name) if name in case.copy else str(fixtures[name]) for name in FIXTURES}
    argv = [a.format(tmp=tmp, **paths) for a in case.argv]
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return Outcome(int(code or 0), [x for x in err.getvalue().splitlines() if x.strip()], out.getvalue())


def check(case: Case, outcome: Outcome) -> str | None:
    """Why the outcome is wrong for the case, or None when it is right."""
    text = "\n".join(outcome.stderr)
    if "Traceback" in text:
        return f"traceback:\n{text}"
    if case.expect is None:
        return None if outcome.exit_code == 0 else f"exit code {outcome.exit_code}, expected 0: {outcome.line}"
    if outcome.exit_code != case.exit_code:
        return f"exit code {outcome.exit_code}, expected {case.exit_code}: {outcome.line}"
    errors = [x for x in outcome.stderr if x.startswith("error: ")]
    if len(errors) != 1:
        return f"expected one 'error: ' line, got: {outcome.stderr}"
    if case.expect.lower() not in errors[0].lower():
        return f"error line {errors[0]!r} lacks {case.expect!r}"
    return None
