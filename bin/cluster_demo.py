"""Sender -> RabbitMQ cluster -> Receiver, and the node both use SIGKILLed mid-stream.

    make cluster && make cluster-demo
    python bin/cluster_demo.py [--dir .cluster] [--count 3000] [--kill-at 1000]

Uses the cluster ``make cluster`` started (``--dir``): a node killed by an earlier demo
is started again first.  The Receiver and then the Sender run as processes with every
node's ``--url`` (the same failover list, so both connect to the first node), on a
queue of the demo's own.  When the Receiver has saved ``--kill-at`` messages, the node
it names in its ``Subscribed to`` line -- the one both use -- is SIGKILLed: watch both
scripts lose it and fail over to the next URL.  Then the checker
(:mod:`ciphermq.checker`) reads the Sender's ``--record``, its outbox and the
Receiver's output and gives its verdict.  Finally the killed node is started again,
so the cluster is whole for the next run and ``make cluster-stop`` stops it.

Bounded: after ``--timeout`` seconds the scripts are killed and the demo fails.  It
stops what it started (the scripts; the node it killed it starts again), also on
Ctrl-C or SIGTERM.  Exit status 0 if every message was confirmed and stored exactly
once; 1 otherwise or if no cluster is running.
"""
import argparse
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Runnable as ``python bin/cluster_demo.py`` from a checkout, without installing the package.
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from ciphermq import checker, rabbitmq_nodes  # noqa: E402  (needs the path above)

SAVED = re.compile(r"\[RECEIVER\] (?:so far: )?(\d+) message\(s\) saved")
SUBSCRIBED = re.compile(r"Subscribed to \S+ on (\S+)")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="cluster_demo.py", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=".cluster", type=Path,
                        help="the state directory of `make cluster` (default %(default)s)")
    parser.add_argument("--keys", default="keys", type=Path,
                        help="directory of receiver_public.pem and receiver_private.pem "
                             "(default %(default)s; `make keys` makes them)")
    parser.add_argument("--count", type=int, default=3000, help="messages (default 3000)")
    parser.add_argument("--kill-at", type=int, default=1000, metavar="N",
                        help="SIGKILL the node once the receiver has saved N (default 1000)")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="give up (and kill the scripts) after this long (default 300)")
    args = parser.parse_args(argv)
    if not 0 < args.kill_at < args.count:
        parser.error("--kill-at must lie between 0 and --count")
    return args


class Script:
    """A script process; a thread queues ``(self, line)`` per stdout line, then ``(self, None)``."""

    def __init__(self, name, argv, lines):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, encoding="utf-8", cwd=str(HERE.parent))
        self._reader = threading.Thread(target=self._read, args=(lines,), daemon=True,
                                        name="demo-read-%s" % name)
        self._reader.start()

    def _read(self, lines):
        for line in self.proc.stdout:
            lines.put((self, line.rstrip("\n")))
        lines.put((self, None))

    def stop(self):
        """SIGKILL it if still running; reap it.  Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        self._reader.join(5)
        return code


def run(args, cluster, work, scripts):
    """Start the scripts, kill the node mid-stream, wait for both; the checker's Tally."""
    urls = [arg for url in cluster.urls for arg in ("--url", url)]
    name = "demo-%s" % uuid.uuid4().hex[:8]
    topology = ["--exchange", name + ".x", "--queue", name]
    lines = queue.Queue()
    record, output, outbox = work / "record.json", work / "received.json", work / "outbox.json"
    scripts.append(Script("receiver", ["bin/Receiver.py", *urls, *topology,
                                       "--private-key", str(args.keys / "receiver_private.pem"),
                                       "--output", str(output), "--max-messages",
                                       str(args.count)], lines))
    deadline = time.monotonic() + args.timeout
    killed, running = None, 1
    while running:
        try:
            script, line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("the scripts did not finish within %.0f s" % args.timeout) from None
        if line is None:
            running -= 1
            print("🏁 [DEMO] %s exited with %s" % (script.name, script.proc.wait()), flush=True)
            continue
        print(line, flush=True)
        subscribed = SUBSCRIBED.search(line)
        if subscribed and len(scripts) == 1:        # the receiver is in: start the sender
            scripts.append(Script("sender", ["bin/Sender.py", *urls, *topology,
                                             "--public-key",
                                             str(args.keys / "receiver_public.pem"),
                                             "--outbox", str(outbox), "--record", str(record),
                                             "--count", str(args.count)], lines))
            running += 1
            peer = subscribed.group(1)
        saved = SAVED.search(line)
        if saved and killed is None and int(saved.group(1)) >= args.kill_at:
            killed = next(n for n in cluster.nodes if peer.endswith(":%d" % n.port))
            print("💥 [DEMO] SIGKILL %s (pid %s, %s): the node both scripts are using"
                  % (killed.name, killed.beam_pid, peer), flush=True)
            killed.kill()
    if killed is None:
        print("⚠️ [DEMO] the run ended before %d messages were saved: no node was killed"
              % args.kill_at)
    return checker.check([record], output, outboxes=[outbox])


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        cluster = rabbitmq_nodes.Cluster.load(args.dir)
    except OSError:
        print("❌ [DEMO] no cluster recorded in %s: start one with 'make cluster'" % args.dir,
              file=sys.stderr)
        return 1
    scripts = []
    try:
        for node in cluster.revive():
            print("🐇 [DEMO] started %s again (an earlier demo killed it)" % node.name)
        with tempfile.TemporaryDirectory(prefix="cluster-demo-") as work:
            try:
                tally = run(args, cluster, Path(work), scripts)
            finally:
                codes = [script.stop() for script in scripts]     # before the files go
        for text in tally.report():
            print(text)
        return 0 if tally.ok and len(tally.acked) == args.count and codes == [0, 0] else 1
    except (TimeoutError, rabbitmq_nodes.RabbitMQUnavailable) as exc:
        print("❌ [DEMO] %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        try:
            for node in cluster.revive():
                print("🐇 [DEMO] started %s again: the cluster is whole" % node.name)
        except rabbitmq_nodes.RabbitMQUnavailable as exc:
            print("⚠️ [DEMO] could not start a node again: %s" % exc, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
