"""Broker-wide bounds (issue 11): a hostile client cannot hold, bloat or stall the broker.

Each test plays one attack from the issue's table against a real broker on
port 0 and asserts its bound by counting -- queues, bytes, refusals, log
lines -- never by timing.
"""
import contextlib
import gc
import json
import logging
import threading
import tracemalloc

import pytest
from conftest import FakeClock, Wire, envelope, parse_message, publish_line

from ciphermq import access
from ciphermq.broker import COPY_OVERHEAD, STATS_MAX_QUEUES
from ciphermq.transport import RECV_BYTES


@pytest.fixture
def wires():
    """Open Wire clients; all closed at teardown."""
    with contextlib.ExitStack() as stack:
        def open_wire(server):
            wire = Wire(server.address)
            stack.callback(wire.close)
            return wire
        yield open_wire


def pipelined(wire, lines):
    """Send many command lines in one write; return their replies, in order."""
    wire.send("".join(line if line.endswith("\n") else line + "\n" for line in lines))
    return [wire.text() for _ in lines]


def stats(wire, queue=None):
    return json.loads(wire.call("stats" if queue is None else "stats " + queue))


class LogRecorder(logging.Handler):
    """Keeps every message logged to one logger; sets ``seen`` when one contains ``needle``.

    Attached to the logger itself, so it sees its records whatever other tests
    did to propagation or to the root logger (caplog would not).
    """

    def __init__(self, needle=None):
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.messages = []
        self.seen = threading.Event()

    def emit(self, record):
        message = record.getMessage()
        self.messages.append(message)
        if self.needle is not None and self.needle in message:
            self.seen.set()


@contextlib.contextmanager
def recording(logger_name, needle=None):
    logger = logging.getLogger(logger_name)
    recorder, level = LogRecorder(needle), logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.INFO)
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(level)


def test_dead_letter_names_count_towards_max_queues(start_server, wires):
    """`declare_queue xN.dead` is counted by --max-queues; only the dead-letter
    queue of an existing queue is free, so the broker holds at most 2 x max queues."""
    server = start_server(max_queues=10)
    wire = wires(server)
    replies = pipelined(wire, ["declare_queue x%d.dead" % n for n in range(50)])
    assert replies.count("Queue declared") == 9            # default_queue is the tenth
    assert replies[9:] == ["Error: too many queues (max 10)"] * 41
    assert wire.call("declare_queue default_queue.dead") == "Queue declared"
    assert wire.call("declare_queue x0.dead.dead") == "Error: too many queues (max 10)"
    assert wire.call("declare_queue y") == "Error: too many queues (max 10)"
    assert stats(wire)["queue_count"] == 11 <= 2 * 10



def test_refused_declarations_log_nothing(start_server, wires):
    """A flood of refused `declare_queue xN.dead` writes no log line at INFO or above
    (one per refusal would be a hostile client's lever on the broker's disk and CPU)."""
    server = start_server(max_queues=10)
    wire = wires(server)
    assert wire.call("ping") == "PONG"
    with recording("ciphermq.connection") as connection_log, \
            recording("ciphermq.broker") as broker_log:
        replies = pipelined(wire, ["declare_queue x%d.dead" % n for n in range(1_000)])
    assert replies[-1] == "Error: too many queues (max 10)"
    assert replies.count("Error: too many queues (max 10)") == 991
    assert connection_log.messages == broker_log.messages == []

def test_memory_bound_counts_every_fanout_copy_and_consumers_drain(start_server, wires):
    """Beyond --max-memory publishes get `Error: broker memory limit reached`; stats
    counts every fanout copy's bytes (plus COPY_OVERHEAD); acking frees room and
    publishes go on."""
    server = start_server(max_memory=40_000)
    wire = wires(server)
    setup = ["declare_exchange fan fanout"] + [
        line for n in range(4) for line in ("declare_queue f%d" % n, "bind fan f%d x" % n)]
    assert not [r for r in pipelined(wire, setup) if r.startswith("Error")]
    body = json.dumps(envelope(ciphertext="QUJD" * 250))         # ~1.1 KB
    lines = ["publish fan x %s" % json.dumps(envelope(ciphertext="QUJD" * 250))
             for _ in range(20)]
    replies = pipelined(wire, lines)
    accepted = sum(r.startswith("ACK ") for r in replies)
    copy = len(body) + COPY_OVERHEAD
    assert accepted == 40_000 // (4 * copy) == 7
    assert replies[accepted:] == ["Error: broker memory limit reached"] * (20 - accepted)
    memory = stats(wire)["memory"]
    assert memory == {"queued_bytes": accepted * 4 * copy, "max_memory": 40_000}
    for queue in ("f0", "f1", "f2", "f3"):          # a consumer drains every copy of one
        message_id, _ = parse_message(wire.call("fetch %s" % queue))
        assert wire.call("ack %s" % message_id) == "ACK_CONFIRMED %s" % message_id
    assert stats(wire)["memory"]["queued_bytes"] == (accepted - 1) * 4 * copy
    assert wire.call(lines[-1]).startswith("ACK ")


