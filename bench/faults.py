"""The full fault matrix (``make faults``): every scenario at full size, one table.

    .venv/bin/python bench/faults.py [--messages N] [--only 1,4] [--seed S] [--keys DIR]
                                     [--out docs/RELIABILITY.md]

The scenarios are the functions of ``tests/test_faults.py`` -- the same code CI
runs at a few hundred messages -- here at full size: 10,000 messages each, 25
receiver deaths (5 at the exact windows, 20 random SIGKILLs), 10 sender
SIGKILLs, chaos at the rates of the issue, 10 broker SIGKILLs with a journal,
20 network faults, and the memory-only broker killed 10 times as the negative
control.  Real processes, real 2048-bit keys (``make keys``), real fsyncs.

Each row is judged by ``ciphermq.checker`` from the files the scripts left.
The table is printed, and with ``--out`` written into that file between the
markers ``<!-- faults:begin -->`` and ``<!-- faults:end -->`` (the rest of
the file is people's prose, left alone).  Exit status 0 when every scenario
lost and duplicated nothing and the negative control saw its loss; 1
otherwise (the failed rows say why).
"""
import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The scenarios and their helpers live in tests/.  It goes first on the path: bench/ has a
# processes.py of its own, and the scenarios need tests/processes.py (BrokerProcess).
sys.path.insert(0, str(REPO / "tests"))
import consumer_faults  # noqa: E402
import test_faults as matrix  # noqa: E402
from Crypto.PublicKey import RSA  # noqa: E402

from ciphermq import keys  # noqa: E402

FULL = matrix.Scale(messages=10_000, receiver_kills=20, sender_kills=10, broker_kills=10,
                    network_faults=20, patience=600.0)
#: The issue's chaos rates, with its 0-20 ms delay.
CHAOS = "drop-ack=0.05,drop-confirm=0.05,drop-delivery=0.02,disconnect=0.01,delay-ms=0-20"
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


class Row:
    """One scenario of the matrix: what runs, and whether loss is the expected outcome."""

    def __init__(self, number, title, scenario, options=None, expect_loss=False,
                 expect_rejects=False):
        self.number = number
        self.title = title
        self.scenario = scenario
        self.options = options or {}
        self.expect_loss = expect_loss
        self.expect_rejects = expect_rejects    # every message refused on purpose, none lost
        self.result = None
        self.error = None

    def verdict(self):
        if self.error is not None:
            return "❌ " + self.error
        tally = self.result.tally
        if self.expect_loss:
            if tally.lost and not tally.duplicated:
                return "✅ loss seen, as documented"
            return "❌ the negative control saw no loss"
        if self.expect_rejects:
            if tally.ok and not tally.stored and tally.rejected == tally.acked == tally.attempted:
                return "✅ all rejected to .dead, none lost"
            return "❌ " + "; ".join(tally.report()[-2:])
        if tally.ok and tally.acked == tally.attempted:
            return "✅ exactly once"
        return "❌ " + "; ".join(line for line in tally.report() if line.startswith("❌"))

    @property
    def passed(self):
        return self.verdict().startswith("✅")


ROWS = [
    Row("1", "Receiver killed: once at each exact window, then SIGKILL at random",
        matrix.receiver_crashes),
    Row("2", "Sender SIGKILLed mid-run, restarted on its outbox", matrix.sender_kills),
    Row("3", "Broker chaos: drop-ack, drop-confirm, drop-delivery, disconnect, delay",
        matrix.broker_chaos, {"spec": CHAOS}),
    Row("4", "Broker SIGKILLed with --data-dir, restarted on the same port",
        matrix.broker_kills, {"durable": True}),
    Row("5", "Network: latency, resets (RST), cuts (FIN), silent stalls (half-open)",
        matrix.network_faults),
    Row("6", "Negative control: memory-only broker SIGKILLed the same way",
        matrix.broker_kills, {"durable": False}, expect_loss=True),
    Row("7", "Hung receiver: SIGSTOPped through 10 redelivery passes, then SIGKILLed",
        consumer_faults.hung_receiver),
    Row("8", "Stale backlog: every message older than the receiver's --max-age",
        consumer_faults.stale_backlog, expect_rejects=True),
    Row("9", "Receiver's disk full mid-stream (8 MiB tmpfs), then space again",
        consumer_faults.receiver_disk_full),
]


def _say(text):
    print(text, file=sys.stderr, flush=True)


def run(rows, scale, key_pair, seed):
    for row in rows:
        _say("== %s. %s (%d messages) ..." % (row.number, row.title, scale.messages))
        with tempfile.TemporaryDirectory(prefix="ciphermq-faults-") as workdir:
            try:
                row.result = matrix.play(row.scenario, workdir, key_pair, scale, seed,
                                         **row.options)
            except Exception as exc:        # a failed scenario is a row, not the end of the run
                traceback.print_exc()
                row.error = "%s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:200])
        if row.result is not None:
            for line in row.result.tally.report():
                _say("   " + line)
        _say("   %s" % row.verdict())


