"""Before and after: CipherMQ's scenarios against the broker of two commits, alternately.

    python bench/compare.py [--base COMMIT] [--rounds N] [--quick] [--only LIST] [--out PATH]

Issue 11 asks that `make bench` scenarios 1-8 stay within 10% of their medians at commit
5c2017c, and issue 15 that no row fall by more than 10% against a before-run in the same
session.  Single runs on two shared cores spread by +-30%, so one run of each says nothing;
this runs both brokers many times, alternately, in one session.

* The base broker runs from a temporary git worktree of ``--base`` (default 5c2017c) made
  outside the repository and removed at the end, also on an error, Ctrl-C or SIGTERM.  The
  head broker runs from this checkout as it is (uncommitted changes included).
* Everything else is this checkout's bench/: the same scenario functions and clients drive
  both brokers (ciphermq_broker.broker_source picks the tree a broker starts from), so the
  only difference between the two sides is the broker's code.
* Each round runs every scenario once per side, back to back; the side that goes first
  alternates round by round (base, head / head, base / ...: comparison.abba_order), so
  drift in the machine's load favours neither.
* The harness's broker options must exist in both trees: both ``--help`` outputs are read
  first and any option the harness asks a broker for that it lacks stops the run
  (UnknownBrokerOption).  Options one side has and the other lacks are listed; both brokers
  otherwise run with their own defaults.

Prints, per figure, both medians with their spread, head / base, and whether head is within
10% of base (only a regression counts); the load average at the start and end, the commits,
the rounds and the time taken.  With ``--out`` it also writes that as the section "## Before
and after (issue 11)" of a Markdown file (docs/BENCHMARKS.md), leaving every other section as
it was.  The raw runs go to bench/results/compare-<time>.json.

Exit status: 0 every run succeeded and every figure is within 10%, 1 some figure is not (or
could not be judged because its runs failed), 2 the comparison could not be set up.
"""
import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import comparison
from ciphermq_broker import REPO, UnknownBrokerOption, broker_source, source_environment
from machine import load_average
from run import Results
from scenarios import SCENARIOS, sizes_for
from table import number

NUMBERS = ("1", "2", "3", "4", "5", "7", "7b", "8")     # the scenarios issue 11 names
DEFAULT_BASE = "5c2017c"        # the commit of the `make bench` run issues 11 and 15 quote
DEFAULT_ROUNDS = 6
SECTION = "## Before and after (issue 11)"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class SetupFailed(RuntimeError):
    """The comparison cannot run: no such commit, a tree whose broker cannot start, ..."""


def _say(text):
    print(text, file=sys.stderr, flush=True)


def _git(*args):
    """The stripped stdout of ``git -C REPO args``; SetupFailed with git's message if it fails."""
    done = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)
    if done.returncode:
        raise SetupFailed(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextlib.contextmanager
def base_worktree(commit):
    """A detached git worktree of ``commit`` in a new temporary directory (outside the
    repository) for the ``with`` block; removed, with its directory, however the block exits."""
    parent = tempfile.mkdtemp(prefix="ciphermq-compare-")
    tree = os.path.join(parent, "base")
    try:
        _git("worktree", "add", "--detach", "--quiet", tree, commit)
        yield tree
    finally:
        removed = subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree],
                                 capture_output=True).returncode == 0
        shutil.rmtree(parent, ignore_errors=True)
        if not removed:     # never added, or half made: drop git's record of it, if any
            subprocess.run(["git", "-C", REPO, "worktree", "prune"], capture_output=True)


def broker_options(tree):
    """The option names (``--port``, ...) that ``python -m ciphermq.server --help`` lists when
    run from ``tree``, after checking that it really imports ``ciphermq`` from ``tree``."""
    cwd, env = source_environment(tree)

    def python(*args):
        done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=60)
        if done.returncode:
            raise SetupFailed(f"{' '.join(args)} in {tree} failed:\n{done.stderr[-2000:]}")
        return done.stdout

    imported = python("-c", "import ciphermq; print(ciphermq.__file__)").strip()
    if not os.path.realpath(imported).startswith(os.path.realpath(tree) + os.sep):
        raise SetupFailed(f"a broker started from {tree} would import {imported}")
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", python("-m", "ciphermq.server",
                                                                 "--help")))