def test_memory_bound_charges_what_a_queued_copy_really_costs(start_server, wires):
    """Small envelopes published until `broker memory limit reached` hold at most
    --max-memory of broker memory (by tracemalloc): the envelope bytes and the broker's
    own objects for each copy (COPY_OVERHEAD), not the envelopes alone; beyond it only
    the connection's read buffers (the pending recv and the last read's bytes)."""
    server = start_server(max_memory=1_000_000)
    wire = wires(server)
    lines = [publish_line() for _ in range(8000)]      # ~140-byte envelopes: 1.1 MB
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        refused = 0
        for start in range(0, len(lines), 500):
            replies = pipelined(wire, lines[start:start + 500])
            refused += replies.count("Error: broker memory limit reached")
            del replies
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert refused > 0
    assert stats(wire)["memory"]["queued_bytes"] <= 1_000_000
    assert held <= 1_000_000 + 2 * RECV_BYTES, held


def test_one_connection_holds_at_most_max_unacked_pushed_and_fetched(start_server, wires):
    """Pushes and fetches together stop at --max-unacked: fetch then answers an
    Error, pushes wait; one ack lets exactly one more through."""
    server = start_server(max_unacked=5)
    publisher, holder = wires(server), wires(server)
    assert publisher.call("declare_queue other") == "Queue declared"
    pipelined(publisher, [publish_line() for _ in range(8)])
    assert publisher.call("publish default_exchange other %s" % json.dumps(envelope())) \
        .startswith("Error: unroutable")                 # other has no binding: use fetch on it
    assert publisher.call("bind default_exchange other other") == "Queue bound"
    pipelined(publisher, [publish_line(key="other") for _ in range(3)])
    assert holder.call("fetch other").startswith("Message: ")
    holder.send("consume default_queue 0\n")           # 0 = no prefetch limit
    assert holder.text() == "Subscribed to queue"
    pushed = [parse_message(holder.text())[0] for _ in range(4)]
    holder.expect_nothing(within=0.3)                  # the fifth slot is the fetched one
    assert holder.call("fetch other") == \
        "Error: too many unacked messages on this connection (max 5)"
    assert stats(publisher, "default_queue")["queues"]["default_queue"] == \
        {"ready": 4, "unacked": 4, "consumers": 1}
    holder.send("ack %s\n" % pushed[0])
    assert holder.text() == "ACK_CONFIRMED %s" % pushed[0]
    assert holder.text().startswith("Message: ")       # exactly one more
    holder.expect_nothing(within=0.3)


def test_mass_requeue_logs_one_summary_line(start_server, wires):
    """A connection that fetched 2,000 messages and vanished is requeued with one
    INFO line naming the count, not 2,000 lines; every message is ready again."""
    server = start_server(max_unacked=2_000)
    publisher, holder = wires(server), wires(server)
    pipelined(publisher, [publish_line() for _ in range(2_000)])
    replies = pipelined(holder, ["fetch default_queue"] * 2_001)
    assert sum(r.startswith("Message: ") for r in replies) == 2_000
    assert replies[-1] == "Error: too many unacked messages on this connection (max 2000)"
    with recording("ciphermq.broker", "requeued for redelivery") as log:
        holder.close()
        assert log.seen.wait(5)
    lines = [message for message in log.messages if "requeued" in message]
    assert len(lines) == 1
    assert "2000 message(s) requeued for redelivery (connection closed" in lines[0]
    assert stats(publisher, "default_queue")["queues"]["default_queue"]["ready"] == 2_000


def test_stats_stays_small_with_many_queues(start_server, wires):
    """With 1,000 queues `stats` lists at most 100 of them plus the count and totals
    (the old shape, small), and `stats <queue>` answers for one queue."""
    server = start_server()
    wire = wires(server)
    pipelined(wire, ["declare_queue q%04d" % n for n in range(1_000)])
    reply = wire.call("stats")
    whole = json.loads(reply)
    assert len(whole["queues"]) == STATS_MAX_QUEUES == 100
    assert whole["queue_count"] == 1_001
    assert set(whole) == {"queues", "queue_count", "totals", "memory"}
    assert len(reply) < 8_000
    one = stats(wire, "q0999")
    assert one["queues"] == {"q0999": {"ready": 0, "unacked": 0, "consumers": 0}}
    assert stats(wire, "nope")["queues"] == {}
    assert wire.call("stats a b") == "Error: usage: stats [queue]"


