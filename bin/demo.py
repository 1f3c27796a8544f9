"""CipherMQ end to end in one command (``make demo``): broker, receiver, sender.

    python bin/demo.py                  # keys from keys/ (``make keys`` makes them)
    python bin/demo.py --keep           # keep the temporary directory with the files

Starts a broker on a free port (``python -m ciphermq.server --port 0``, whose
log names the port), a receiver that stops after the demo's messages, and a
sender; waits for the receiver to exit (not for a fixed time), prints what
was stored, and stops everything it started -- also on Ctrl-C or SIGTERM.
The receiver's output and the sender's outbox go to a temporary directory,
so the checkout stays clean.  Exit status 0 if every message arrived, 130 if
interrupted.

Threads: the demo itself runs in ``demo-run``; the main thread only waits for
it, so that Ctrl-C (always delivered to the main thread) never lands in the
middle of starting a child: :class:`Children` starts each one under a lock,
and stopping takes the same lock, so no child can be started unseen.
"""
import argparse
import json
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


class Stopped(Exception):
    """The demo is being stopped: start nothing more."""


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


def start_broker(children, workdir):
    """Start the broker on a free port; return the port it logged."""
    process = children.start([sys.executable, "-m", "ciphermq.server", "--port", "0"],
                             stderr=subprocess.PIPE, text=True, cwd=str(workdir))
    lines = queue.Queue()

    def drain():            # keeps reading the log, so the broker never blocks on the pipe
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, name="demo-broker-log", daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            raise RuntimeError("the broker did not report its port in time") from None
        if line is None:
            raise RuntimeError("the broker exited at start (status %s)" % process.wait())
        match = re.search(r"listening on [\d.]+:(\d+)", line)
        if match:
            return int(match.group(1))


def run(args, workdir, children):
    """The demo proper; returns the exit status."""
    private_key = args.keys / "receiver_private.pem"
    public_key = args.keys / "receiver_public.pem"
    for key in (private_key, public_key):
        if not key.exists():
            print("❌ [DEMO] %s is missing: run `make keys` first" % key, file=sys.stderr)
            return 1
    output = workdir / "received_messages.json"
    port = start_broker(children, workdir)
    print("🟢 [DEMO] Broker listening on 127.0.0.1:%d" % port, flush=True)
    receiver = children.start(
        [sys.executable, str(HERE / "Receiver.py"), "--port", str(port),
         "--private-key", str(private_key), "--output", str(output),
         "--max-messages", str(len(MESSAGES))], cwd=str(workdir))
    command = [sys.executable, str(HERE / "Sender.py"), "--port", str(port),
               "--public-key", str(public_key), "--outbox", str(workdir / "pending_messages.json")]
    for message in MESSAGES:
        command += ["--message", message]
    if children.start(command, cwd=str(workdir)).wait(RUN_TIMEOUT) != 0:
        raise RuntimeError("the sender failed")
    if receiver.wait(RUN_TIMEOUT) != 0:
        raise RuntimeError("the receiver failed")
    stored = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    print("\n📜 [DEMO] %s holds %d message(s):" % (output.name, len(stored)))
    for record in stored:
        print("   %s  %s  %s" % (record["timestamp"], record["message_id"], record["message"]))
    return 0 if sorted(r["message"] for r in stored) == sorted(MESSAGES) else 1


def run_in_thread(args, workdir, children, outcome):
    try:
        outcome.append(run(args, workdir, children))
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
    args = parser.parse_args(argv)
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
