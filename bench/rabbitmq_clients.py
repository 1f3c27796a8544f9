"""pika clients for the RabbitMQ side of the comparison, one process each.

All messages are the same 537-byte envelopes as CipherMQ's (see envelopes.py), on one queue
on the default exchange; consumers ack each message; publishers use publisher confirms.

pika's ``BlockingChannel.basic_publish`` on a confirming channel waits for each confirm, so
it cannot pipeline. Publishers therefore use pika's asynchronous ``SelectConnection`` with a
sliding window of unconfirmed messages, topped up from the confirm callback: the pipelined
window, or 1 for publish-and-wait-each (which also came out ~10% faster here than the
BlockingConnection loop). Consumers use ``SelectConnection`` too: with
``BlockingConnection`` each ``basic_ack`` flushes through the blocking adapter and the
consumer, not the broker, capped the rate at about half (5-8k vs 12-15k msg/s draining a
full queue here). Only the latency scenarios' paced publisher, at 1,000 msg/s, uses
``BlockingConnection`` with ``confirm_delivery()``.

Each client function runs in a child process (processes.ClientProcesses). It reports on
``ready`` once connected, waits for ``go``, and returns a dict.
"""
import logging
import time

import envelopes
import pika
from processes import CLIENT_TIMEOUT, ready_then_go, wait_until

logging.getLogger("pika").setLevel(logging.CRITICAL)    # start-up polling logs refusals


def params(info, heartbeat=None):
    """pika connection parameters for the node described by ``info``."""
    kwargs = {} if heartbeat is None else {"heartbeat": heartbeat}
    return pika.ConnectionParameters(host=info["host"], port=info["port"], **kwargs)


def _properties(persistent):
    """Message properties: delivery_mode 2 (persistent) or 1 (transient)."""
    return pika.BasicProperties(delivery_mode=2 if persistent else 1)


class _AsyncClient:
    """One SelectConnection (pika's asynchronous API) driven by callbacks until finished.

    ``run()`` opens the connection and a channel, calls ``on_channel(channel)`` (the subclass
    takes over from there), and returns ``result()`` once the subclass calls ``finish()``.
    A failure or CLIENT_TIMEOUT stops the ioloop and makes ``run()`` raise RuntimeError.
    """

    def __init__(self, info):
        self.params = params(info)
        self.conn = self.channel = None
        self.finished = False
        self.error = None

    def run(self):
        """Connect and run the ioloop until finished or failed; blocks up to CLIENT_TIMEOUT."""
        self.conn = pika.SelectConnection(
            self.params, on_open_callback=self.on_open, on_open_error_callback=self.on_failed,
            on_close_callback=self.on_closed)
        self.conn.ioloop.call_later(CLIENT_TIMEOUT, self.on_timeout)
        self.conn.ioloop.start()
        if self.error is not None:
            raise RuntimeError(f"{type(self).__name__} failed: {self.error}")
        return self.result()

    def on_open(self, conn):
        conn.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel):
        self.channel = channel
        self.on_channel(channel)

    def finish(self):
        """Called by the subclass when its work is done: close the connection, end run()."""
        self.finished = True
        self.conn.close()

    def fail(self, reason):
        self.error = self.error or reason
        if self.conn.is_open:
            self.conn.close()
        elif not self.conn.is_closed:
            self.conn.ioloop.stop()

    def on_timeout(self):
        if not self.finished:
            self.fail(f"timed out after {CLIENT_TIMEOUT:.0f} s")

    def on_failed(self, _conn, exc):
        self.error = f"connect failed: {exc!r}"
        self.conn.ioloop.stop()

    def on_closed(self, _conn, reason):
        if not self.finished and self.error is None:
            self.error = f"connection closed: {reason!r}"
        self.conn.ioloop.stop()


class _Consumer(_AsyncClient):
    """Consume ``expected`` messages with a prefetch, acking each one as it arrives.

    Reports ready once subscribed (the queue is empty until the publishers are told to go).
    With ``latency``, records time.monotonic() minus each envelope's ``sent_at``, in seconds.
    """

    def __init__(self, info, queue_name, expected, latency, prefetch, ready):
        super().__init__(info)
        self.queue_name = queue_name
        self.expected = expected
        self.latency = latency
        self.prefetch = prefetch
        self.ready = ready
        self.count = 0
        self.last_ack_at = None
        self.latencies = []

    def on_channel(self, channel):
        channel.basic_qos(prefetch_count=self.prefetch, callback=self.on_qos)

    def on_qos(self, _frame):
        self.channel.basic_consume(self.queue_name, self.on_message,
                                   callback=lambda _frame: self.ready.put("consumer"))

    def on_message(self, channel, method, _props, body):
        if self.latency:
            self.latencies.append(time.monotonic() - envelopes.sent_at(body))
        channel.basic_ack(method.delivery_tag)
        self.count += 1
        if self.count == self.expected:
            self.last_ack_at = time.monotonic()
            self.finish()

    def result(self):
        return {"count": self.count, "last_ack_at": self.last_ack_at,
                "latencies": self.latencies}


