"""Start and stop a CipherMQ broker process (or the trivial relay) for one benchmark run.

The broker is ``python -m ciphermq.server`` from this checkout, on a free port of
127.0.0.1, logging at WARNING (so logging costs it nothing per message).  It is treated as a
black box: the harness only speaks the wire protocol to it and reads its RSS from /proc.

Readiness is a connect-and-``ping`` retry loop bounded by START_TIMEOUT; between tries the
harness waits on the broker process itself, so a broker that exits at start is reported at
once with its log.

``broker_source(tree)`` makes the brokers of a ``with`` block come from another source tree
(bench/compare.py: the same scenarios against the broker of an older commit).
"""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ciphermq.ports import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 15.0        # seconds for the broker to answer a ping
STOP_TIMEOUT = 15.0         # seconds for a SIGTERM'd broker to exit before SIGKILL
RETRY_TICK = 0.05           # seconds between connection attempts (spent waiting on the process)


class BrokerFailed(RuntimeError):
    """The broker did not start, or exited while a scenario was using it."""


class UnknownBrokerOption(BrokerFailed):
    """The harness asked for a broker option that the broker's source tree does not have."""


# Where running_broker starts brokers from, and the options that broker accepts (None: not
# checked).  Set only by broker_source, from the one thread that runs the scenarios.
_source = {"tree": REPO, "options": None}


@contextlib.contextmanager
def broker_source(tree, options=None):
    """Within the block, running_broker starts ``python -m ciphermq.server`` from the source
    tree at ``tree`` (see source_environment) instead of this checkout.  ``options``, if
    given, is the set of option names that broker accepts (``--port``, ...): running_broker
    then raises UnknownBrokerOption for any other instead of starting a broker that would
    exit on it.  The relay and the clients are not affected."""
    saved = dict(_source)
    _source.update(tree=os.path.abspath(tree), options=options)
    try:
        yield
    finally:
        _source.update(saved)


def source_environment(tree):
    """``(cwd, env)`` for a process that must import ``ciphermq`` from ``tree``: ``tree`` is
    its working directory and the head of PYTHONPATH.  Both come before this checkout's
    editable install, whose finder is the last on ``sys.meta_path``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [tree] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return tree, env


def _answers_ping(port, login=b""):
    """True if something on ``port`` answers ``ping`` with ``PONG`` (after ``login``'s reply)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(login + b"ping\n")
            expected = (b"AUTH_OK\n" if login else b"") + b"PONG\n"
            reply = b""
            while reply.count(b"\n") < expected.count(b"\n"):
                chunk = sock.recv(64)
                if not chunk:
                    return False
                reply += chunk
            return reply == expected
    except OSError:
        return False


def _log_tail(path, limit=2000):
    with open(path, "rb") as log_file:
        return log_file.read()[-limit:].decode(errors="replace")


@contextlib.contextmanager
def running_broker(*options, login=b""):
    """Run one broker with extra command-line ``options`` for the ``with`` block.

    Yields ``{"host", "port", "pid", "address"}``; ``pid`` is the broker's own process (use
    it for RSS).  Blocks up to START_TIMEOUT while starting; raises BrokerFailed if the
    broker exits or does not answer.  The broker is stopped (SIGTERM, then SIGKILL) when the
    block exits, however it exits.  With ``--users``, pass ``login=b"auth <name> <token>\\n"``
    for the readiness check.  Inside ``broker_source(tree, options)``, the broker comes from
    ``tree``, and an option it lacks raises UnknownBrokerOption before anything starts.
    """
    argv = ["-m", "ciphermq.server", "--log-level", "WARNING", *options]
    known = _source["options"]
    if known is not None:
        unknown = [arg.split("=")[0] for arg in argv
                   if arg.startswith("--") and arg.split("=")[0] not in known]
        if unknown:
            raise UnknownBrokerOption(f"the broker at {_source['tree']} has no option "
                                      f"{', '.join(unknown)}")
    with _running("broker", argv, login, _source["tree"]) as info:
        yield info


@contextlib.contextmanager
def running_relay():
    """Run bench/relay.py (the trivial relay) for the ``with`` block; as running_broker."""
    with _running("relay", [os.path.join(REPO, "bench", "relay.py")]) as info:
        yield info


@contextlib.contextmanager
def _running(name, argv, login=b"", tree=REPO):
    port = free_port()
    cwd, env = (REPO, None) if tree == REPO else source_environment(tree)
    with tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log") as log_file:
        proc = subprocess.Popen(
            [sys.executable, *argv, "--port", str(port)],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=log_file)
        try:
            _wait_ready(name, proc, port, log_file.name, login)
            try:
                yield {"host": "127.0.0.1", "port": port, "pid": proc.pid,
                       "address": ("127.0.0.1", port)}
            except (RuntimeError, OSError) as exc:      # a client failed: what did it see?
                raise RuntimeError(f"{exc}\n{name} log:\n{_log_tail(log_file.name)}") from exc
            if proc.poll() is not None:
                raise BrokerFailed(f"{name} exited with {proc.returncode} during the run:\n"
                                   f"{_log_tail(log_file.name)}")
        finally:
            _stop(proc)


def _wait_ready(name, proc, port, log_path, login=b""):
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers_ping(port, login):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerFailed(f"{name} did not answer on port {port} within "
                               f"{START_TIMEOUT:.0f} s:\n{_log_tail(log_path)}")
        try:
            code = proc.wait(timeout=min(RETRY_TICK, remaining))
        except subprocess.TimeoutExpired:
            continue
        raise BrokerFailed(f"{name} exited with {code} at start:\n{_log_tail(log_path)}")


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
