"""The docs' proofs exist: every test that README.md or docs/*.md names as the one that
tries to break a claim is a test the suite runs."""
import ast
import functools
import re

from scripts import REPO

PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
#: ``test_x.py::test_y`` with or without ``tests/`` in front; a ``[param]`` is not checked here.
CITED_TEST = re.compile(r"(test_\w+\.py)::(test_\w+)")
CITED_FILE = re.compile(r"tests/(test_\w+\.py)\b")


@functools.lru_cache(maxsize=None)
def _test_functions(module):
    tree = ast.parse((REPO / "tests" / module).read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def test_every_test_the_docs_cite_exists():
    """Each ``test_x.py::test_y`` and ``tests/test_x.py`` in README.md and docs/ names a real
    test file and function: a renamed or deleted test cannot leave a claim pointing at
    nothing."""
    missing, cited = [], 0
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for module, name in CITED_TEST.findall(text):
            cited += 1
            if not (REPO / "tests" / module).exists() or name not in _test_functions(module):
                missing.append("%s: %s::%s" % (page.name, module, name))
        for module in CITED_FILE.findall(text):
            if not (REPO / "tests" / module).exists():
                missing.append("%s: tests/%s" % (page.name, module))
    assert cited > 100, "the pattern no longer finds the docs' citations"
    assert missing == []