def _faults(result):
    return ", ".join("%s %s" % (_n(n), name) for name, n in sorted(result.faults.items()))


def table(rows):
    lines = ["| # | scenario | attempted | ACKed | stored | rejected | lost | duplicated "
             "| never ACKed | faults injected | notes | seconds | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|"]
    for row in rows:
        if row.result is None:
            lines.append("| %s | %s | | | | | | | | | | | %s |"
                         % (row.number, row.title, row.verdict()))
            continue
        c = row.result.tally.counts()
        lines.append("| %s | %s | %s | %s | %s | %s | **%s** | **%s** | %s | %s | %s | %.0f | %s |"
                     % (row.number, row.title, _n(c["attempted"]), _n(c["acked"]),
                        _n(c["stored"]), _n(c["rejected"]), _n(c["lost"]),
                        _n(c["duplicated"]), _n(c["never_acked"]), _faults(row.result),
                        "; ".join(_notes(row.result)) or "—",
                        row.result.seconds, row.verdict()))
    return "\n".join(lines)


def _notes(result):
    compacted = ["journal compacted %d× during the run" % result.compactions] \
        if result.compactions else []
    return list(result.notes) + compacted


def _n(value):
    return "{:,}".format(value)


def machine():
    """One line on what ran it: CPUs, Python, the filesystem the files (and fsyncs) were on."""
    model = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    temp = tempfile.gettempdir()
    filesystem = subprocess.run(["df", "--output=fstype", temp], capture_output=True,
                                text=True, check=False).stdout.split()[-1:] or ["unknown"]
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--", "ciphermq", "bin"):
        commit += " + uncommitted changes in ciphermq/ or bin/"
    return "%d CPU(s) (%s), Python %s, files in %s on %s, CipherMQ commit %s" % (
        os.cpu_count(), model, platform.python_version(), temp, filesystem[0], commit)


def _git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          check=False).stdout.strip()


def report(rows, scale, seed, minutes, key_bits):
    return "\n".join([
        "* Run: `make faults` on %s, %.1f min in all, seed %d, %s messages per scenario, "
        "%d-bit receiver key." % (datetime.date.today().isoformat(), minutes, seed,
                                  _n(scale.messages), key_bits),
        "* Machine: %s." % machine(),
        "",
        table(rows),
        "",
        "lost = ACKed to a sender but in neither the output nor the rejects file; "
        "duplicated = ids stored more than once; never ACKed = attempted, never ACKed "
        "(a sender that gave up keeps them in its outbox, and its next run sends them).",
    ])


def write(path, text):
    document = Path(path).read_text(encoding="utf-8")
    if BEGIN not in document or END not in document:
        raise SystemExit("%s has no %s ... %s markers" % (path, BEGIN, END))
    head, rest = document.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    Path(path).write_text("%s%s\n%s\n%s%s" % (head, BEGIN, text, END, tail), encoding="utf-8")


def load_keys(directory, stack_dir):
    """The receiver's key pair from ``directory``, or a fresh 2048-bit one if it has none."""
    directory = Path(directory).resolve()      # the scripts run in a temporary directory
    pair = (directory / "receiver_private.pem", directory / "receiver_public.pem")
    if all(path.exists() for path in pair):
        return pair
    _say("No key pair in %s: making a 2048-bit one for this run" % directory)
    return keys.write_rsa_key_pair(stack_dir, bits=2048)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="faults.py", description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=FULL.messages,
                        help="messages per scenario (default %(default)s)")
    parser.add_argument("--only", metavar="LIST",
                        help="comma list of scenario numbers to run (then nothing is written)")
    parser.add_argument("--seed", type=int, default=20261127, help="(default %(default)s)")
    parser.add_argument("--keys", default=str(REPO / "keys"), metavar="DIR",
                        help="directory with receiver_private.pem / receiver_public.pem")
    parser.add_argument("--out", metavar="PATH",
                        help="write the table into this Markdown file, between the markers")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rows = ROWS
    if args.only:
        wanted = set(args.only.split(","))
        rows = [row for row in ROWS if row.number in wanted]
    scale = FULL._replace(messages=args.messages)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ciphermq-faults-keys-") as key_dir:
        key_pair = load_keys(args.keys, key_dir)
        key_bits = RSA.import_key(key_pair[1].read_bytes()).size_in_bits()
        run(rows, scale, key_pair, args.seed)
    text = report(rows, scale, args.seed, (time.monotonic() - started) / 60, key_bits)
    print(text)
    if args.out and not args.only:
        write(args.out, text)
        _say("Wrote the figures into %s" % args.out)
    return 0 if all(row.passed for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
