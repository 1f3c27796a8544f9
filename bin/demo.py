"""CipherMQ end to end in one command (``make demo``): broker, receiver, sender.

    python bin/demo.py                  # keys from keys/ (``make keys`` makes them)
    python bin/demo.py --keep           # keep the temporary directory with the files
    python bin/demo.py --count 200 -v --chaos drop-ack=0.05,drop-confirm=0.05 \
        --chaos-seed 7 --broker-arg=--redelivery-interval=2     # make chaos-demo

Starts a broker on a free port (``python -m ciphermq.server --port 0``, whose
log names the port), a receiver that stops after the demo's messages, and a
sender; waits for the receiver to exit (not for a fixed time), prints what
was stored, and stops everything it started -- also on Ctrl-C or SIGTERM.
The receiver's output and the sender's outbox go to a temporary directory,
so the checkout stays clean.  Exit status 0 if every message arrived exactly
once, 130 if interrupted.

The last word is the checker's (:mod:`ciphermq.checker`): from the sender's
``--record`` file, its outbox and the receiver's output it counts what was
ACKed and what was stored, and says whether anything was lost or stored twice.

Chaos mode (``--chaos SPEC``, see ``ciphermq/chaos.py``) makes the broker
misbehave on purpose: every fault it injects is shown as a ``💥 [BROKER]``
line, and the sender's retries, the receiver's dedup and the redeliveries
can be watched absorbing them.  The clients then give up on a reply after
1 s instead of 5 (``--ack-timeout 1 --heartbeat 1``), so retries come
quickly.  A sender that gives up on a message after its 3 attempts keeps it
in its outbox; the demo then runs it again, as a user would, and that run
delivers the rest.

Threads: the demo itself runs in ``demo-run``; the main thread only waits for
it, so that Ctrl-C (always delivered to the main thread) never lands in the
middle of starting a child: :class:`Children` starts each one under a lock,
and stopping takes the same lock, so no child can be started unseen.
"""
import argparse
import collections
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Runnable as ``python bin/demo.py`` from a checkout, without installing the package.
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from ciphermq import checker  # noqa: E402  (needs the path above)

MESSAGES = [
    "Hello from CipherMQ!",
    "Each message is sealed with a fresh AES key, wrapped with the receiver's RSA key.",
    "The broker routes envelopes it cannot read.",
    "The receiver stores each message exactly once, then acknowledges it.",
    "Goodbye!",
]
#: Generous bounds for each stage, so a broken demo fails instead of hanging.
START_TIMEOUT = 15.0
RUN_TIMEOUT = 60.0
#: Client options under chaos: give up on a reply after 1 s, not 5, so retries come quickly.
CHAOS_CLIENT_OPTIONS = ["--ack-timeout", "1", "--heartbeat", "1"]
#: Runs of the sender after the first, from its outbox, if it gave up on some messages.
SENDER_RERUNS = 3
#: Stored messages listed at the end, at most.
SHOWN = 10


class Stopped(Exception):
    """The demo is being stopped: start nothing more."""


class Console:
    """The demo's stdout, shared by the threads that relay the children's lines."""

    def __init__(self):
        #: Guards writing stdout (whole lines, never interleaved) and ``faults``.
        self._lock = threading.Lock()
        self.faults = collections.Counter()    # chaos faults the broker reported, by name

    def say(self, text):
        with self._lock:
            print(text, flush=True)

    def fault(self, name, what):
        with self._lock:
            self.faults[name] += 1
            print("💥 [BROKER] chaos %s: %s" % (name, what), flush=True)

    def faults_seen(self):
        with self._lock:
            return collections.Counter(self.faults)


class Children:
    """The processes the demo started, and the one way to stop them all."""

    def __init__(self):
        #: Guards _started and _stopping; held while a child is being started.
        self._lock = threading.Lock()
        self._started = []
        self._stopping = False

    def start(self, argv, **options):
        """Start and record a child (raises Stopped once :meth:`stop_all` has begun)."""
        with self._lock:
            if self._stopping:
                raise Stopped()
            process = subprocess.Popen(argv, **options)
            self._started.append(process)
            return process

    @property
    def stopping(self):
        with self._lock:
            return self._stopping

    def stop_all(self):
        """Terminate (or kill) and reap every child, newest first.  Safe to call twice."""
        with self._lock:
            self._stopping = True
            started, self._started = self._started, []
        for process in reversed(started):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def start_broker(children, workdir, options, console):
    """Start the broker on a free port; return the port it logged, and its dashboard's URL
    (None without --http-port).

    Its log is read to the end, so the broker never blocks on the pipe; each
    fault it injects in chaos mode is shown and counted on ``console``.
    """
    process = children.start([sys.executable, "-m", "ciphermq.server", "--port", "0", *options],
                             stderr=subprocess.PIPE, text=True, encoding="utf-8",
                             cwd=str(workdir))
    ports = queue.Queue()
    dashboard = []                  # logged before the port, so complete once a port arrives

    def read_log():
        for line in process.stderr:
            url = re.search(r"Dashboard on (http://\S+/)", line)
            if url:
                dashboard.append(url.group(1))
            match = re.search(r"listening on [\d.]+:(\d+)", line)
            if match:
                ports.put(int(match.group(1)))
            fault = re.search(r"CHAOS (\S+): (.*)", line)
            if fault:
                console.fault(fault.group(1), fault.group(2))
        ports.put(None)

    threading.Thread(target=read_log, name="demo-broker-log", daemon=True).start()
    try:
        port = ports.get(timeout=START_TIMEOUT)
    except queue.Empty:
        raise RuntimeError("the broker did not report its port in time") from None
    if port is None:
        raise RuntimeError("the broker exited at start (status %s)" % process.wait())
    return port, (dashboard[0] if dashboard else None)


