"""Scenario 6: end to end with real crypto, through the real scripts, and the RSA bound.

``bin/Receiver.py`` (decrypt, append, fsync, ack) is started first and subscribes; then
``bin/Sender.py --count N`` seals N messages and publishes them.  Both run as processes,
exactly as a user runs them, against a fresh broker, with fresh keys from ``bin/RSA.py``.

The rate is N divided by the time from the receiver's first ``📩 Received`` line to its
closing ``📊 ... N message(s) saved`` line, which it prints once the confirmations of its
last acks are in: first delivery to last ``ACK_CONFIRMED``, the steady state of the whole
pipeline.  ``wall_msg_per_s`` also counts the sender's start-up and its sealing of every
message into its outbox before the first publish.  Lines are timestamped as the harness
reads them from the receiver's stdout.

Per-message RSA is the document's way (a fresh session key, so one RSA-OAEP decrypt per
message at the receiver); ``--key-reuse KEY_REUSE`` lets one session key serve that many
messages.  The receiver's bound is measured in the same run: RSA-OAEP-2048 (SHA-256, as
v2 envelopes use) decrypts per second in one process, doing nothing else.
"""
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from ciphermq_broker import REPO, running_broker
from processes import CLIENT_TIMEOUT, ClientProcesses

SENDER = os.path.join(REPO, "bin", "Sender.py")
RECEIVER = os.path.join(REPO, "bin", "Receiver.py")
RSA_SCRIPT = os.path.join(REPO, "bin", "RSA.py")
KEY_REUSE = 100             # messages per session key in the key-reuse run


def missing_scripts():
    """Why scenario 6 cannot run here (a reason to print), or None if it can."""
    if not (os.path.exists(SENDER) and os.path.exists(RECEIVER)):
        return "needs bin/Sender.py and bin/Receiver.py"
    return None


class _Script:
    """One script process whose stdout lines are read, with the time each arrived."""

    def __init__(self, argv):
        env = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, *argv], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8")
        self.lines = []             # (time.monotonic() when read, line): appended by the reader
        self.subscribed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
            if "Subscribed to" in line:
                self.subscribed.set()

    def wait(self, what):
        """Wait for exit (bounded); raise RuntimeError unless it exited 0."""
        try:
            code = self.proc.wait(CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(CLIENT_TIMEOUT)
        if code != 0:
            raise RuntimeError(f"{what} exited with {code}:\n{self.tail()}")

    def first(self, text):
        return next(at for at, line in self.lines if text in line)

    def last(self, text):
        return [at for at, line in self.lines if text in line][-1]

    def tail(self, count=15):
        return "\n".join(line for _, line in self.lines[-count:])

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(CLIENT_TIMEOUT)
        self.proc.stdout.close()


def _await_subscribed(receiver):
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while not receiver.subscribed.wait(0.2):
        if receiver.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"receiver did not subscribe:\n{receiver.tail()}")


def _e2e(msgs, key_reuse, urls=None):
    """One run of the scripts: over a fresh CipherMQ broker, or over ``urls`` (RabbitMQ,
    on a fresh quorum queue of the run's own)."""
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-e2e-"))
        if urls is None:
            broker = stack.enter_context(running_broker())
            where = ["--port", str(broker["port"])]
        else:
            name = "bench-e2e-%s" % uuid.uuid4().hex[:8]
            where = [a for url in urls for a in ("--url", url)]
            where += ["--exchange", name + ".x", "--queue", name]
        return _e2e_in(work, msgs, key_reuse, where)


def _e2e_in(work, msgs, key_reuse, where):
    """Keys, then the Receiver (subscribed), then the Sender; the run's figures."""
    keys = os.path.join(work, "keys")
    subprocess.run([sys.executable, RSA_SCRIPT, "--out-dir", keys], cwd=REPO, check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    receiver = _Script([RECEIVER, *where, "--max-messages", str(msgs),
                        "--private-key", os.path.join(keys, "receiver_private.pem"),
                        "--output", os.path.join(work, "received.json")])
    sender = None
    try:
        _await_subscribed(receiver)
        started = time.monotonic()
        sender = _Script([SENDER, *where, "--count", str(msgs),
                          "--key-reuse", str(key_reuse),
                          "--public-key", os.path.join(keys, "receiver_public.pem"),
                          "--outbox", os.path.join(work, "outbox.json")])
        sender.wait("Sender.py")
        receiver.wait("Receiver.py")
    finally:
        receiver.kill()
        if sender is not None:
            sender.kill()
    first = receiver.first("[RECEIVER] Received message")
    last = receiver.last(f"{msgs} message(s) saved")
    seconds = last - first
    return {"msgs": msgs, "key_reuse": key_reuse, "seconds": round(seconds, 3),
            "msg_per_s": round(msgs / seconds), "wall_msg_per_s": round(msgs / (last - started))}


def scenario_per_message_rsa(sizes):
    """Sender -> broker -> Receiver with a fresh session key (one RSA decrypt) per message."""
    return _e2e(sizes["e2e_rsa_msgs"], key_reuse=1)


def scenario_key_reuse(sizes):
    """As per-message RSA, with ``Sender.py --key-reuse KEY_REUSE``."""
    return _e2e(sizes["e2e_reuse_msgs"], key_reuse=KEY_REUSE)


def rabbitmq_per_message_rsa(urls, sizes):
    """The same scripts, per-message RSA, over RabbitMQ at ``urls`` (``--url`` each)."""
    return _e2e(sizes["e2e_rsa_msgs"], key_reuse=1, urls=urls)


def rabbitmq_key_reuse(urls, sizes):
    """The same scripts, session-key reuse, over RabbitMQ at ``urls``."""
    return _e2e(sizes["e2e_reuse_msgs"], key_reuse=KEY_REUSE, urls=urls)


def _decrypt_loop(seconds, ready, go):
    """Client process: RSA-OAEP-2048 decrypts for ``seconds``, one thread; returns the rate."""
    from Crypto.Cipher import PKCS1_OAEP
    from Crypto.Hash import SHA256
    from Crypto.PublicKey import RSA
    from Crypto.Random import get_random_bytes

    key = RSA.generate(2048)
    cipher = PKCS1_OAEP.new(key, hashAlgo=SHA256)
    wrapped = [cipher.encrypt(get_random_bytes(16)) for _ in range(16)]
    ready.put("rsa")
    go.wait(CLIENT_TIMEOUT)
    done = 0
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline:
        for blob in wrapped:
            cipher.decrypt(blob)
        done += len(wrapped)
    return {"decrypts": done, "seconds": time.monotonic() - started}


def rsa_decrypt_bound(sizes):
    """RSA-OAEP-2048 decrypts per second in one process: the per-message receiver's bound."""
    with ClientProcesses() as procs:
        procs.start(_decrypt_loop, sizes["rsa_seconds"])
        procs.wait_ready(1)
        procs.go.set()
        (result,) = procs.collect(1)
    return {"decrypts": result["decrypts"], "seconds": round(result["seconds"], 3),
            "decrypts_per_s": round(result["decrypts"] / result["seconds"])}
