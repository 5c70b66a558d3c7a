"""All hostile-input cases: the `CASES` lists of every `cases_<area>.py` module in this folder."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from hostile import Case


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if info.name.startswith("cases_"):
            cases += importlib.import_module(f"hostile.{info.name}").CASES
    ids = [c.id for c in cases]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicated, f"duplicate case ids: {duplicated}"
    return cases
