"""CipherMQ's side of each scenario: one fresh broker process per run, lean clients.

Every function takes ``sizes`` (see scenarios.SIZES) and returns one run's figures as a
plain dict, with the same keys as the RabbitMQ side (``msg_per_s``, ``p99_ms``, ``rss_mb``).
Each run starts its own broker (``ciphermq_broker.running_broker``), so runs do not see
each other's queues, dedup memory or journal; messages go through ``default_exchange`` /
``default_key`` to ``default_queue``.
"""
import json
import tempfile

import ciphermq_clients as clients
import envelopes
import library_clients
from ciphermq_broker import running_broker, running_relay
from processes import ClientProcesses, latency_figures, rss_mib, split

WINDOW = 2000               # publishes in flight per pipelined publisher (as the RabbitMQ side)
PREFETCH = 2000             # unacked deliveries per consumer (as the RabbitMQ side)
LATENCY_RATE = 1000         # messages per second in the latency scenarios
IDLE_CLIENTS = 1000
IDLE_HOLDERS = 4            # processes that share the idle connections


def _throughput(address, msgs, publishers=1, window=WINDOW, prefetch=PREFETCH):
    """``msgs`` from ``publishers`` processes to one consumer: msg/s from the first publish
    to the last ``ACK_CONFIRMED``."""
    token = envelopes.new_run_token()
    with ClientProcesses() as procs:
        procs.start(clients.consume, address, msgs, prefetch, False)
        first_seq = 0
        for count in split(msgs, publishers):
            procs.start(clients.publish_pipelined, address, token, first_seq, count, window)
            first_seq += count
        procs.wait_ready(1 + publishers)
        procs.go.set()
        results = procs.collect(1 + publishers)
    consumer = next(r for r in results if "count" in r)
    started = min(r["first_publish_at"] for r in results if "first_publish_at" in r)
    seconds = consumer["last_ack_at"] - started
    return {"msgs": msgs, "seconds": round(seconds, 3), "msg_per_s": round(msgs / seconds)}


def _publish_only(address, msgs):
    """Publish ``msgs`` pipelined with nobody consuming; returns seconds to the last ACK."""
    with ClientProcesses() as procs:
        procs.start(clients.publish_pipelined, address, envelopes.new_run_token(), 0, msgs,
                    WINDOW)
        procs.wait_ready(1)
        procs.go.set()
        (result,) = procs.collect(1)
    ready = _stats(address)["queues"]["default_queue"]["ready"]
    if ready != msgs:
        raise RuntimeError(f"default_queue holds {ready} of {msgs} messages")
    return result["confirmed_at"] - result["first_publish_at"]


def _stats(address):
    """The broker's ``stats`` reply, parsed."""
    wire = clients.Wire(address)
    try:
        wire.send(b"stats\n")
        return json.loads(wire.line())
    finally:
        wire.close()


def _latency(address, seconds, pid=None, idle_clients=0):
    """Publish at LATENCY_RATE for ``seconds``, each waiting for its ACK; p50/p99/max in ms.

    With ``idle_clients``, that many idle connections (each has sent ``ping``) are opened
    first, across IDLE_HOLDERS processes, and held for the whole measurement.
    """
    msgs = int(LATENCY_RATE * seconds)
    extra = {}
    with ClientProcesses() as idle, ClientProcesses() as procs:
        if idle_clients:
            before = rss_mib(pid)
            for count in split(idle_clients, IDLE_HOLDERS):
                idle.start(clients.hold_idle, address, count)
            idle.wait_ready(IDLE_HOLDERS)
            after = rss_mib(pid)
            extra = {"rss_mb_with_idle": round(after, 1),
                     "idle_rss_delta_mb": round(after - before, 1)}
        procs.start(clients.consume, address, msgs, PREFETCH, True)
        procs.start(clients.publish_paced, address, envelopes.new_run_token(), msgs,
                    LATENCY_RATE)
        procs.wait_ready(2)
        procs.go.set()
        results = procs.collect(2)
    consumer = next(r for r in results if "count" in r)
    return latency_figures(consumer["latencies"], msgs, LATENCY_RATE, idle_clients, extra)


