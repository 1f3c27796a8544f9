"""docs/TUTORIAL.md cannot rot: every lesson's command runs and proves its point, and every
piece of code it sends the reader to exists."""
import ast
import os
import re
import subprocess
import sys

import pytest
from scripts import REPO

TUTORIAL = (REPO / "docs" / "TUTORIAL.md").read_text(encoding="utf-8")
#: One lesson: its heading, then its fixed-form Run / You should see / Code to read lines.
LESSON = re.compile(r"^## Lesson (\d+) — (.+?)$(.*?)(?=^## |\Z)", re.M | re.S)
RUN = re.compile(r"^\*\*Run:\*\* `python (bin/lesson\.py \d+)`$", re.M)
SEE = re.compile(r"^\*\*You should see:\*\* `(.+)`$", re.M)
CODE = re.compile(r"^\*\*Code to read:\*\*(.+?)(?=\n\n|\Z)", re.M | re.S)
REFERENCE = re.compile(r"`([\w/]+\.py)` `([\w.]+)`")
#: A lesson's command must end within this (they take seconds; the bound is for a broken one).
LESSON_TIMEOUT = 120


def lessons():
    """``[(number, command, expected line pattern, [(file, name)])]`` parsed from TUTORIAL.md."""
    found = []
    for number, title, body in LESSON.findall(TUTORIAL):
        run, see, code = RUN.search(body), SEE.search(body), CODE.search(body)
        assert run and see and code, "lesson %s (%s) lacks a fixed-form line" % (number, title)
        found.append((int(number), run.group(1), see.group(1),
                      REFERENCE.findall(code.group(1))))
    return found


LESSONS = [pytest.param(*lesson, id="lesson-%d" % lesson[0]) for lesson in lessons()]


def test_the_tutorial_has_at_least_ten_lessons_numbered_in_order():
    """TUTORIAL.md holds at least 10 lessons, numbered 1..N, each running its own number."""
    numbers = [number for number, *_ in lessons()]
    assert len(numbers) >= 10 and numbers == list(range(1, len(numbers) + 1))
    assert all(command.endswith(" %d" % number) for number, command, *_ in lessons())


def test_every_lesson_in_bin_lesson_py_is_in_the_tutorial():
    """bin/lesson.py offers exactly the lessons TUTORIAL.md describes."""
    listed = subprocess.run([sys.executable, str(REPO / "bin" / "lesson.py")],
                            capture_output=True, text=True, timeout=60, check=True)
    assert len(listed.stdout.splitlines()) == len(LESSONS)


def _defined(path):
    """Top-level functions and classes, and ``Class.method`` names, that ``path`` defines."""
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {"%s.%s" % (node.name, item.name) for item in node.body
                      if isinstance(item, ast.FunctionDef)}
    return names


@pytest.mark.parametrize("number, command, see, references", LESSONS)
def test_the_code_to_read_exists(number, command, see, references):
    """Every `file` `function` a lesson tells the reader to read is defined in that file."""
    assert references, "lesson %d names no code to read" % number
    for path, name in references:
        assert (REPO / path).exists(), "lesson %d: no file %s" % (number, path)
        assert name in _defined(path), "lesson %d: %s does not define %s" % (number, path, name)


@pytest.mark.timeout(LESSON_TIMEOUT + 30)
@pytest.mark.parametrize("number, command, see, references", LESSONS)
def test_the_lesson_runs_and_proves_its_point(number, command, see, references, tmp_path):
    """The lesson's command exits 0, prints the line the tutorial promises and no failure
    line, and leaves nothing in the directory it was run from."""
    pattern = re.compile(re.escape(see).replace("…", ".+"))
    script, *args = command.split()
    done = subprocess.run([sys.executable, str(REPO / script), *args], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=LESSON_TIMEOUT,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert any(pattern.fullmatch(line) for line in done.stdout.splitlines()), output
    assert "❌ [LESSON" not in output and "Traceback" not in output, output
    assert list(tmp_path.iterdir()) == [], "the lesson wrote into the directory it ran from"
