"""redis-py clients for the Redis Streams side of the comparison, one process each.

A Redis work queue with acknowledgements is a stream and a consumer group: publishers
``XADD`` the same 537-byte envelopes as CipherMQ's (one field, ``e``); the consumer reads
with ``XREADGROUP ... COUNT <prefetch> BLOCK`` (the entries it reads sit in the group's
pending entries list until acked, like CipherMQ's unacked messages) and sends one ``XACK``
per message, all the acks of one read pipelined in one round trip.  An ``XADD`` reply is
the publish confirm: Redis answers it once the entry is in the stream (and, with
``appendfsync always``, once the append-only file is fsynced).

redis-py has no sliding window: a pipelined publisher sends ``window`` XADDs in one
pipeline (``transaction=False``) and reads their replies before the next batch -- the way
redis-py users pipeline.  Window 1 is one ``xadd`` call at a time (publish-and-wait-each).
hiredis, when installed, parses the replies (redis-py picks it up by itself).

Each client function runs in a child process (processes.ClientProcesses). It reports on
``ready`` once connected, waits for ``go``, and returns a dict.
"""
import socket
import time

import envelopes
import redis
from processes import CLIENT_TIMEOUT, ready_then_go, wait_until

GROUP = "bench"
FIELD = b"e"
BLOCK_MS = 1000             # XREADGROUP's wait before the consumer checks its deadline


def connection(info):
    """A redis-py client for the server described by ``info``."""
    return redis.Redis(host=info["host"], port=info["port"], socket_timeout=CLIENT_TIMEOUT)


def create_group(info, stream):
    """(Re)create ``stream`` empty, with the consumer group GROUP reading from its start."""
    client = connection(info)
    client.delete(stream)
    client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    client.close()


def length_and_delete(info, stream, delete=True):
    """The number of entries in ``stream``, deleting it if asked."""
    client = connection(info)
    length = client.xlen(stream)
    if delete:
        client.delete(stream)
    client.close()
    return length


def consume(info, stream, expected, latency, prefetch, ready, _go):
    """Read and XACK ``expected`` entries through the group; returns count, last ack, latencies.

    With ``latency``, records time.monotonic() minus each envelope's ``sent_at`` when the read
    that brought it returns, in seconds.
    """
    client = connection(info)
    client.ping()
    ready.put("consumer")
    count, latencies = 0, []
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while count < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"consumer got {count} of {expected} in {CLIENT_TIMEOUT:.0f} s")
        answer = client.xreadgroup(GROUP, "c1", {stream: ">"}, count=prefetch, block=BLOCK_MS)
        if not answer:
            continue
        entries = answer[0][1]
        now = time.monotonic()
        pipe = client.pipeline(transaction=False)
        for entry_id, fields in entries:
            if latency:
                latencies.append(now - envelopes.sent_at(fields[FIELD]))
            pipe.xack(stream, GROUP, entry_id)
        acked = pipe.execute()
        if sum(acked) != len(entries):
            raise RuntimeError(f"XACK acked {sum(acked)} of {len(entries)}")
        count += len(entries)
    last_ack_at = time.monotonic()
    client.close()
    return {"count": count, "last_ack_at": last_ack_at, "latencies": latencies}


def publish_pipelined(info, stream, token, first_seq, count, window, ready, go):
    """XADD ``count`` pre-built envelopes, ``window`` per pipeline (1: one call at a time)."""
    bodies = envelopes.envelopes(token, first_seq, count)
    client = connection(info)
    client.ping()
    ready_then_go(ready, go, "publisher")
    first_publish_at = time.monotonic()
    if window == 1:
        for body in bodies:
            client.xadd(stream, {FIELD: body})
    else:
        for start in range(0, count, window):
            pipe = client.pipeline(transaction=False)
            for body in bodies[start:start + window]:
                pipe.xadd(stream, {FIELD: body})
            pipe.execute()
    confirmed_at = time.monotonic()
    client.close()
    return {"first_publish_at": first_publish_at, "confirmed_at": confirmed_at, "sent": count}


def publish_paced(info, stream, token, count, rate, ready, go):
    """XADD ``count`` envelopes at ``rate`` per second, each stamped just before its write.

    As the other brokers' paced publishers: send i is due at start + i / rate, and each
    XADD waits for its reply.
    """
    client = connection(info)
    client.ping()
    ready_then_go(ready, go, "publisher")
    start = time.monotonic()
    for seq in range(count):
        wait_until(start + seq / rate)
        client.xadd(stream, {FIELD: envelopes.envelope(token, seq, time.monotonic())})
    client.close()
    return {"first_publish_at": start, "sent": count}


def hold_idle(info, count, ready, stop):
    """Open ``count`` connections, one ``PING`` / ``+PONG`` each, hold them until ``stop``.

    Raw TCP, as CipherMQ's idle holders: to Redis an idle redis-py connection is the same
    socket, and opening 1,000 through redis-py took ~10 s of the run.
    """
    socks = []
    for _ in range(count):
        sock = socket.create_connection((info["host"], info["port"]), timeout=CLIENT_TIMEOUT)
        sock.sendall(b"PING\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(64)
            if not chunk:
                raise RuntimeError("redis-server closed an idle connection")
            reply += chunk
        if reply != b"+PONG\r\n":
            raise RuntimeError(f"PING answered {reply!r}")
        socks.append(sock)
    ready.put("idle")
    stop.wait(CLIENT_TIMEOUT * 2)
    for sock in socks:
        sock.close()
    return {"held": len(socks)}
