"""RabbitMQ's side of each scenario, on a private node (rabbitmq_node.py), with pika clients.

Every function takes the node ``info`` (from ``private_rabbitmq``) and ``sizes`` (see
scenarios.SIZES) and returns one run's figures as a plain dict, with the same keys as CipherMQ's
side.  Each run declares a fresh queue ``bench-<name>`` on the default exchange and deletes
it afterwards; scenario 5 starts a fresh node of its own for each run.

Window and prefetch: 2000/2000 was at the top of a 50..5000 sweep here (differences within
the VM's noise above ~1000; 100 or less cost 20-40%).  CipherMQ's side uses the same.
"""
import tempfile

import e2e
import envelopes
import pika
import rabbitmq_clients as clients
from processes import ClientProcesses, latency_figures, rss_mib, split
from rabbitmq_node import private_rabbitmq

from ciphermq import rabbitmq_nodes

WINDOW = 2000               # unconfirmed messages in flight per pipelined publisher
PREFETCH = 2000             # unacked deliveries per consumer
LATENCY_RATE = 1000         # messages per second in the latency scenarios
IDLE_CLIENTS = 1000
IDLE_HOLDERS = 4            # processes that share the idle connections


def _declare(info, name, durable):
    """(Re)create an empty queue ``name``."""
    conn = pika.BlockingConnection(clients.params(info))
    channel = conn.channel()
    channel.queue_delete(name)
    channel.queue_declare(name, durable=durable)
    conn.close()


def _queue_depth_and_delete(info, name, delete=True):
    """Return the ready-message count of queue ``name``, deleting the queue if asked."""
    conn = pika.BlockingConnection(clients.params(info))
    channel = conn.channel()
    depth = channel.queue_declare(name, passive=True).method.message_count
    if delete:
        channel.queue_delete(name)
    conn.close()
    return depth


def _throughput(info, name, msgs, publishers=1, persistent=False, window=WINDOW,
                prefetch=PREFETCH):
    """N messages from ``publishers`` processes to one consumer; msg/s first publish->last ack.

    Each publisher keeps up to ``window`` messages unconfirmed (1: publish-and-wait-each).
    """
    queue_name = "bench-" + name
    token = envelopes.new_run_token()
    _declare(info, queue_name, durable=persistent)
    with ClientProcesses() as procs:
        procs.start(clients.consume, info, queue_name, msgs, False, prefetch)
        first_seq = 0
        for count in split(msgs, publishers):
            procs.start(clients.publish_pipelined, info, queue_name, token, first_seq, count,
                        persistent, window)
            first_seq += count
        procs.wait_ready(1 + publishers)
        procs.go.set()
        results = procs.collect(1 + publishers)
    _queue_depth_and_delete(info, queue_name)
    consumer = next(r for r in results if "count" in r)
    if consumer["count"] != msgs:
        raise RuntimeError(f"{name}: consumer got {consumer['count']} of {msgs}")
    started = min(r["first_publish_at"] for r in results if "first_publish_at" in r)
    seconds = consumer["last_ack_at"] - started
    return {"msgs": msgs, "seconds": round(seconds, 3), "msg_per_s": round(msgs / seconds)}


def _latency(info, name, seconds, idle_clients=0):
    """Publish at LATENCY_RATE for ``seconds``; p50/p99/max publish->deliver in ms.

    With ``idle_clients``, that many idle AMQP connections are opened first and held open,
    across IDLE_HOLDERS processes, for the whole measurement.
    """
    queue_name = "bench-" + name
    msgs = int(LATENCY_RATE * seconds)
    _declare(info, queue_name, durable=False)
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
        procs.start(clients.consume, info, queue_name, msgs, True, PREFETCH)
        procs.start(clients.publish_paced, info, queue_name, envelopes.new_run_token(), msgs,
                    LATENCY_RATE)
        procs.wait_ready(2)
        procs.go.set()
        results = procs.collect(2)
    _queue_depth_and_delete(info, queue_name)
    consumer = next(r for r in results if "count" in r)
    if consumer["count"] != msgs:
        raise RuntimeError(f"{name}: consumer got {consumer['count']} of {msgs}")
    return latency_figures(consumer["latencies"], msgs, LATENCY_RATE, idle_clients, extra)


