"""Shared fixtures: a real broker on port 0, and a raw line-oriented test client.

The fixtures for running the scripts as processes (``keys``, ``certs``,
``spawn``) live in tests/scripts.py, loaded as a plugin below.
"""
import contextlib
import json
import socket
import ssl
import threading
import time
import uuid

import pytest
from processes import BrokerProcess
from proxy import FaultProxy

from ciphermq.config import ServerConfig
from ciphermq.server import BrokerServer

pytest_plugins = ["scripts", "rabbitmq"]

#: How long a test waits for a line it expects before failing (not a sleep).
WAIT = 5.0


class Wire:
    """A minimal client speaking the raw protocol, for tests.

    It frames replies by newline itself, so a test sees exactly the bytes the
    broker wrote.
    """

    def __init__(self, address, timeout=WAIT, tls=None):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:         # an ssl.SSLContext: one thread per Wire, so SSLSocket is fine
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self._buffer = b""

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def line(self, timeout=WAIT):
        """The next line (bytes, without the newline); raises socket.timeout if none comes."""
        self.sock.settimeout(timeout)
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("broker closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def text(self, timeout=WAIT):
        return self.line(timeout).decode()

    def call(self, command):
        """Send one command line and return its reply as str."""
        self.send(command if command.endswith("\n") else command + "\n")
        return self.text()

    def receive_and_ack(self, count):
        """Consume ``count`` distinct messages, acking each; return ids in arrival order.

        Returns once every one of them is confirmed (pushes and confirmations
        interleave on a consuming connection, so lines are told apart by prefix).
        """
        received, confirmed = [], set()
        while len(confirmed) < count:
            line = self.text()
            if line.startswith("ACK_CONFIRMED "):
                confirmed.add(line.split(" ", 1)[1])
                continue
            message_id, _ = parse_message(line)
            received.append(message_id)
            self.send("ack %s\n" % message_id)
        return received

    def settled(self, queue="default_queue"):
        """``(pushed, counts)``: ask ``stats`` on this (maybe consuming) connection and read up
        to its reply; ``pushed`` are the Message lines that came first, ``counts`` the queue's
        ``{"ready", "unacked", ...}``.

        This is how a test shows that nothing more will arrive without waiting for it: a
        queue with nothing ready and nothing unacked beyond what the test holds has nothing
        left to push (short of a redelivery, which these tests keep 30 s away).
        """
        self.send("stats\n")
        pushed = []
        while True:
            line = self.text()
            if line.startswith("{"):
                return pushed, json.loads(line)["queues"][queue]
            if line.startswith("Message: "):
                pushed.append(line)
            # any other line (a late ACK_CONFIRMED) is the test's own business

    def expect_nothing(self, within=0.3):
        """Assert no line arrives within ``within`` seconds (a bounded read, not a sleep)."""
        try:
            line = self.line(timeout=within)
        except socket.timeout:
            return
        raise AssertionError("unexpected line: %r" % line)

    def closed_by_peer(self, timeout=WAIT):
        """The bytes the broker sent before it closed this connection (EOF or reset).

        Raises AssertionError if it is still open after ``timeout``.  Returning
        what arrived lets a test assert the close came *instead of* a reply
        (``assert b"ACK" not in client.closed_by_peer()``), not merely after one.
        """
        received = self._buffer
        self._buffer = b""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return received
                received += chunk
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return received
        except socket.timeout:
            raise AssertionError("still open after %.1f s; received %r"
                                 % (timeout, received)) from None

    def close(self):
        self.sock.close()


def envelope(message_id=None, **extra):
    """A syntactically valid envelope (the broker never decrypts it)."""
    env = {"message_id": message_id or str(uuid.uuid4()), "enc_session_key": "a2V5",
           "nonce": "bm9uY2U=", "tag": "dGFn", "ciphertext": "Y2lwaGVy"}
    env.update(extra)
    return env


def publish_line(message_id=None, exchange="default_exchange", key="default_key", **extra):
    return "publish %s %s %s\n" % (exchange, key, json.dumps(envelope(message_id, **extra)))


def parse_message(line):
    """Split a pushed ``Message: <id> <json>`` line into (id, dict)."""
    text = line.decode() if isinstance(line, bytes) else line
    prefix, message_id, body = text.split(" ", 2)
    assert prefix == "Message:", text
    return message_id, json.loads(body)


@pytest.fixture
def start_server():
    """Start real brokers on free ports; every one is stopped (and joined) at teardown."""
    with contextlib.ExitStack() as stack:
        def start(**overrides):
            overrides.setdefault("port", 0)
            clock = overrides.pop("clock", time.monotonic)
            server = BrokerServer(ServerConfig(**overrides), clock=clock)
            stack.callback(server.stop)
            return server.start()
        yield start


@pytest.fixture
def server(start_server):
    """A broker with a short redelivery interval so timing tests stay quick."""
    return start_server(redelivery_interval=30.0)


@pytest.fixture
def connect(server):
    """Open Wire clients to the ``server`` fixture; all closed at teardown."""
    with contextlib.ExitStack() as stack:
        def open_client(address=None):
            client = Wire(address or server.address)
            stack.callback(client.close)
            return client
        yield open_client


class FakeClock:
    """A clock a test moves by hand: ``clock.advance(31)``.

    It also counts how often it is read (the redelivery timer's reads aside), so a test
    can wait until a connection has looked at the time again: ``clock.wait_for_reads(2)``.
    """

    def __init__(self, start=1000.0):
        self.now = start
        self.read = threading.Condition()   # guards reads; notified on every read
        self.reads = 0

    def __call__(self):
        if threading.current_thread().name != "ciphermq-redelivery":
            with self.read:
                self.reads += 1
                self.read.notify_all()
        return self.now

    def wait_for_reads(self, count, timeout=WAIT):
        """Block until the clock has been read ``count`` more times; False on timeout."""
        with self.read:
            target = self.reads + count
            return self.read.wait_for(lambda: self.reads >= target, timeout)

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def broker_process():
    """Start ``python -m ciphermq.server`` processes; all killed (if still running) at teardown."""
    started = []

    def start(*args, port=0):
        process = BrokerProcess(*args, port=port)
        started.append(process)
        return process
    yield start
    for process in started:
        process.close()


@pytest.fixture
def proxy_to(server):
    """Fault proxies in front of the ``server`` fixture; closed at teardown."""
    with contextlib.ExitStack() as stack:
        def start():
            proxy = FaultProxy(server.address).start()
            stack.callback(proxy.close)
            return proxy
        yield start