def run_rounds(scenarios, sizes, rounds, trees, runs):
    """``rounds`` rounds of every scenario on both sides, in comparison.abba_order.
    ``trees``: side -> (source tree, its broker's option names)."""
    for index, order in enumerate(comparison.abba_order(rounds)):
        _say(f"round {index + 1} of {rounds} ({order[0]} first), load {load_average()}")
        for scenario in scenarios:
            _say(f"[{scenario.number}] {scenario.title}")
            for side in order:
                tree, options = trees[side]
                with broker_source(tree, options):
                    runs.record(scenario.number, side, scenario.ours, (sizes,))


def verdicts(scenarios, runs):
    """``[(scenario, row, comparison.Verdict), ...]`` in table order."""
    return [(scenario, row, comparison.judge(runs.values(scenario.number, "base", row.figure),
                                             runs.values(scenario.number, "head", row.figure),
                                             row.higher_is_better))
            for scenario in scenarios for row in scenario.rows]


def _spread(values):
    if not values:
        return "–"
    middle = number(statistics.median(values))
    return middle if len(values) == 1 else f"{middle} [{number(min(values))}–{number(max(values))}]"


def _cells(scenario, row, verdict):
    arrow = "↑" if row.higher_is_better else "↓"
    ratio = "–" if verdict.ratio is None else f"{verdict.ratio:.2f}×"
    return [scenario.number, scenario.title, f"{row.label} {arrow}", _spread(verdict.base),
            _spread(verdict.head), ratio, verdict.change(), comparison.verdict_cell(verdict)]


HEADER = ["#", "scenario", "figure", "base median [min–max]", "head median [min–max]",
          "head / base", "change", "within 10%?"]


def as_text(table):
    widths = (4, 40, 22, 26, 26, 12, 18)
    lines = []
    for cells in [HEADER] + [_cells(*entry) for entry in table]:
        lines.append(" ".join(f"{cell:<{w}.{w}}" for cell, w in zip(cells, widths))
                     + " " + cells[-1])
    return "\n".join(lines)