def _publish_only(info, queue_name, msgs, persistent):
    """Publish ``msgs`` with pipelined confirms to a queue nobody consumes; return seconds.

    The queue is left holding the messages; raises RuntimeError if it holds fewer.
    """
    with ClientProcesses() as procs:
        procs.start(clients.publish_pipelined, info, queue_name, envelopes.new_run_token(), 0,
                    msgs, persistent, WINDOW)
        procs.wait_ready(1)
        procs.go.set()
        (result,) = procs.collect(1)
    depth = _queue_depth_and_delete(info, queue_name, delete=False)
    if depth != msgs:
        raise RuntimeError(f"{queue_name}: queue holds {depth} of {msgs}")
    return result["confirmed_at"] - result["first_publish_at"]


# --------------------------------------------------------------------------- scenarios


def scenario_1to1(info, sizes):
    """1 publisher -> 1 consumer, pipelined confirms, transient messages."""
    return _throughput(info, "1to1", sizes["msgs"])


def scenario_3to1(info, sizes):
    """3 publishers -> 1 consumer, pipelined confirms."""
    return _throughput(info, "3to1", sizes["msgs"], publishers=3)


def scenario_publish_wait(info, sizes):
    """1 -> 1, each publish waits for its confirm before the next."""
    return _throughput(info, "publish_wait", sizes["msgs"], window=1)


def scenario_latency(info, sizes):
    """Publish->deliver latency at a fixed 1,000 msg/s."""
    return _latency(info, "latency_1000", sizes["latency_seconds"])


def scenario_queued_rss(_info, sizes):
    """On a fresh node, queue 100,000 messages with no consumer: beam.smp RSS before/after.

    The figure is taken right after the last confirm.  beam.smp keeps allocator carriers
    from the publishing burst for a while (README: RSS falls ~30% some 15 s later).
    """
    msgs = sizes["queued_msgs"]
    queue_name = "bench-rss"
    with private_rabbitmq() as node:
        _declare(node, queue_name, durable=False)
        before = rss_mib(node["pid"])
        _publish_only(node, queue_name, msgs, persistent=False)
        after = rss_mib(node["pid"])
        _queue_depth_and_delete(node, queue_name)
    return {"msgs": msgs, "rss_before_mb": round(before, 1), "rss_mb": round(after, 1),
            "rss_delta_mb": round(after - before, 1)}


def scenario_persistent(info, sizes):
    """As 1to1 with a durable queue and delivery_mode=2 (fsync before confirm)."""
    return _throughput(info, "1to1_persistent", sizes["msgs"], persistent=True)


def scenario_persistent_no_consumer(info, sizes):
    """Persistent messages to a durable queue with no consumer: every confirm waits for disk.

    RabbitMQ confirms a persistent message once it is on disk *or* once every queue's consumer
    has acked it, so with a fast consumer (scenario 7) it may skip the write altogether.
    """
    msgs = sizes["msgs"]
    queue_name = "bench-persistent_no_consumer"
    _declare(info, queue_name, durable=True)
    seconds = _publish_only(info, queue_name, msgs, persistent=True)
    _queue_depth_and_delete(info, queue_name)
    return {"msgs": msgs, "seconds": round(seconds, 3), "msg_per_s": round(msgs / seconds)}


def scenario_idle_latency(info, sizes):
    """Latency at 1,000 msg/s while 1,000 idle AMQP connections are held open."""
    return _latency(info, "latency_1000_idle1000", sizes["latency_seconds"], IDLE_CLIENTS)


# -- scenario 6: the same scripts (bin/Sender.py, bin/Receiver.py) with --url -------------

def _url(info):
    return "amqp://guest:guest@%s:%d/" % (info["host"], info["port"])


def scenario_e2e_rsa(info, sizes):
    """Sender.py -> one RabbitMQ node -> Receiver.py, per-message RSA, quorum queue."""
    return e2e.rabbitmq_per_message_rsa([_url(info)], sizes)


def scenario_e2e_reuse(info, sizes):
    """As scenario_e2e_rsa, with ``--key-reuse``."""
    return e2e.rabbitmq_key_reuse([_url(info)], sizes)


def scenario_e2e_cluster(_info, sizes):
    """The same scripts, per-message RSA, over a fresh 3-node cluster (all three --url)."""
    with rabbitmq_nodes.running(tempfile.mkdtemp(prefix="bench-cluster-"), 3,
                                prefix="benchc") as cluster:
        return e2e.rabbitmq_per_message_rsa(cluster.urls, sizes)
