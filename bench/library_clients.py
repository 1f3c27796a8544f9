"""Clients written with ``ciphermq.client``, the library the scripts use (issue 15).

The raw-socket clients (ciphermq_clients.py) show what the broker can do; these show what a
user gets from the library they would actually call, to compare with pika against RabbitMQ
(rabbitmq_clients.py).  They use only the public API, the way ``ciphermq.sender`` and
``ciphermq.receiver`` do:

* the publisher keeps ``window`` publishes in flight: ``publish_many`` fills the window in one
  write, ``Reply.result`` waits for the oldest ``ACK <id>``, every reply already in is
  collected, and the window is filled again.  Window 1 is ``Client.publish``, which blocks for
  its ACK (publish-and-wait-each, as the design document's Sender);
* the consumer subscribes with a prefetch, takes every delivery that has arrived from
  ``Client.deliveries`` and acks each one with its own ``ack`` line, all of them in one
  ``ack_many`` write; the run ends at its last ``ACK_CONFIRMED``.

Each function runs in a client process of its own (processes.ClientProcesses).
"""
import collections
import queue
import time

import envelopes
from processes import CLIENT_TIMEOUT, ready_then_go

from ciphermq import client

EXCHANGE, ROUTING_KEY, QUEUE = "default_exchange", "default_key", "default_queue"
ACK_BATCH = 2000            # most acks per write (the prefetch bounds it anyway)


def _connect(address):
    return client.Client(*address, timeout=CLIENT_TIMEOUT, heartbeat=None)


def publish(address, token, first_seq, count, window, ready, go):
    """Publish ``count`` envelopes keeping ``window`` in flight; returns the run's times."""
    bodies = envelopes.envelopes(token, first_seq, count)
    with _connect(address) as conn:
        conn.ping()
        ready_then_go(ready, go, "publisher")
        first_publish_at = time.monotonic()
        if window == 1:
            for body in bodies:
                conn.publish(EXCHANGE, ROUTING_KEY, body, timeout=CLIENT_TIMEOUT)
        else:
            in_flight = collections.deque()
            sent = 0
            while sent < count or in_flight:
                room = min(window - len(in_flight), count - sent)
                if room > 0:
                    in_flight.extend(conn.publish_many(
                        [(EXCHANGE, ROUTING_KEY, body) for body in bodies[sent:sent + room]]))
                    sent += room
                in_flight.popleft().result(CLIENT_TIMEOUT)
                while in_flight and in_flight[0].done():
                    in_flight.popleft().result()
        confirmed_at = time.monotonic()
    return {"first_publish_at": first_publish_at, "confirmed_at": confirmed_at, "sent": count}


def consume(address, expected, prefetch, ready, _go):
    """Consume and ack ``expected`` messages; returns the count and the last confirm's time."""
    with _connect(address) as conn:
        conn.consume(QUEUE, prefetch, timeout=CLIENT_TIMEOUT)
        ready.put("consumer")
        count, confirms = 0, collections.deque()
        while count < expected:
            try:
                delivery = conn.deliveries.get(timeout=CLIENT_TIMEOUT)
            except queue.Empty:
                raise RuntimeError(f"consumer got {count} of {expected}") from None
            batch = [delivery]
            while len(batch) < ACK_BATCH:
                try:
                    batch.append(conn.deliveries.get_nowait())
                except queue.Empty:
                    break
            if None in batch:
                raise RuntimeError(f"connection ended after {count} of {expected}")
            confirms.extend(conn.ack_many([d.message_id for d in batch]))
            count += len(batch)
            while confirms and confirms[0].done():
                confirms.popleft().result()
        for reply in confirms:
            reply.result(CLIENT_TIMEOUT)
        last_ack_at = time.monotonic()
    return {"count": count, "last_ack_at": last_ack_at}
