"""Crash-safe bad-input table: every public op and module given wrong or edge input
(tests/bad_input_cases.py) must raise an error naming the argument, or return the reference's
result. The cases run in a worker subprocess (tests/subproc.py): a case that kills its process
(SIGFPE, abort, segfault) or hangs fails on its own, and the rest of the table still runs.
"""

from __future__ import annotations

import pytest
from bad_input_cases import CASES
from subproc import check, run_cases

MODULE = "bad_input_cases"
TIMEOUT_S = 120  # per case: a hang is a failure, not a stuck CI


@pytest.fixture(scope="module")
def outcomes():
    return run_cases(MODULE, list(CASES), timeout=TIMEOUT_S)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, outcomes):
    check(CASES[name], outcomes[name])
