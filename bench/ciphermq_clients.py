"""Lean CipherMQ clients for the benchmark: raw sockets, pre-encoded bytes, newline framing.

Each function runs in a client process of its own (see processes.ClientProcesses).  They
are written so that the client is not what limits a run:

* every command line is encoded before ``go``; a publish is one ``bytes`` slice;
* replies are framed by newline from a buffer (one ``recv`` may hold many lines, and a
  line may span two), with one ``split`` per ``recv``, never one ``recv`` per line;
* a pipelined publisher keeps ``window`` publishes unanswered and tops the window up after
  every read; a consumer writes the ``ack`` lines for everything one read delivered in one
  ``sendall``.

No deadlock is possible with blocking sends: a publisher has at most ``window`` replies
(~30 bytes each) and a consumer at most ``prefetch`` acks outstanding, well inside one
socket buffer, so the broker never blocks writing to a client that is itself blocked
writing.  ``bench/relay.py`` measures what these clients reach against a trivial relay.
"""
import socket
import time

import envelopes
from processes import CLIENT_TIMEOUT, ready_then_go, wait_until

STALL_TIMEOUT = 20.0        # seconds without a byte from the broker: the run is stuck
PUBLISH = b"publish default_exchange default_key "
QUEUE = "default_queue"
RECV_BYTES = 256 * 1024


class Wire:
    """One blocking TCP connection with a newline-framing receive buffer."""

    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=STALL_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._partial = b""

    def send(self, data):
        self.sock.sendall(data)

    def read_lines(self):
        """Block for the next ``recv``; return the complete lines it finished (maybe none)."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except TimeoutError:
            raise RuntimeError(f"nothing from the broker for {STALL_TIMEOUT:.0f} s") from None
        if not data:
            raise ConnectionError("broker closed the connection")
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return lines

    def line(self):
        """The next single line (for lock-step exchanges, which see one line per read)."""
        while True:
            lines = self.read_lines()
            if lines:
                if len(lines) > 1:
                    raise RuntimeError(f"unexpected extra lines: {lines[1][:200]!r}")
                return lines[0]

    def close(self):
        self.sock.close()


def _expect(line, prefix, what):
    if not line.startswith(prefix):
        raise RuntimeError(f"{what}: expected {prefix!r}, got {line[:200]!r}")


def publish_pipelined(address, token, first_seq, count, window, ready, go):
    """Publish ``count`` envelopes keeping up to ``window`` unanswered (1: wait for each ACK).

    Returns ``first_publish_at`` and ``confirmed_at`` (the last ACK), monotonic seconds.
    """
    lines = [PUBLISH + body + b"\n" for body in envelopes.envelopes(token, first_seq, count)]
    wire = Wire(address)
    ready_then_go(ready, go, "publisher")
    sent = acked = 0
    started = time.monotonic()
    while acked < count:
        if sent < count and sent - acked < window:
            top = min(count, acked + window)
            wire.send(b"".join(lines[sent:top]) if top - sent > 1 else lines[sent])
            sent = top
        for line in wire.read_lines():
            _expect(line, b"ACK ", "publish")
            acked += 1
    confirmed_at = time.monotonic()
    wire.close()
    return {"first_publish_at": started, "confirmed_at": confirmed_at, "sent": count}


def consume(address, expected, prefetch, latency, ready, _go):
    """Consume and ack ``expected`` messages; returns when the last ``ACK_CONFIRMED`` arrives.

    With ``latency``, records (time of the read that brought a message) minus the envelope's
    ``sent_at``, in seconds, for every message.
    """
    wire = Wire(address)
    wire.send(b"consume %s %d\n" % (QUEUE.encode(), prefetch))
    _expect(wire.line(), b"Subscribed to queue", "consume")
    ready.put("consumer")
    confirmed = 0
    latencies = []
    while confirmed < expected:
        lines = wire.read_lines()
        now = time.monotonic()
        acks = []
        for line in lines:
            if line.startswith(b"Message: "):
                acks.append(b"ack " + line[9:line.index(b" ", 9)] + b"\n")
                if latency:
                    latencies.append(now - envelopes.sent_at(line))
            elif line.startswith(b"ACK_CONFIRMED "):
                confirmed += 1
            else:
                raise RuntimeError(f"consumer: unexpected line {line[:200]!r}")
        if acks:
            wire.send(b"".join(acks))
    last_ack_at = time.monotonic()
    wire.close()
    return {"count": confirmed, "last_ack_at": last_ack_at, "latencies": latencies}


def publish_paced(address, token, count, rate, ready, go):
    """Publish ``count`` envelopes at ``rate`` per second, each waiting for its ACK.

    Send i is due at start + i / rate, so after a stall the publisher catches up without
    waiting.  Each envelope is stamped with ``time.monotonic()`` immediately before it is
    written, so latency measures the broker path, not publisher-side stalls.
    """
    wire = Wire(address)
    ready_then_go(ready, go, "publisher")
    start = time.monotonic()
    for seq in range(count):
        wait_until(start + seq / rate)
        wire.send(PUBLISH + envelopes.envelope(token, seq, time.monotonic()) + b"\n")
        _expect(wire.line(), b"ACK ", "publish")
    wire.close()
    return {"first_publish_at": start, "sent": count}


def hold_idle(address, count, ready, stop):
    """Open ``count`` connections, ``ping`` on each and read its ``PONG``; hold until ``stop``."""
    wires = [Wire(address) for _ in range(count)]
    for wire in wires:
        wire.send(b"ping\n")
    for wire in wires:
        _expect(wire.line(), b"PONG", "idle ping")
    ready.put("idle")
    stop.wait(CLIENT_TIMEOUT * 2)
    for wire in wires:
        wire.close()
    return {"held": len(wires)}