def test_topic_routing_with_many_bindings_walks_few_nodes(start_server, wires):
    """With 3,000 topic bindings, a publish with a new routing key reaches exactly the
    matching queues and the trie walk visits a handful of nodes, not 3,000 bindings."""
    server = start_server()
    wire = wires(server)
    setup = ["declare_exchange t topic", "declare_queue all", "bind t all sensor.*.#"]
    for n in range(3_000):
        setup += ["declare_queue s%d" % n, "bind t s%d sensor.%d.temp" % (n, n)]
    assert not [r for r in pipelined(wire, setup) if r.startswith("Error")]
    assert wire.call("publish t sensor.1234.temp %s" % json.dumps(envelope())).startswith("ACK")
    assert wire.call("publish t sensor.new.temp %s" % json.dumps(envelope())).startswith("ACK")
    assert stats(wire, "s1234")["queues"]["s1234"]["ready"] == 1
    assert stats(wire, "all")["queues"]["all"]["ready"] == 2
    trie = server.broker._exchanges["t"]._trie
    assert trie.nodes_visited("sensor.new-%d.temp" % 7) <= 8


def test_non_canonical_base64_is_refused_on_the_wire(start_server, wires):
    """A publish whose nonce has non-zero padding bits (same decoded bytes) is refused;
    the canonical form is accepted."""
    wire = wires(start_server())
    assert wire.call("publish default_exchange default_key %s"
                     % json.dumps(envelope(nonce="QR=="))) == \
        "Error: field 'nonce' must be base64 text"
    assert wire.call("publish default_exchange default_key %s"
                     % json.dumps(envelope(nonce="QQ=="))).startswith("ACK ")


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "users.json"
    return path, access.add_user(str(path), "alice", ["*"], ["*"], True)


def failed_login(server, token):
    wire = Wire(server.address)
    try:
        reply = wire.call("auth alice %s" % token)
        if reply != "AUTH_OK":      # one attempt per connection: a failure is closed at once
            assert wire.closed_by_peer() == b""
        return reply
    finally:
        wire.close()


def test_failed_logins_are_budgeted_per_source_and_summarised(start_server, users):
    """After --login-failure-limit failures an address's logins are refused unchecked
    until its window ends; the log has one line per interval plus one summary."""
    path, token = users
    clock = FakeClock()
    server = start_server(users_file=str(path), login_failure_limit=5,
                          login_failure_window=60.0, auth_timeout=3600.0, clock=clock)
    with recording("ciphermq.logins") as log:
        replies = [failed_login(server, "wrong") for _ in range(30)]
        assert replies[:5] == ["Error: authentication failed"] * 5
        assert replies[5:] == ["Error: too many failed logins from this address; "
                               "try again later"] * 25
        assert failed_login(server, token).startswith("Error: too many failed logins")
        assert len(log.messages) == 1                   # the first failure only
        clock.advance(61)                               # the window and the interval end
        assert failed_login(server, "wrong") == "Error: authentication failed"
        assert len(log.messages) == 3
        assert log.messages[1] == ("30 more failed login(s) in the previous 60 s interval "
                                   "(not logged one by one)")
        assert failed_login(server, token) == "AUTH_OK"


def test_room_under_max_unacked_serves_every_queue_the_connection_consumes(start_server, wires):
    """A connection at --max-unacked that acks a message from one queue gets the next
    push from another queue it consumes, without any new publish."""
    server = start_server(max_unacked=1)
    publisher, holder = wires(server), wires(server)
    pipelined(publisher, ["declare_queue a", "bind default_exchange a a",
                          "declare_queue b", "bind default_exchange b b"])
    pipelined(publisher, [publish_line(key="a"), publish_line(key="b")])
    assert holder.call("consume a").startswith("Subscribed")
    first, _ = parse_message(holder.text())
    assert holder.call("consume b").startswith("Subscribed")   # at the limit: nothing pushed
    holder.send("ack %s\n" % first)
    assert holder.text() == "ACK_CONFIRMED %s" % first
    second, _ = parse_message(holder.text())                 # b's message, pushed at once
    assert stats(publisher, "b")["queues"]["b"]["unacked"] == 1
    assert second != first


def test_memory_accounting_follows_dead_letters_purge_and_requeue_dead(start_server, wires):
    """Queued bytes stay exact as copies are dead-lettered, moved back by requeue_dead,
    purged and acked: back to zero once nothing is queued."""
    server = start_server(max_deliveries=1)
    wire = wires(server)
    lines = [publish_line() for _ in range(3)]
    size = sum(len(line.split(" ", 3)[3].strip()) + COPY_OVERHEAD for line in lines)
    assert all(r.startswith("ACK ") for r in pipelined(wire, lines))
    assert stats(wire)["memory"]["queued_bytes"] == size
    fetched, _ = parse_message(wire.call("fetch default_queue"))
    assert wire.call("nack %s" % fetched) == "NACK_CONFIRMED %s" % fetched   # -> .dead
    assert stats(wire, "default_queue.dead")["queues"]["default_queue.dead"]["ready"] == 1
    assert stats(wire)["memory"]["queued_bytes"] == size
    assert wire.call("requeue_dead default_queue") == "Requeued 1"
    assert stats(wire)["memory"]["queued_bytes"] == size
    assert wire.call("purge default_queue") == "Purged 3"
    assert stats(wire)["memory"]["queued_bytes"] == 0
