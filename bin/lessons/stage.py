"""The stage every lesson runs on: a temporary directory and the processes started in it.

A lesson starts brokers, receivers and senders as real processes on free
ports (``--port 0``; the broker's log names the port it got), waits for what
it needs by reading their output -- never by sleeping -- and leaves nothing
behind: :meth:`Stage.close` kills whatever is still running and removes the
directory.  Every wait has a bound, so a broken lesson fails instead of
hanging.
"""
import json
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
BIN = REPO / "bin"
#: The longest any one step of a lesson may take before the lesson fails.
PATIENCE = 60.0


class LessonFailed(Exception):
    """What the lesson set out to show did not happen."""


class LessonNeeds(Exception):
    """The lesson needs something that is not installed here; the message says what."""


class Process:
    """A child process whose output lines are collected by a thread, to be waited for."""

    def __init__(self, argv, cwd, *, stream="stdout"):
        pipe = {stream: subprocess.PIPE}
        other = "stderr" if stream == "stdout" else "stdout"
        pipe[other] = subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, cwd=str(cwd), text=True, encoding="utf-8", **pipe)
        self.lines = []
        self._new = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(getattr(self.proc, stream),),
                                        name="lesson-reader", daemon=True)
        self._reader.start()

    def _read(self, pipe):
        for line in pipe:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def wait_for(self, pattern, timeout=PATIENCE):
        """The first new output line matching the regex ``pattern`` (a re.Match)."""
        while True:
            try:
                line = self._new.get(timeout=timeout)
            except queue.Empty:
                raise LessonFailed("no line matching %r within %.0f s"
                                   % (pattern, timeout)) from None
            if line is None:
                raise LessonFailed("the process ended before printing %r" % pattern)
            match = re.search(pattern, line)
            if match:
                return match

    def kill(self):
        """SIGKILL: no chance to save, flush or say goodbye."""
        self.proc.kill()
        self.proc.wait(PATIENCE)

    def stop(self):
        """SIGTERM, the polite stop (a broker shuts down in order); wait for it to end."""
        self.proc.terminate()
        self.wait()

    def wait(self, timeout=PATIENCE):
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code


class Broker(Process):
    """``python -m ciphermq.server --port 0 OPTIONS``; ``port`` is the one it logged."""

    def __init__(self, cwd, *options):
        super().__init__([sys.executable, "-m", "ciphermq.server", "--port", "0", *options],
                         cwd, stream="stderr")
        self.port = int(self.wait_for(r"listening on [\d.]+:(\d+)").group(1))


class Stage:
    """One lesson's world; use as a context manager."""

    def __init__(self, number, http_port=None):
        self.number = number
        self.http_port = http_port      # give every broker this dashboard port (one at a time)
        self.dir = Path(tempfile.mkdtemp(prefix="ciphermq-lesson-%d-" % number))
        self._children = []
        self._clusters = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        for child in self._children:
            if child.proc.poll() is None:
                child.kill()
        for cluster in self._clusters:
            cluster.stop(remove=True)       # by the pids it recorded, nothing else
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- what the student reads -------------------------------------------------

    def say(self, text):
        print("👉 [LESSON %d] %s" % (self.number, text), flush=True)

    def proves(self, condition, text, failure):
        """Print the lesson's proof line if ``condition`` holds; else fail, saying why."""
        if not condition:
            raise LessonFailed(failure)
        print("✅ [LESSON %d] %s" % (self.number, text), flush=True)

    # -- what it runs -------------------------------------------------------------

    def keys(self, show=False):
        """The receiver's RSA key pair in this stage (bin/RSA.py, once): (private, public)."""
        private, public = self.dir / "receiver_private.pem", self.dir / "receiver_public.pem"
        if not private.exists():
            self.run("RSA.py", "--out-dir", str(self.dir), show=show)
        return private, public

    def broker(self, *options):
        dashboard = ("--http-port", str(self.http_port)) if self.http_port else ()
        broker = Broker(self.dir, *options, *dashboard)
        self._children.append(broker)
        self.say("broker listening on 127.0.0.1:%d %s" % (broker.port, " ".join(options)))
        if self.http_port:
            self.say("📊 its dashboard: http://127.0.0.1:%d/" % self.http_port)
        return broker

    def cluster(self, size):
        """``size`` private RabbitMQ nodes clustered on free loopback ports, state in this
        stage (ciphermq/rabbitmq_nodes.py); stopped by :meth:`close`.  Raises
        :class:`LessonNeeds` if rabbitmq-server or pika is missing."""
        from ciphermq import rabbitmq_nodes
        try:
            rabbitmq_nodes.check_installed()
        except rabbitmq_nodes.RabbitMQUnavailable as exc:
            raise LessonNeeds("RabbitMQ: %s" % exc) from None
        cluster = rabbitmq_nodes.Cluster(self.dir / "rabbitmq", size,
                                         prefix="lesson%d-" % self.number)
        self.say("starting %d private RabbitMQ nodes on free ports (this takes 15-30 s)" % size)
        try:
            cluster.start()             # stops what it started if it fails
        except rabbitmq_nodes.RabbitMQUnavailable as exc:
            raise LessonFailed(str(exc)) from None
        self._clusters.append(cluster)
        return cluster

    def start(self, script, *args):
        """Start ``bin/<script>`` in the background; its stdout is shown as it comes."""
        process = Process([sys.executable, str(BIN / script), *args], self.dir)
        self._children.append(process)
        return process

    def run(self, script, *args, show=True, check=True):
        """Run ``bin/<script>`` (or ``-m module``) to the end; its stdout lines (shown), then
        its stderr lines (not shown)."""
        argv = [sys.executable, *((script,) if script.startswith("-") else (str(BIN / script),)),
                *args]
        done = subprocess.run(argv, cwd=str(self.dir), capture_output=True, text=True,
                              encoding="utf-8", timeout=PATIENCE)
        if show:
            for line in done.stdout.splitlines():
                print("   " + line, flush=True)
        if check and done.returncode != 0:
            raise LessonFailed("%s exited %d: %s" % (script, done.returncode,
                                                     done.stderr.strip()[-500:]))
        return done.stdout.splitlines() + done.stderr.splitlines()

    def client(self, broker, **options):
        from ciphermq.client import Client
        return Client("127.0.0.1", broker.port, timeout=PATIENCE, **options)

    def stored(self, name="received_messages.json"):
        """The receiver's output: one dict per stored message."""
        path = self.dir / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def verdict(self, record="sender_record.json", output="received_messages.json"):
        """The checker's tally of this stage's sender record, outbox and receiver output."""
        from ciphermq import checker
        tally = checker.check([self.dir / record], self.dir / output,
                              outboxes=[self.dir / "pending_messages.json"])
        for line in tally.report():
            print("   " + line, flush=True)
        return tally