class _PipelinedPublisher(_AsyncClient):
    """Publish a list of bodies with at most ``window`` unconfirmed.

    Order of callbacks: channel -> confirm mode -> (ready, wait for go) -> fill the window ->
    each confirm tops the window up -> the last confirm finishes.
    """

    def __init__(self, info, queue_name, bodies, window, persistent, ready, go):
        super().__init__(info)
        self.queue_name = queue_name
        self.bodies = bodies
        self.window = window
        self.properties = _properties(persistent)
        self.ready, self.go = ready, go
        self.sent = 0
        self.pending = set()  # delivery tags published and not yet confirmed
        self.floor = 0  # every tag <= floor is confirmed
        self.first_publish_at = self.confirmed_at = None

    def on_channel(self, channel):
        channel.confirm_delivery(self.on_confirm, callback=self.on_confirm_mode)

    def on_confirm_mode(self, _frame):
        self.ready.put("publisher")
        if not self.go.wait(CLIENT_TIMEOUT):
            self.fail("never told to go")
            return
        self.first_publish_at = time.monotonic()
        self.fill_window()

    def fill_window(self):
        """Publish until ``window`` messages are unconfirmed or all are sent."""
        while self.sent < len(self.bodies) and len(self.pending) < self.window:
            self.channel.basic_publish("", self.queue_name, self.bodies[self.sent],
                                       self.properties)
            self.sent += 1
            self.pending.add(self.sent)  # delivery tags count from 1 on a confirming channel

    def on_confirm(self, frame):
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self.fail(f"broker nacked delivery tag {method.delivery_tag}")
            return
        if method.multiple:
            for tag in range(self.floor + 1, method.delivery_tag + 1):
                self.pending.discard(tag)
            self.floor = max(self.floor, method.delivery_tag)
        else:
            self.pending.discard(method.delivery_tag)
        if self.pending or self.sent < len(self.bodies):
            self.fill_window()
        elif not self.finished:
            self.confirmed_at = time.monotonic()
            self.finish()

    def result(self):
        return {"first_publish_at": self.first_publish_at, "confirmed_at": self.confirmed_at,
                "sent": self.sent}


def consume(info, queue_name, expected, latency, prefetch, ready, _go):
    """Consume and ack ``expected`` messages (see _Consumer); returns its result dict."""
    return _Consumer(info, queue_name, expected, latency, prefetch, ready).run()


def publish_pipelined(info, queue_name, token, first_seq, count, persistent, window, ready, go):
    """Publish ``count`` pre-built messages with pipelined confirms (see _PipelinedPublisher)."""
    bodies = envelopes.envelopes(token, first_seq, count)
    return _PipelinedPublisher(info, queue_name, bodies, window, persistent, ready, go).run()


def publish_paced(info, queue_name, token, count, rate, ready, go):
    """Publish ``count`` messages at ``rate`` per second, each stamped with its send time.

    Send i is due at start + i / rate, so after a stall the publisher sends without waiting
    until it is back on schedule. The stamp is the actual send time, so latency measures the
    broker path only, not publisher-side stalls. Each publish waits for its confirm (well
    under 1 ms at this rate).
    """
    properties = _properties(False)
    conn = pika.BlockingConnection(params(info))
    channel = conn.channel()
    channel.confirm_delivery()
    ready_then_go(ready, go, "publisher")
    start = time.monotonic()
    for seq in range(count):
        wait_until(start + seq / rate)
        channel.basic_publish("", queue_name, envelopes.envelope(token, seq, time.monotonic()),
                              properties)
    conn.close()
    return {"first_publish_at": start, "sent": count}


def hold_idle(info, count, ready, stop):
    """Open ``count`` AMQP connections (full handshake, no channel), hold them until ``stop``."""
    conns = [pika.BlockingConnection(params(info, heartbeat=0)) for _ in range(count)]
    ready.put("idle")
    stop.wait(CLIENT_TIMEOUT * 2)
    for conn in conns:
        conn.close()
    return {"held": len(conns)}
