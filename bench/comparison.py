"""Before and after, the pure part: run order, medians, ratios, verdicts, the report section.

compare.py runs the scenarios; this module only decides.  It imports nothing from bench/
so that tests/test_bench_compare.py can load it on its own.

* ``abba_order(rounds)``: which broker goes first in each round.  Base and head swap places
  every round (base, head / head, base / ...), so a machine that drifts (gets busier or
  quieter) during the run favours neither: with an even number of rounds each side goes
  first equally often.
* ``judge(base_values, head_values, higher_is_better)``: the medians, head / base, and
  whether head is within TOLERANCE of base.  Only a regression counts: a throughput that
  rose by 30% or a latency that fell by 30% is "within".
* ``replace_section(text, heading, body)``: one ``## `` section of a Markdown file swapped
  for a new one, every other section left as it was.
"""
import statistics
from typing import NamedTuple

SIDES = ("base", "head")
TOLERANCE = 0.10            # head may be this much worse than base (issues 11 and 15: 10%)


def abba_order(rounds):
    """The order of the two sides in each of ``rounds`` rounds: base first in even rounds
    (0, 2, ...), head first in odd ones."""
    return [SIDES if index % 2 == 0 else SIDES[::-1] for index in range(rounds)]


class Verdict(NamedTuple):
    """One figure, both sides: medians, spreads, head / base, and the verdict."""

    base: list                  # the base runs' values
    head: list                  # the head runs' values
    base_median: float          # None if no base run succeeded
    head_median: float
    ratio: float                # head median / base median; None if either is missing or base is 0
    within: bool                # None: not judged (a side has no runs, or base is 0)
    higher_is_better: bool

    def change(self):
        """The change as a signed percentage of base, better or worse: "+4.2% (better)"."""
        if self.ratio is None:
            return "–"
        delta = self.ratio - 1.0
        better = delta > 0 if self.higher_is_better else delta < 0
        return f"{100 * delta:+.1f}% ({'better' if better else 'worse'})" if delta else "±0%"


def judge(base_values, head_values, higher_is_better, tolerance=TOLERANCE):
    """Compare the runs of one figure.  ``higher_is_better`` says which way is a regression:
    head is within ``tolerance`` unless it is lower than base by more than ``tolerance``
    of base (higher is better), or higher by more than that (lower is better)."""
    base_median = statistics.median(base_values) if base_values else None
    head_median = statistics.median(head_values) if head_values else None
    ratio = within = None
    if base_median and head_median is not None:
        ratio = head_median / base_median
        if base_median > 0:
            within = (ratio >= 1.0 - tolerance if higher_is_better
                      else ratio <= 1.0 + tolerance)
        else:
            ratio = None
    return Verdict(list(base_values), list(head_values), base_median, head_median, ratio,
                   within, higher_is_better)


def verdict_cell(verdict, tolerance=TOLERANCE):
    if verdict.within is None:
        return "– (not judged)"
    percent = f"{100 * tolerance:.0f}%"
    return "yes" if verdict.within else f"**NO**: worse by more than {percent}"


def replace_section(text, heading, body):
    """``text`` with the section that starts at the line ``heading`` (up to the next heading
    of the same or a higher level, or the end) replaced by ``heading``, a blank line and
    ``body``.  A file without that section gets it appended at the end.  Nothing else in
    ``text`` changes."""
    level = len(heading) - len(heading.lstrip("#"))
    section = f"{heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    headings = _headings(lines)
    start = next((i for i in headings if lines[i].rstrip("\n") == heading), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section if text.strip() else section
    end = next((i for i in headings if i > start and _level(lines[i]) <= level), len(lines))
    after = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + after if after else "")


def _headings(lines):
    """The indexes of the heading lines (``#`` to ``######`` and a space), fenced code blocks
    excepted: a ``# comment`` in a shell example is not a heading."""
    found, fenced = [], False
    for index, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and _level(line):
            found.append(index)
    return found


def _level(line):
    """The heading level of ``line`` (1 for ``# ``), or 0 if it is no heading."""
    hashes = len(line) - len(line.lstrip("#"))
    return hashes if 0 < hashes <= 6 and line[hashes:hashes + 1] == " " else 0
