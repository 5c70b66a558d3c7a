"""Every hostile input of tests/hostile/ ends as its case says: one `error:` line and exit code 2 (or a
correct result), never a traceback."""

from __future__ import annotations

import pytest
from hostile import build_fixtures, check, run_case
from hostile.cases import all_cases

CASES = all_cases()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return build_fixtures(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case, fixtures, tmp_path):
    problem = check(case, run_case(case, tmp_path, fixtures))
    assert problem is None, problem
