"""Helpers for tests that run bin/Sender.py, bin/Receiver.py and bin/demo.py as processes.

Fixtures defined here are imported by the test modules that use them.
"""
import contextlib
import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ciphermq import crypto
from ciphermq import keys as keyfiles

REPO = Path(__file__).resolve().parent.parent
SENDER = str(REPO / "bin" / "Sender.py")
RECEIVER = str(REPO / "bin" / "Receiver.py")
DEMO = str(REPO / "bin" / "demo.py")
#: Generous bound for a process to do something it must do (never a sleep).
PATIENCE = 20.0
#: How long the rest of an exited process's output may take to arrive.
WAIT_FOR_OUTPUT = 5.0


def require_openssl():
    """Skip the calling test without the ``openssl`` command -- under CI=true, fail it: CI
    must not go green with every TLS and mutual-TLS test skipped."""
    if shutil.which("openssl") is None:
        reason = "the openssl command is needed to make test certificates"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: a missing component fails, it does not skip)")
        pytest.skip(reason)


def load_script(name):
    """Import bin/<name>.py as a module (for its constants and functions)."""
    spec = importlib.util.spec_from_file_location(name, str(REPO / "bin" / ("%s.py" % name)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """A 1024-bit receiver key pair (fast to make and use): (private_path, public_path)."""
    return keyfiles.write_rsa_key_pair(tmp_path_factory.mktemp("keys"), bits=1024)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """Two throwaway CAs made by bin/certs.py, each with server and alice certificates:
    (trusted, rogue)."""
    require_openssl()
    made = []
    for name in ("certs", "rogue"):
        out = tmp_path_factory.mktemp(name)
        subprocess.run([sys.executable, str(REPO / "bin" / "certs.py"), "--out-dir", str(out),
                        "--client", "alice"], check=True, capture_output=True, timeout=60)
        made.append(out)
    return made


def script_env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    env.pop("CIPHERMQ_CRASH_AT", None)
    env.update(extra)
    return env


def sender_args(port, keys, outbox, *args):
    return [sys.executable, SENDER, "--port", str(port), "--public-key", str(keys[1]),
            "--outbox", str(outbox), *args]


def run_sender(port, keys, outbox, *args, timeout=PATIENCE, cwd=None):
    """Run the Sender to completion; return the CompletedProcess (text output)."""
    return subprocess.run(sender_args(port, keys, outbox, *args), capture_output=True,
                          text=True, timeout=timeout, env=script_env(), cwd=cwd)


def receiver_args(port, keys, output, *args):
    return [sys.executable, RECEIVER, "--port", str(port), "--private-key", str(keys[0]),
            "--output", str(output), *args]


class ScriptProcess:
    """A script in a subprocess; a thread reads its stdout into ``lines`` and a queue.

    With ``log``, stdout is also appended to that file exactly as written (a
    torn last line stays torn), complete once :meth:`wait` has returned.
    """

    def __init__(self, argv, env=None, cwd=None, log=None):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env or script_env(), cwd=cwd)
        self._log = open(log, "a", encoding="utf-8") if log is not None else None
        self.lines = []
        self._fresh = queue.Queue()
        self._stderr = []
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read(self):
        for line in self.proc.stdout:
            if self._log is not None:
                self._log.write(line)
            self.lines.append(line.rstrip("\n"))
            self._fresh.put(line.rstrip("\n"))
        if self._log is not None:
            self._log.close()
        self._fresh.put(None)

    def _read_stderr(self):
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stdout(self):
        return "\n".join(self.lines)

    @property
    def stderr(self):
        return "".join(self._stderr)

    def wait_for(self, text, timeout=PATIENCE, count=1):
        """Block until ``count`` new stdout lines contain ``text``; return the last of them.

        Raises AssertionError if the process ends first or ``timeout`` passes
        without a matching line.
        """
        for _ in range(count - 1):
            self.wait_for(text, timeout)
        while True:
            try:
                line = self._fresh.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError("no line with %r within %.0f s; output:\n%s\n%s"
                                     % (text, timeout, self.stdout, self.stderr)) from None
            if line is None:
                raise AssertionError("process ended (%s) before a line with %r; output:\n%s\n%s"
                                     % (self.proc.wait(), text, self.stdout, self.stderr))
            if text in line:
                return line

    def discard_unread(self):
        """Skip the lines read but not yet waited for: the next wait_for sees newer ones only."""
        while True:
            try:
                line = self._fresh.get_nowait()
            except queue.Empty:
                return
            if line is None:                # the end of the output stays visible
                self._fresh.put(None)
                return

    def wait(self, timeout=PATIENCE):
        """Wait for the exit; return the status, after the output has been read."""
        code = self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(WAIT_FOR_OUTPUT)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        return self.wait()

    def close(self):
        """Kill the process and release its pipes.

        A pipe whose reader thread is still blocked (a grandchild holds its
        other end) is left to that daemon thread: closing it here would wait
        for the thread's lock forever.
        """
        self.kill()
        if not any(thread.is_alive() for thread in self._threads):
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture
def spawn():
    """Start ScriptProcesses; every one is killed and reaped at teardown."""
    with contextlib.ExitStack() as stack:
        def start(argv, **kwargs):
            process = ScriptProcess(argv, **kwargs)
            stack.callback(process.close)
            return process
        yield start


def read_records(path):
    """Every line of a JSON-lines output file, parsed (fails on a line that is not JSON)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(True), 1):
        assert line.endswith("\n"), "line %d of %s is torn: %r" % (number, path, line)
        records.append(json.loads(line))
    return records


def finished_records(path):
    """The lines of a JSON-lines file a writer may still be appending to, parsed, all but an
    unfinished last one (for polling while a receiver runs; read_records once it has stopped)."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def assert_exactly_once(records, expected_messages):
    """The output holds each expected message once, and nothing else."""
    ids = [record["message_id"] for record in records]
    assert len(ids) == len(set(ids)), "duplicate ids in the output"
    messages = sorted(record["message"] for record in records)
    assert messages == sorted(expected_messages)


def publish_sealed(address, keys, texts, **envelope_changes):
    """Seal ``texts`` for the test receiver and publish them; return their ids, in order."""
    from ciphermq.client import Client
    sealer = crypto.Sealer(keys[1])
    envelopes = [dict(sealer.seal(text), **envelope_changes) for text in texts]
    with Client(*address, timeout=PATIENCE) as client:
        replies = client.publish_many([("default_exchange", "default_key", env)
                                       for env in envelopes])
        for reply in replies:
            reply.result(PATIENCE)
    return [env["message_id"] for env in envelopes]


def queue_stats(server, queue="default_queue"):
    return server.broker.stats()["queues"][queue]


def intact_ids(path):
    """The ids of the complete records in an output file (a torn last line ignored)."""
    ids = set()
    if Path(path).exists():
        for line in Path(path).read_bytes().splitlines(True):
            if line.endswith(b"\n"):
                ids.add(json.loads(line)["message_id"])
    return ids
