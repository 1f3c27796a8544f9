"""Run the CipherMQ benchmark, side by side with RabbitMQ when it is installed (issue 6).

    python bench/run.py [--quick|--full] [--peer|--no-peer] [--repeats N] [--out docs/BENCHMARKS.md]

Each scenario (see scenarios.py) runs ``--repeats`` times, alternating CipherMQ and
RabbitMQ run by run (ours, RabbitMQ, ours, RabbitMQ ...), so both see the same machine
at about the same moment.  Every broker and every client is a process of its own on
127.0.0.1.  The table (median [min-max] per figure, ratios ours/RabbitMQ, targets met or
not) is printed; with ``--out`` it is also written as Markdown, with the machine, the
commands and a chart (docs/benchmarks.png, if matplotlib is importable).  The raw runs go
to bench/results/ as JSON.

Peer mode (default: when available) starts a private RabbitMQ node (rabbitmq_node.py) and
a private redis-server (redis_node.py) on loopback for the whole run; each scenario then
runs ours, RabbitMQ, Redis, ours, RabbitMQ, Redis ...  A peer that is not installed is left
out with a note (``--peers`` picks them); ``make bench-peer-install`` installs both.

Exit status: 0 if every run succeeded, 1 if any failed (the others are still reported),
2 if ``--peer`` was asked for and a peer cannot run.
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
import redis_node
import table
from scenarios import SCENARIOS, sizes_for

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass
class Peer:
    """A broker compared with CipherMQ: its side's name, its node harness, its scenarios."""

    side: str               # "RabbitMQ" or "Redis": the key of its runs in Results
    key: str                # the name in --peers, and the Scenario attribute naming its function
    node: object            # module with check_installed() and the context manager below
    start: str              # name of the context manager in ``node`` that runs a private server
    scenarios: str          # module of its scenario functions
    unavailable: type       # the exception ``node`` raises when it cannot run


PEERS = [
    Peer("RabbitMQ", "rabbit", rabbitmq_node, "private_rabbitmq", "rabbitmq_scenarios",
         rabbitmq_node.RabbitMQUnavailable),
    Peer("Redis", "redis", redis_node, "private_redis", "redis_scenarios",
         redis_node.RedisUnavailable),
]
SIDES = ["ours"] + [peer.side for peer in PEERS]


class Results:
    """Every run's figures and every failure, per scenario number and side."""

    def __init__(self, fatal=()):
        self.runs = {}          # (number, side) -> [figures dict, ...]
        self.errors = {}        # (number, side) -> [message, ...]
        self.skipped = {}       # number -> reason
        self.fatal = fatal      # exception types that are not a failed run: they stop it all

    def record(self, number, side, function, args):
        """Run ``function(*args)`` once; keep its figures, or its error, and say which."""
        started = time.monotonic()
        try:
            figures = function(*args)
        except self.fatal:
            raise
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
        return [error for side in SIDES for error in self.errors.get((number, side), [])]

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


def _peers(mode, wanted):
    """``({side: Peer}, {side: reason it is left out})`` for ``--peer`` (True), ``--no-peer``
    (False) or auto (None), among the peers named in ``wanted``."""
    usable, notes = {}, {}
    for peer in PEERS:
        if mode is False:
            notes[peer.side] = "not asked for (--no-peer)"
        elif peer.key not in wanted and peer.side.lower() not in wanted:
            notes[peer.side] = "not asked for (--peers)"
        else:
            try:
                peer.node.check_installed()
                usable[peer.side] = peer
            except peer.unavailable as exc:
                notes[peer.side] = str(exc)
    return usable, notes


def run(scenarios, sizes, repeats, peers, stack):
    """Run every scenario ``repeats`` times, alternating sides.

    Returns ``(results, the sides that ran, {side: why not} for peers that failed to
    start)``.  ``stack`` (an ExitStack) owns the peers' servers, so they are stopped
    however the run ends.
    """
    import importlib

    results = Results()
    running, notes = {}, {}          # side -> (info, scenario module)
    for side, peer in peers.items():
        _say(f"Starting a private {side} server ...")
        try:
            info = stack.enter_context(getattr(peer.node, peer.start)())
        except peer.unavailable as exc:
            notes[side] = f"{side} did not start: {exc}"
            _say(notes[side])
            continue
        running[side] = (info, importlib.import_module(peer.scenarios), peer.key)
    for scenario in scenarios:
        reason = scenario.skip_reason()
        if reason:
            results.skipped[scenario.number] = reason
            _say(f"[{scenario.number}] {scenario.title}: SKIPPED ({reason})")
            continue
        _say(f"[{scenario.number}] {scenario.title}")
        for _ in range(min(repeats, scenario.max_repeats or repeats)):
            results.record(scenario.number, "ours", scenario.ours, (sizes,))
            for side, (info, module, key) in running.items():
                name = getattr(scenario, key)
                if name:
                    results.record(scenario.number, side, getattr(module, name), (info, sizes))
    return results, set(running), notes


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
                      help="require the peers' comparison (exit 2 if one cannot run)")
    peer.add_argument("--no-peer", dest="peer", action="store_false",
                      help="CipherMQ alone")
    parser.add_argument("--peers", default="rabbitmq,redis", metavar="LIST",
                        help="which peers to compare with (default: rabbitmq,redis)")
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
    peers, peer_notes = _peers(args.peer, {name.strip().lower()
                                           for name in args.peers.split(",")})
    impossible = {side: note for side, note in peer_notes.items()
                  if not note.startswith("not asked for")}
    if args.peer and impossible:
        for side, note in impossible.items():
            _say(f"{side} comparison impossible: {note}")
        return 2
    for side, note in peer_notes.items():
        _say(f"{side} comparison skipped: {note}.")
    sizes = sizes_for(args.quick)
    started_at = datetime.datetime.now().astimezone()
    described = machine.describe()      # before the run: the commit under test, the load
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        results, with_peers, start_notes = run(scenarios, sizes, args.repeats, peers, stack)
    peer_notes.update(start_notes)
    elapsed = time.monotonic() - started
    context = {
        "mode": "quick" if args.quick else "full", "repeats": args.repeats, "sizes": sizes,
        "argv": ["bench/run.py"] + list(sys.argv[1:] if argv is None else argv),
        "started_at": started_at.isoformat(timespec="seconds"), "elapsed_s": round(elapsed, 1),
        "peer": "RabbitMQ" in with_peers, "peer_note": peer_notes.get("RabbitMQ"),
        "redis": "Redis" in with_peers, "redis_note": peer_notes.get("Redis"),
        "machine": described,
        "load_at_end": machine.load_average(),
    }
    lines = table.build(scenarios, results, "RabbitMQ" in with_peers)
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
