"""Redis Streams' side of each scenario, on a private redis-server (redis_node.py), redis-py.

Every function takes the server ``info`` (from ``private_redis``, shared by the whole run,
no persistence) and ``sizes`` (scenarios.SIZES) and returns one run's figures as a plain
dict, with the same keys as the other brokers' sides.  Each run uses a fresh stream
``bench-<name>`` with a fresh consumer group and deletes it afterwards.  Scenario 5 and the
durable ones (7, 7b) start a server of their own for each run: 5 to measure a fresh
process, 7 and 7b with ``appendonly yes`` and ``appendfsync always`` (fsync before the XADD
reply, like CipherMQ's journal before its ACK).

Window and prefetch are the same 2,000 as on the other sides: a publisher pipelines 2,000
XADDs at a time, the consumer reads up to 2,000 entries per XREADGROUP.
"""
import envelopes
import redis_clients as clients
from processes import ClientProcesses, latency_figures, rss_mib, split
from redis_node import private_redis

WINDOW = 2000
PREFETCH = 2000
LATENCY_RATE = 1000
IDLE_CLIENTS = 1000
IDLE_HOLDERS = 4


def _throughput(info, name, msgs, publishers=1, window=WINDOW):
    """N entries from ``publishers`` processes to one consumer; msg/s first XADD -> last XACK."""
    stream = "bench-" + name
    token = envelopes.new_run_token()
    clients.create_group(info, stream)
    with ClientProcesses() as procs:
        procs.start(clients.consume, info, stream, msgs, False, PREFETCH)
        first_seq = 0
        for count in split(msgs, publishers):
            procs.start(clients.publish_pipelined, info, stream, token, first_seq, count, window)
            first_seq += count
        procs.wait_ready(1 + publishers)
        procs.go.set()
        results = procs.collect(1 + publishers)
    clients.length_and_delete(info, stream)
    consumer = next(r for r in results if "count" in r)
    if consumer["count"] != msgs:
        raise RuntimeError(f"{name}: consumer got {consumer['count']} of {msgs}")
    started = min(r["first_publish_at"] for r in results if "first_publish_at" in r)
    seconds = consumer["last_ack_at"] - started
    return {"msgs": msgs, "seconds": round(seconds, 3), "msg_per_s": round(msgs / seconds)}


def _latency(info, name, seconds, idle_clients=0):
    """XADD at LATENCY_RATE for ``seconds``; p50/p99/max publish->deliver in ms."""
    stream = "bench-" + name
    msgs = int(LATENCY_RATE * seconds)
    clients.create_group(info, stream)
    extra = {}
    with ClientProcesses() as idle, ClientProcesses() as procs:
        if idle_clients:
            before = rss_mib(info["pid"])
            for count in split(idle_clients, IDLE_HOLDERS):
                idle.start(clients.hold_idle, info, count)
            idle.wait_ready(IDLE_HOLDERS)
            after = rss_mib(info["pid"])
            extra = {"rss_mb_with_idle": round(after, 1),
                     "idle_rss_delta_mb": round(after - before, 1)}
        procs.start(clients.consume, info, stream, msgs, True, PREFETCH)
        procs.start(clients.publish_paced, info, stream, envelopes.new_run_token(), msgs,
                    LATENCY_RATE)
        procs.wait_ready(2)
        procs.go.set()
        results = procs.collect(2)
    clients.length_and_delete(info, stream)
    consumer = next(r for r in results if "count" in r)
    if consumer["count"] != msgs:
        raise RuntimeError(f"{name}: consumer got {consumer['count']} of {msgs}")
    return latency_figures(consumer["latencies"], msgs, LATENCY_RATE, idle_clients, extra)


def _publish_only(info, stream, msgs):
    """XADD ``msgs`` pipelined to a stream nobody reads; return seconds.  The stream stays."""
    with ClientProcesses() as procs:
        procs.start(clients.publish_pipelined, info, stream, envelopes.new_run_token(), 0,
                    msgs, WINDOW)
        procs.wait_ready(1)
        procs.go.set()
        (result,) = procs.collect(1)
    length = clients.length_and_delete(info, stream, delete=False)
    if length != msgs:
        raise RuntimeError(f"{stream}: stream holds {length} of {msgs}")
    return result["confirmed_at"] - result["first_publish_at"]


# --------------------------------------------------------------------------- scenarios


def scenario_1to1(info, sizes):
    """1 publisher -> 1 consumer group reader, pipelined XADDs, XACK per message."""
    return _throughput(info, "1to1", sizes["msgs"])


def scenario_3to1(info, sizes):
    """3 publishers -> 1 consumer."""
    return _throughput(info, "3to1", sizes["msgs"], publishers=3)


def scenario_publish_wait(info, sizes):
    """1 -> 1, each XADD waits for its reply before the next."""
    return _throughput(info, "publish_wait", sizes["msgs"], window=1)


def scenario_latency(info, sizes):
    """Publish->deliver latency at a fixed 1,000 msg/s."""
    return _latency(info, "latency_1000", sizes["latency_seconds"])


def scenario_idle_latency(info, sizes):
    """Latency at 1,000 msg/s while 1,000 idle connections are held open."""
    return _latency(info, "latency_1000_idle1000", sizes["latency_seconds"], IDLE_CLIENTS)


def scenario_queued_rss(_info, sizes):
    """On a fresh server, 100,000 entries in a stream with a group and no reader: RSS."""
    msgs = sizes["queued_msgs"]
    stream = "bench-rss"
    with private_redis() as server:
        clients.create_group(server, stream)
        before = rss_mib(server["pid"])
        _publish_only(server, stream, msgs)
        after = rss_mib(server["pid"])
    return {"msgs": msgs, "rss_before_mb": round(before, 1), "rss_mb": round(after, 1),
            "rss_delta_mb": round(after - before, 1)}


def scenario_persistent(_info, sizes):
    """As 1to1 on a fresh server with appendonly yes, appendfsync always."""
    with private_redis(durable=True) as server:
        return _throughput(server, "1to1_persistent", sizes["msgs"])


def scenario_persistent_no_consumer(_info, sizes):
    """Pipelined XADDs with appendfsync always and nobody reading."""
    msgs = sizes["msgs"]
    stream = "bench-persistent_no_consumer"
    with private_redis(durable=True) as server:
        clients.create_group(server, stream)
        seconds = _publish_only(server, stream, msgs)
    return {"msgs": msgs, "seconds": round(seconds, 3), "msg_per_s": round(msgs / seconds)}