# --------------------------------------------------------------------------- scenarios


def scenario_1to1(sizes):
    """1 publisher -> 1 consumer, pipelined, ack per message."""
    with running_broker() as broker:
        return _throughput(broker["address"], sizes["msgs"])


def scenario_3to1(sizes):
    """3 publishers -> 1 consumer, pipelined."""
    with running_broker() as broker:
        return _throughput(broker["address"], sizes["msgs"], publishers=3)


def scenario_publish_wait(sizes):
    """1 -> 1, each publish waits for its ACK before the next (window 1)."""
    with running_broker() as broker:
        return _throughput(broker["address"], sizes["msgs"], window=1)


def scenario_latency(sizes):
    """Publish->deliver latency at a fixed 1,000 msg/s."""
    with running_broker() as broker:
        return _latency(broker["address"], sizes["latency_seconds"])


def scenario_queued_rss(sizes):
    """100,000 messages queued with no consumer: the broker's RSS after the last ACK."""
    msgs = sizes["queued_msgs"]
    with running_broker() as broker:
        before = rss_mib(broker["pid"])
        _publish_only(broker["address"], msgs)
        after = rss_mib(broker["pid"])
    return {"msgs": msgs, "rss_before_mb": round(before, 1), "rss_mb": round(after, 1),
            "rss_delta_mb": round(after - before, 1)}


def scenario_persistent(sizes):
    """As 1to1 with ``--data-dir``: the journal fsyncs before every ACK."""
    with tempfile.TemporaryDirectory(prefix="bench-journal-") as data_dir, \
            running_broker("--data-dir", data_dir) as broker:
        return _throughput(broker["address"], sizes["msgs"])


def scenario_persistent_no_consumer(sizes):
    """Journal on, nobody consuming: every ACK waits for its message to be on disk."""
    msgs = sizes["msgs"]
    with tempfile.TemporaryDirectory(prefix="bench-journal-") as data_dir, \
            running_broker("--data-dir", data_dir) as broker:
        seconds = _publish_only(broker["address"], msgs)
    return {"msgs": msgs, "seconds": round(seconds, 3), "msg_per_s": round(msgs / seconds)}


def scenario_idle_latency(sizes):
    """Latency at 1,000 msg/s while 1,000 idle connections are held open."""
    with running_broker() as broker:
        return _latency(broker["address"], sizes["latency_seconds"], broker["pid"],
                        IDLE_CLIENTS)


def _library_throughput(address, msgs, window):
    """As _throughput, one publisher, with ``ciphermq.client`` on both ends."""
    token = envelopes.new_run_token()
    with ClientProcesses() as procs:
        procs.start(library_clients.consume, address, msgs, PREFETCH)
        procs.start(library_clients.publish, address, token, 0, msgs, window)
        procs.wait_ready(2)
        procs.go.set()
        results = procs.collect(2)
    consumer = next(r for r in results if "count" in r)
    (publisher,) = [r for r in results if "first_publish_at" in r]
    seconds = consumer["last_ack_at"] - publisher["first_publish_at"]
    return {"msgs": msgs, "seconds": round(seconds, 3), "msg_per_s": round(msgs / seconds)}


def library_1to1(sizes):
    """1 -> 1 pipelined (window 2,000, prefetch 2,000) through ``ciphermq.client``."""
    with running_broker() as broker:
        return _library_throughput(broker["address"], sizes["msgs"], WINDOW)


def library_publish_wait(sizes):
    """1 -> 1 through ``ciphermq.client``, each ``Client.publish`` blocking for its ACK."""
    with running_broker() as broker:
        return _library_throughput(broker["address"], sizes["msgs"], 1)


# --------------------------------------------------------------------------- calibration


def relay_1to1(sizes):
    """The same clients as 1to1 against bench/relay.py: the harness's own ceiling."""
    with running_relay() as relay:
        return _throughput(relay["address"], sizes["msgs"])


def relay_publish_wait(sizes):
    """The same clients as publish_wait against bench/relay.py."""
    with running_relay() as relay:
        return _throughput(relay["address"], sizes["msgs"], window=1)