def as_markdown(table, context, errors):
    """The body of the "Before and after" section."""
    rows = ["| " + " | ".join(HEADER) + " |", "|---|---|---|---:|---:|---:|---|---|"]
    rows += ["| " + " | ".join(_cells(*entry)) + " |" for entry in table]
    judged = [verdict for _, _, verdict in table if verdict.within is not None]
    failures = "".join(f"* {item}\n" for item in errors)
    order = ("the side that goes first alternates round by round "
             "(base, head / head, base / ...)")
    latency = f"{context['latency_seconds']:.0f} s per latency run"
    return f"""\
`make bench-compare` rewrites this section only (`make bench` keeps it, as it keeps "Profile
and gaps"). It runs the CipherMQ side of scenarios {context['scenarios']} with this
checkout's bench/ against the broker of the base commit (a temporary git worktree) and of the
head, alternately, and judges each figure against "within 10% of base", counting only a
regression.

* Run: `{context['command']}` on {context['date']}, {context['minutes']:.1f} min in all.
* Base: commit {context['base']}.
* Head: commit {context['head']}.
* Rounds: {context['rounds']}, each running every scenario once per side, back to back; {order}.
* Sizes: {context['mode']} ({context['msgs']:,} messages per throughput run, {latency}).
* Load average (1, 5, 15 min) at the start / end: {context['load_start']} / {context['load_end']}.
* Broker options the two trees do not share: {context['option_note']}.
* **{sum(1 for v in judged if v.within)} of {len(judged)} judged figures within 10%.**

{chr(10).join(rows)}

↑ higher is better, ↓ lower is better; head / base is the ratio of the medians; "change"
says which way it moved. Spreads are the lowest and highest runs of each side.
{chr(10) + 'Failed runs (not in the medians):' + chr(10) + chr(10) + failures if errors else ''}"""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/compare.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=DEFAULT_BASE, metavar="COMMIT",
                        help=f"the commit whose broker is 'before' (default {DEFAULT_BASE})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N",
                        help=f"runs per scenario and side (default {DEFAULT_ROUNDS}; "
                             "even is best: each side goes first equally often)")
    parser.add_argument("--quick", action="store_true",
                        help="bench-quick's sizes (a smoke run; full sizes by default)")
    parser.add_argument("--only", metavar="LIST",
                        help=f"comma-separated scenarios among {','.join(NUMBERS)}")
    parser.add_argument("--out", metavar="PATH",
                        help=f"write the '{SECTION[3:]}' section of this Markdown file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.numbers = NUMBERS
    if args.only:
        args.numbers = tuple(part.strip() for part in args.only.split(","))
        unknown = [part for part in args.numbers if part not in NUMBERS]
        if unknown:
            parser.error(f"--only: {', '.join(unknown)} not among {', '.join(NUMBERS)}")
    return args


def _option_note(base_options, head_options):
    only_head = sorted(head_options - base_options)
    only_base = sorted(base_options - head_options)
    parts = ([f"head only: {', '.join(f'`{o}`' for o in only_head)}"] if only_head else []) + \
            ([f"base only: {', '.join(f'`{o}`' for o in only_base)}"] if only_base else [])
    return ("; ".join(parts) + " (the harness passes none of them; each broker runs with its "
            "own defaults)") if parts else "none"


def main(argv=None):
    args = parse_args(argv)
    # SIGTERM (e.g. make being stopped) unwinds like Ctrl-C: every broker and client is
    # stopped by its own with block, and the base worktree is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    scenarios = [s for s in SCENARIOS if s.number in args.numbers]
    sizes = sizes_for(args.quick)
    started_at = datetime.datetime.now().astimezone()
    started = time.monotonic()
    load_start = load_average()
    runs = Results(fatal=UnknownBrokerOption)   # an option the base lacks stops it all
    try:
        try:
            base = _git("rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}")
        except SetupFailed:
            raise SetupFailed(f"no commit {args.base!r} in {REPO}") from None
        base_text = _git("log", "-1", "--format=%h (%s)", base)
        head_text = _git("log", "-1", "--format=%h (%s)", "HEAD")
        if _git("status", "--porcelain", "--", "ciphermq"):
            head_text += " + uncommitted changes in ciphermq/"
        with base_worktree(base) as base_tree:
            trees = {"base": (base_tree, broker_options(base_tree)),
                     "head": (REPO, broker_options(REPO))}
            option_note = _option_note(trees["base"][1], trees["head"][1])
            _say(f"base {base_text}\nhead {head_text}\nbroker options not shared: "
                 f"{option_note}")
            run_rounds(scenarios, sizes, args.rounds, trees, runs)
    except (SetupFailed, UnknownBrokerOption) as exc:
        _say(f"Error: {exc}")
        return 2
    except KeyboardInterrupt:       # everything started is stopped and removed by now
        _say("Interrupted: no report.")
        return 130
    elapsed = time.monotonic() - started
    table = verdicts(scenarios, runs)
    errors = [f"{number_} {side}: {message.splitlines()[0]}"
              for (number_, side), messages in runs.errors.items() for message in messages]
    context = {
        "command": " ".join(["bench/compare.py"] + list(sys.argv[1:] if argv is None else argv)),
        "date": started_at.strftime("%Y-%m-%d %H:%M %Z"), "minutes": elapsed / 60,
        "base": base_text, "head": head_text, "rounds": args.rounds,
        "scenarios": ", ".join(s.number for s in scenarios),
        "mode": "quick" if args.quick else "full", "msgs": sizes["msgs"],
        "latency_seconds": sizes["latency_seconds"], "load_start": load_start,
        "load_end": load_average(), "option_note": option_note,
    }
    print(as_text(table))
    judged = [verdict for _, _, verdict in table if verdict.within is not None]
    print(f"{sum(1 for v in judged if v.within)} of {len(judged)} judged figures within 10%; "
          f"base {base_text}, head {head_text}; {args.rounds} rounds; load {load_start} at the "
          f"start, {context['load_end']} at the end; total {elapsed:.1f} s")
    for error in errors:
        print(f"failed run: {error}")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    raw_path = os.path.join(RESULTS_DIR, f"compare-{started_at:%Y%m%d-%H%M%S}.json")
    with open(raw_path, "w") as raw:
        json.dump({"context": {**context, "sizes": sizes},
                   **runs.as_json()},
                  raw, indent=1)
    _say(f"raw runs: {raw_path}")
    if args.out:
        try:
            with open(args.out, encoding="utf-8") as existing:
                text = existing.read()
        except FileNotFoundError:
            text = ""
        with open(args.out, "w", encoding="utf-8") as out:
            out.write(comparison.replace_section(text, SECTION,
                                                 as_markdown(table, context, errors)))
        _say(f"report: {args.out} (section {SECTION[3:]!r})")
    every_figure_within = all(verdict.within for _, _, verdict in table)
    return 0 if every_figure_within and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
