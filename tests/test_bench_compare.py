"""bench/compare.py's decisions, without running a benchmark (no timed assertion here).

The pure part, bench/comparison.py, is loaded on its own: the run order, the medians, ratios
and direction-aware verdicts, and the Markdown section it rewrites.  The parts that start
processes from another source tree (bench/ciphermq_broker.py) and ``make bench``'s
carry-over of the section (bench/markdown.py) import bench/'s other modules by bare name,
and tests/ has modules of the same names, so those run in a subprocess with bench/ on its
path.
"""
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
_spec = importlib.util.spec_from_file_location("ciphermq_bench_comparison",
                                               BENCH / "comparison.py")
comparison = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comparison)


def _in_bench(code, tmp_path):
    """Run ``code`` in a fresh interpreter with bench/ first on its path; its stdout."""
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(BENCH)!r})\n"
                           + textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_abba_order_swaps_the_first_side_every_round():
    """Each round runs both sides once, and the side that goes first alternates (ABBA), so
    over an even number of rounds each side goes first equally often."""
    order = comparison.abba_order(4)
    assert order == [("base", "head"), ("head", "base"), ("base", "head"), ("head", "base")]
    for rounds in (2, 6, 10):
        firsts = [first for first, _ in comparison.abba_order(rounds)]
        assert firsts.count("base") == firsts.count("head") == rounds // 2
    assert comparison.abba_order(1) == [("base", "head")]


def test_judge_uses_medians_not_means():
    """A figure's verdict rests on the median of each side's runs, so one outlier run (the
    +-30% of a shared 2-core VM) does not decide it."""
    verdict = comparison.judge([100, 101, 10], [100, 99, 500], higher_is_better=True)
    assert (verdict.base_median, verdict.head_median) == (100, 100)
    assert verdict.ratio == 1.0 and verdict.within is True


def test_judge_counts_only_a_throughput_drop_as_a_regression():
    """For a higher-is-better figure head fails only when it is more than 10% below base;
    any rise passes."""
    base = [1000, 1000, 1000]
    assert comparison.judge(base, [901, 901], True).within is True
    assert comparison.judge(base, [899, 899], True).within is False
    assert comparison.judge(base, [1500], True).within is True
    assert comparison.judge(base, [899], True).ratio == 0.899


def test_judge_counts_only_a_latency_rise_as_a_regression():
    """For a lower-is-better figure (latency, RSS) head fails only when it is more than 10%
    above base; any fall passes."""
    base = [2.0, 2.0]
    assert comparison.judge(base, [2.19], False).within is True
    assert comparison.judge(base, [2.21], False).within is False
    assert comparison.judge(base, [0.5], False).within is True
    verdict = comparison.judge(base, [2.5], False)
    assert verdict.change() == "+25.0% (worse)"
    assert comparison.judge(base, [1.5], False).change() == "-25.0% (better)"
    assert comparison.judge([100], [125], True).change() == "+25.0% (better)"


def test_judge_leaves_a_figure_without_runs_unjudged():
    """A side whose runs all failed (or a base of 0) gives no ratio and no verdict, never a
    pass."""
    for base, head in (([], [5.0]), ([5.0], []), ([0.0], [1.0])):
        verdict = comparison.judge(base, head, True)
        assert verdict.ratio is None and verdict.within is None
        assert comparison.verdict_cell(verdict).startswith("–")


DOC = """\
# Benchmarks

## Results

old table

## Profile and gaps

written by people

```sh
# a comment, not a heading
make bench
```

### A subsection

more
"""


def test_replace_section_appends_then_replaces_only_its_own_section():
    """The report section is appended when missing and later replaced in place; every other
    section, subsections and fenced ``# comments`` included, is left byte for byte."""
    heading = "## Before and after (issue 11)"
    first = comparison.replace_section(DOC, heading, "figures 1")
    assert first.startswith(DOC.rstrip("\n") + "\n\n" + heading + "\n\nfigures 1\n")
    assert comparison.replace_section(first, heading, "figures 1") == first
    second = comparison.replace_section(first, heading, "figures 2\n\n### its own subsection")
    assert second == first.replace("figures 1", "figures 2\n\n### its own subsection")
    third = comparison.replace_section(second + "\n## Later\n\nkept\n", heading, "figures 3")
    assert third == first.replace("figures 1", "figures 3") + "\n## Later\n\nkept\n"
    middle = comparison.replace_section(DOC, "## Results", "new table")
    assert middle == DOC.replace("old table", "new table")
    assert comparison.replace_section("", heading, "x") == heading + "\n\nx\n"


def test_make_bench_carries_the_compare_section_over(tmp_path):
    """``make bench`` (bench/markdown.py) keeps the "Before and after (issue 11)" section
    that bench/compare.py appends after "Profile and gaps"."""
    report = tmp_path / "BENCHMARKS.md"
    report.write_text(comparison.replace_section(DOC, "## Before and after (issue 11)",
                                                 "the figures"))
    kept = _in_bench(f"""
        import markdown
        print(markdown._previous_profile({str(report)!r}), end="")
        """, tmp_path)
    assert kept.startswith("## Profile and gaps\n")
    assert kept.endswith("## Before and after (issue 11)\n\nthe figures\n")


def test_broker_source_starts_brokers_from_the_other_tree(tmp_path):
    """Inside broker_source(tree), a process started with source_environment(tree) imports
    ``ciphermq`` from that tree, not from this checkout's editable install; and an option
    the tree's broker lacks stops running_broker before anything starts."""
    other = tmp_path / "other"
    (other / "ciphermq").mkdir(parents=True)
    (other / "ciphermq" / "__init__.py").write_text("")
    out = _in_bench(f"""
        import subprocess, sys
        import ciphermq_broker as b
        cwd, env = b.source_environment({str(other)!r})
        print(subprocess.run([sys.executable, "-c", "import ciphermq; print(ciphermq.__file__)"],
                             cwd=cwd, env=env, capture_output=True, text=True).stdout, end="")
        with b.broker_source({str(other)!r}, {{"--log-level", "--port"}}):
            try:
                with b.running_broker("--data-dir", "x"):
                    print("started")
            except b.UnknownBrokerOption as exc:
                print("refused:", exc)
        print("after:", b._source["tree"] == b.REPO, b._source["options"])
        """, tmp_path)
    imported, refused, after = out.splitlines()
    assert imported == str(other / "ciphermq" / "__init__.py")
    assert refused == f"refused: the broker at {other} has no option --data-dir"
    assert after == "after: True None"
