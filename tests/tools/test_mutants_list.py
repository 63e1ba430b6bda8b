"""The mutation check's list (tools/dev/mutants.yaml) cannot rot: every mutant's snippet is
still in its file exactly once, changes it, and names guarding tests that exist."""

from __future__ import annotations

import pytest

from tools.dev.mutants import ROOT, load_mutants, occurrences

MUTANTS = load_mutants()


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_snippet_is_in_its_file_once(mutant):
    assert occurrences(mutant) == 1, f"{mutant.file}: update the snippet of {mutant.name!r}"
    assert mutant.replacement != mutant.original
    for test in mutant.tests:
        assert (ROOT / test.split("::")[0]).is_file(), test