def start_script(children, console, argv, log, workdir):
    """Start a script whose stdout is shown and also saved to ``log``; return
    ``(process, relay thread)`` -- the log is complete once the thread has ended."""
    process = children.start(argv, stdout=subprocess.PIPE, text=True, encoding="utf-8",
                             cwd=str(workdir), env=dict(os.environ, PYTHONIOENCODING="utf-8"))

    def relay():
        with open(log, "a", encoding="utf-8") as file:
            for line in process.stdout:
                file.write(line)
                file.flush()
                console.say(line.rstrip("\n"))

    thread = threading.Thread(target=relay, name="demo-relay-" + log.stem, daemon=True)
    thread.start()
    return process, thread


def finish(process, relay, timeout):
    """Wait for a script to exit and for its last lines; return its exit status."""
    code = process.wait(timeout)
    relay.join(timeout)
    return code


def run(args, workdir, children, console):
    """The demo proper; returns the exit status."""
    private_key = args.keys / "receiver_private.pem"
    public_key = args.keys / "receiver_public.pem"
    for key in (private_key, public_key):
        if not key.exists():
            print("❌ [DEMO] %s is missing: run `make keys` first" % key, file=sys.stderr)
            return 1
    output = workdir / "received_messages.json"
    outbox = workdir / "pending_messages.json"
    broker_options, client_options = chaos_options(args)
    if args.http_port is not None:
        broker_options += ["--http-port", str(args.http_port)]
    verbose = ["-v"] if args.verbose else []
    count = args.count if args.count is not None else len(MESSAGES)
    timeout = RUN_TIMEOUT + count / 10.0
    port, dashboard = start_broker(children, workdir, broker_options, console)
    console.say("🟢 [DEMO] Broker listening on 127.0.0.1:%d%s"
                % (port, " in CHAOS MODE (%s)" % args.chaos if args.chaos else ""))
    if dashboard is not None:
        console.say(dashboard_hint(dashboard, args.chaos))
    receiver = start_script(
        children, console,
        [sys.executable, str(HERE / "Receiver.py"), "--port", str(port),
         "--private-key", str(private_key), "--output", str(output),
         "--max-messages", str(count), *client_options, *verbose],
        workdir / "receiver.log", workdir)
    sender_logs = []
    sender_record = workdir / "sender_record.json"

    def send(messages):
        """One run of the sender: every status line shown (-v), every event in its record."""
        sender_logs.append(workdir / ("sender-%d.log" % (len(sender_logs) + 1)))
        command = [sys.executable, str(HERE / "Sender.py"), "--port", str(port),
                   "--public-key", str(public_key), "--outbox", str(outbox), "-v",
                   "--record", str(sender_record), *client_options, *messages]
        return finish(*start_script(children, console, command, sender_logs[-1], workdir),
                      timeout)

    send_until_done(send, args, children, console)
    if finish(*receiver, timeout) != 0:
        raise RuntimeError("the receiver failed")
    stored = show_stored(output)
    if args.chaos:
        print_recovery(console.faults_seen(), sender_logs, workdir / "receiver.log")
    tally = checker.check([sender_record], output, outboxes=[outbox])
    for line in tally.report():
        print(line)
    expected = args.count is not None or sorted(r["message"] for r in stored) == sorted(MESSAGES)
    return 0 if tally.ok and expected else 1


def dashboard_hint(url, chaos):
    """Where to look on the dashboard while the demo runs."""
    hint = "📊 [DEMO] Dashboard: %s (open it now; it lives as long as the demo)" % url
    if chaos:
        hint += ("\n📊 [DEMO] Watch the redelivered total and the redeliver line on the rates "
                 "chart climb with each dropped push and connection, the duplicate publishes "
                 "total count the sender's retries after lost ACKs, and default_queue's "
                 "unacked column drain back to 0")
    return hint


