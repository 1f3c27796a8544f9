"""`make mutants` stays in step with the code: each planted bug still has its place and its test.

Running the mutants takes a minute (``make mutants``, CI); this quick check runs with every
``make test`` so that code which moves under a mutant is noticed at once.
"""
import re

import pytest
from mutants import MUTANTS, REPO


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_still_finds_its_snippet_and_its_tests(mutant):
    """Every snippet a mutant replaces occurs exactly once in its file, and every test it names
    is defined, so no mutant is stale and none is 'caught' by a test that does not exist."""
    for file, snippet, replacement in mutant.edits:
        assert snippet != replacement
        assert (REPO / file).read_text(encoding="utf-8").count(snippet) == 1, (file, snippet)
    for node in mutant.tests:
        path, name = node.split("::")
        source = (REPO / path).read_text(encoding="utf-8")
        assert re.search(r"^def %s\(" % re.escape(name), source, re.M), node


def test_there_is_a_mutant_for_each_of_the_guarantees_the_issue_named():
    """At least a dozen planted bugs, with distinct names."""
    names = [mutant.name for mutant in MUTANTS]
    assert len(names) >= 12 and len(set(names)) == len(names)
