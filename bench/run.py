"""Run the CipherMQ benchmark, side by side with RabbitMQ when it is installed (issue 6).

    python bench/run.py [--quick|--full] [--peer|--no-peer] [--repeats N] [--out docs/BENCHMARKS.md]

Each scenario (see scenarios.py) runs ``--repeats`` times, alternating CipherMQ and
RabbitMQ run by run (ours, RabbitMQ, ours, RabbitMQ ...), so both see the same machine
at about the same moment.  Every broker and every client is a process of its own on
127.0.0.1.  The table (median [min-max] per figure, ratios ours/RabbitMQ, targets met or
not) is printed; with ``--out`` it is also written as Markdown, with the machine, the
commands and a chart (docs/benchmarks.png, if matplotlib is importable).  The raw runs go
to bench/results/ as JSON.

Peer mode (default: when available) starts a private RabbitMQ node on loopback for the
whole run (rabbitmq_node.py).  Without rabbitmq-server or pika the run says so and reports
CipherMQ alone; ``make bench-peer-install`` installs both.

Exit status: 0 if every run succeeded, 1 if any failed (the others are still reported),
2 if ``--peer`` was asked for and RabbitMQ cannot run.
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import signal
import sys
import time

import machine
import markdown
import rabbitmq_node
import table
from scenarios import SCENARIOS, sizes_for

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Results:
    """Every run's figures and every failure, per scenario number and side."""

    def __init__(self):
        self.runs = {}          # (number, side) -> [figures dict, ...]
        self.errors = {}        # (number, side) -> [message, ...]
        self.skipped = {}       # number -> reason

    def record(self, number, side, function, args):
        """Run ``function(*args)`` once; keep its figures, or its error, and say which."""
        started = time.monotonic()
        try:
            figures = function(*args)
        except Exception as exc:  # noqa: BLE001  (one failed run is reported; the others go on)
            message = f"{type(exc).__name__}: {exc}"
            self.errors.setdefault((number, side), []).append(message)
            took = time.monotonic() - started
            _say(f"  {side:<8} FAILED after {took:.1f} s: {message.splitlines()[0]}")
            return
        self.runs.setdefault((number, side), []).append(figures)
        shown = ", ".join(f"{name}={value}" for name, value in figures.items()
                          if name.endswith(("_per_s", "_ms", "_mb")))
        _say(f"  {side:<8} {shown}  ({time.monotonic() - started:.1f} s)")

    def values(self, number, side, figure):
        """The values of one figure over the runs of one side (empty if none ran)."""
        return [run[figure] for run in self.runs.get((number, side), []) if figure in run]

    def errors_of(self, number):
        return self.errors.get((number, "ours"), []) + self.errors.get((number, "RabbitMQ"), [])

    @property
    def failed(self):
        return bool(self.errors)

    def as_json(self):
        return {"runs": {f"{number}/{side}": runs for (number, side), runs in self.runs.items()},
                "errors": {f"{number}/{side}": errors
                           for (number, side), errors in self.errors.items()},
                "skipped": self.skipped}


def _say(text):
    print(text, file=sys.stderr, flush=True)


def _peer(mode):
    """``(use_peer, reason_if_not)`` for ``--peer`` (True), ``--no-peer`` (False) or auto (None)."""
    if mode is False:
        return False, "not asked for (--no-peer)"
    try:
        rabbitmq_node.check_installed()
    except rabbitmq_node.RabbitMQUnavailable as exc:
        return False, str(exc)
    return True, None


def run(scenarios, sizes, repeats, use_peer, stack):
    """Run every scenario ``repeats`` times, alternating sides.

    Returns ``(results, whether RabbitMQ ran, why not if it failed to start)``.  ``stack``
    (an ExitStack) owns the RabbitMQ node, so it is stopped however the run ends.
    """
    results = Results()
    info, rabbit, peer_note = None, None, None
    if use_peer:
        import rabbitmq_scenarios as rabbit
        _say("Starting a private RabbitMQ node ...")
        try:
            info = stack.enter_context(rabbitmq_node.private_rabbitmq())
        except rabbitmq_node.RabbitMQUnavailable as exc:
            peer_note = f"RabbitMQ did not start: {exc}"
            _say(peer_note)
    for scenario in scenarios:
        reason = scenario.skip_reason()
        if reason:
            results.skipped[scenario.number] = reason
            _say(f"[{scenario.number}] {scenario.title}: SKIPPED ({reason})")
            continue
        _say(f"[{scenario.number}] {scenario.title}")
        for _ in range(repeats):
            results.record(scenario.number, "ours", scenario.ours, (sizes,))
            if info is not None and scenario.rabbit:
                results.record(scenario.number, "RabbitMQ", getattr(rabbit, scenario.rabbit),
                               (info, sizes))
    return results, info is not None, peer_note


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true",
                      help="smoke run: small sizes, 1 repeat by default")
    mode.add_argument("--full", dest="quick", action="store_false",
                      help="the run for the record (default)")
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--peer", dest="peer", action="store_true", default=None,
                      help="require the RabbitMQ comparison (exit 2 if it cannot run)")
    peer.add_argument("--no-peer", dest="peer", action="store_false",
                      help="CipherMQ alone")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="runs per scenario and side (default: 3 full, 1 quick)")
    parser.add_argument("--only", metavar="LIST",
                        help="comma-separated scenario numbers to run, e.g. 1,3,4")
    parser.add_argument("--out", metavar="PATH",
                        help="write the Markdown report here (and the chart beside it)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    # SIGTERM (e.g. from make being stopped) unwinds like Ctrl-C, so every broker, client
    # and RabbitMQ node started so far is stopped by its own finally/with block.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    scenarios = SCENARIOS
    if args.only:
        wanted = set(args.only.split(","))
        scenarios = [s for s in SCENARIOS if s.number in wanted]
    use_peer, peer_note = _peer(args.peer)
    if args.peer and not use_peer:
        _say(f"RabbitMQ comparison impossible: {peer_note}")
        return 2
    if not use_peer:
        _say(f"RabbitMQ comparison skipped: {peer_note}. Reporting CipherMQ alone.")
    sizes = sizes_for(args.quick)
    started_at = datetime.datetime.now().astimezone()
    described = machine.describe()      # before the run: the commit under test, the load
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        results, with_peer, start_note = run(scenarios, sizes, args.repeats, use_peer, stack)
    if start_note:
        peer_note = start_note
    elapsed = time.monotonic() - started
    context = {
        "mode": "quick" if args.quick else "full", "repeats": args.repeats, "sizes": sizes,
        "argv": ["bench/run.py"] + list(sys.argv[1:] if argv is None else argv),
        "started_at": started_at.isoformat(timespec="seconds"), "elapsed_s": round(elapsed, 1),
        "peer": with_peer, "peer_note": peer_note, "machine": described,
        "load_at_end": machine.load_average(),
    }
    lines = table.build(scenarios, results, with_peer)
    print(table.as_text(lines))
    print(f"total {elapsed:.1f} s")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = started_at.strftime("%Y%m%d-%H%M%S")
    raw_path = os.path.join(RESULTS_DIR, f"{context['mode']}-{stamp}.json")
    with open(raw_path, "w") as raw:
        json.dump({"context": context, "table": [dataclasses.asdict(line) for line in lines],
                   **results.as_json()}, raw, indent=1)
    _say(f"raw runs: {raw_path}")
    if args.out:
        markdown.write(args.out, lines, context)
        _say(f"report: {args.out}")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