def chaos_options(args):
    """``(broker options, client options)``: with --chaos, the broker's faults and the
    clients' short timeouts."""
    broker_options = list(args.broker_arg)
    if not args.chaos:
        return broker_options, []
    broker_options += ["--chaos", args.chaos]
    if args.chaos_seed is not None:
        broker_options += ["--chaos-seed", str(args.chaos_seed)]
    return broker_options, CHAOS_CLIENT_OPTIONS


def send_until_done(send, args, children, console):
    """Run the sender; while it gives up on messages (exit 1), run it again on its outbox."""
    if args.count is not None:
        code = send(["--count", str(args.count)])
    else:
        code = send([option for message in MESSAGES for option in ("--message", message)])
    for _ in range(SENDER_RERUNS):
        if code != 1 or children.stopping:      # (a sender stopped by Ctrl-C also exits 1)
            break
        console.say("🔁 [DEMO] The sender gave up on some messages; they wait in its outbox. "
                    "Running it again, as you would:")
        code = send(["--file", os.devnull])
    if code != 0:
        raise RuntimeError("the sender failed (status %s)" % code)


def show_stored(output):
    """Print the first SHOWN records of the receiver's output; return them all."""
    stored = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    print("\n📜 [DEMO] %s holds %d message(s)%s:" % (
        output.name, len(stored), ", the first %d" % SHOWN if len(stored) > SHOWN else ""))
    for record in stored[:SHOWN]:
        print("   %s  %s  %s" % (record["timestamp"], record["message_id"], record["message"]))
    return stored


def print_recovery(faults, sender_logs, receiver_log):
    """What chaos did, and what absorbed it (from the status lines)."""
    sender = "".join(log.read_text(encoding="utf-8") for log in sender_logs)
    attempts = len(re.findall(r"\(attempt \d", sender))
    again = sender.count("(again: the connection was lost)")
    duplicates = re.findall(r"📊 \[RECEIVER\] \d+ message\(s\) saved, (\d+) duplicate",
                            receiver_log.read_text(encoding="utf-8"))
    print("\n💥 [DEMO] The broker injected: %s" % (
        ", ".join("%d %s" % (n, name) for name, n in sorted(faults.items())) or "nothing"))
    print("🔁 [DEMO] The sender reconnected %d time(s) and re-sent %d publish(es): %d as a "
          "new attempt, %d because a lost connection caught them in flight.  The broker "
          "re-ACKed every re-sent message it already had, storing none twice, and the receiver "
          "acked %s duplicate delivery(ies) without writing them again."
          % (sender.count("🔌 [SENDER]"), attempts + again, attempts, again,
             duplicates[-1] if duplicates else "0"))


def run_in_thread(args, workdir, children, outcome):
    try:
        outcome.append(run(args, workdir, children, Console()))
    except Stopped:
        pass
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        if not children.stopping:
            print("❌ [DEMO] %s" % exc, file=sys.stderr)
        outcome.append(1)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=Path, default=HERE.parent / "keys",
                        help="directory holding receiver_private.pem and receiver_public.pem")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory with the output files")
    parser.add_argument("--count", type=int, metavar="N",
                        help="send N generated messages instead of the demo's five")
    parser.add_argument("--chaos", metavar="SPEC",
                        help="start the broker in chaos mode, e.g. drop-ack=0.05,drop-confirm=0.05,"
                             "drop-delivery=0.02,disconnect=0.01,delay-ms=0-20")
    parser.add_argument("--chaos-seed", type=int, metavar="N", help="seed for --chaos")
    parser.add_argument("--broker-arg", action="append", default=[], metavar="ARG",
                        help="one more broker option, e.g. --broker-arg=--redelivery-interval=2 "
                             "(repeatable)")
    parser.add_argument("--http-port", type=int, metavar="PORT",
                        help="give the demo's broker a dashboard on this port (make chaos-demo: "
                             "15672) and say where to look on it")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="every status line of the receiver, for every message")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # SIGTERM cleans up like Ctrl-C
    workdir = Path(tempfile.mkdtemp(prefix="ciphermq-demo-"))
    children, outcome = Children(), []
    worker = threading.Thread(target=run_in_thread, name="demo-run",
                              args=(args, workdir, children, outcome))
    try:
        worker.start()
        worker.join()                   # interruptible: Ctrl-C lands here, in the main thread
        return outcome[0] if outcome else 1
    except KeyboardInterrupt:
        print("\n🛑 [DEMO] Interrupted: stopping everything it started", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        worker.join(RUN_TIMEOUT)
        if args.keep:
            print("📁 [DEMO] Files kept in %s" % workdir, flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
