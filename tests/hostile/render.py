"""Run every hostile-input case and write the table of docs/reliability.md (what was tried -> outcome).

    python tests/hostile/render.py docs/reliability.md
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostile import build_fixtures, check, run_case
from hostile.cases import all_cases

HEADER = """# Reliability: hostile inputs

Every value a user or a client can send is normal input. Each row below is one case of `tests/hostile/`
(run by `tests/test_hostile.py` in the test suite); this page is written by
`python tests/hostile/render.py docs/reliability.md` from a real run of every case. "ok" means the
outcome is the one the case expects: a one-line `error: ...` with exit code 2, or a correct result.

| case | input | command | outcome |
|---|---|---|---|
"""


def main(out: str) -> int:
    cases = all_cases()
    rows, bad = [], 0
    with tempfile.TemporaryDirectory() as root:
        fixtures = build_fixtures(Path(root) / "fixtures")
        for i, case in enumerate(cases):
            tmp = Path(root) / f"case{i}"
            tmp.mkdir()
            outcome = run_case(case, tmp, fixtures)
            problem = check(case, outcome)
            bad += problem is not None
            result = ("ok: " if problem is None else "WRONG: ") + (outcome.line if case.expect else "exit 0")
            command = "mulfree " + " ".join(case.argv)
            rows.append(f"| {case.id} | {case.what} | `{command}` | {result.replace('|', '/')} |")
    summary = f"\n{len(cases)} cases, {len(cases) - bad} as expected.\n"
    Path(out).write_text(HEADER + "\n".join(rows) + "\n" + summary)
    print(summary.strip())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
