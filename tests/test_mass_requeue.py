"""A mass requeue goes back in chunks, and nothing about it changes but who may run between them.

A connection that vanishes holding 10,000 messages (the fetch-without-ack attack of issue
11), a consumer timeout, or many overdue fetches give back more than REQUEUE_CHUNK
messages at once; they go back a chunk per hold of the broker mutex.  These tests stop
the requeue between two chunks (through the ``between_chunks`` hook, or the closing
connection's step aside) and look: the mutex is free, the counts add up, nobody can ack
or be handed a message not yet back, and at the end every message is back exactly once,
in the order one step would have left.  They count and compare, never time.
"""
import threading

import pytest
from conftest import FakeClock, Wire, publish_line
from test_bounds import pipelined, recording, stats

from ciphermq import recovery, turns
from ciphermq.broker import COPY_OVERHEAD, REQUEUE_CHUNK, Broker
from ciphermq.errors import BrokerError
from ciphermq.redelivery import RedeliveryTimer

HELD = 2 * REQUEUE_CHUNK + 44       # three chunks: two full, one partial
BEHIND = 5                          # ready messages behind the held ones
WAIT = 10.0


def body(message_id):
    return b'{"message_id": "%s"}' % message_id.encode()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def broker(clock):
    broker = Broker(redelivery_interval=30.0, max_deliveries=10, clock=clock)
    broker.declare_defaults()
    return broker


def fill(broker, count, prefix="m"):
    ids = ["%s%04d" % (prefix, n) for n in range(count)]
    for message_id in ids:
        assert broker.publish("default_exchange", "default_key", message_id, body(message_id))
    return ids


def fetch_all(broker, session, count):
    return [broker.consume(session, "default_queue")[0] for _ in range(count)]


def ready_ids(broker, queue="default_queue"):
    return [message.id for message in broker._queues[queue].ready]


def close_pausing(broker, session, at_first_gap):
    """close_session(session), calling ``at_first_gap()`` between its first two chunks;
    returns (its result, how many gaps there were)."""
    gaps = []

    def between_chunks():
        gaps.append(len(gaps))
        if len(gaps) == 1:
            at_first_gap()

    return broker.close_session(session, between_chunks), len(gaps)


def test_a_mass_requeue_puts_every_message_back_once_oldest_first(broker):
    """A session closed holding three chunks' worth of messages gives back each exactly once,
    in chunks, at the front of its queue in their original order, counted once as returned."""
    ids = fill(broker, HELD + BEHIND)
    holder, reader = broker.open_session("holder"), broker.open_session("reader")
    assert fetch_all(broker, holder, HELD) == ids[:HELD]
    with recording("ciphermq.broker", "requeued") as log:
        assert close_pausing(broker, holder, lambda: None) == (HELD, 2)
    assert ready_ids(broker) == ids
    assert [m for m in log.messages if "requeued" in m] == [
        "%d message(s) requeued for redelivery (connection closed; first: m0000 to "
        "default_queue)" % HELD]
    assert stats_of(broker) == {"ready": HELD + BEHIND, "unacked": 0, "consumers": 0}
    again = [broker.consume(reader, "default_queue") for _ in range(HELD + BEHIND)]
    assert [m[0] for m in again] == ids
    assert [m[2] for m in again] == [2] * HELD + [1] * BEHIND
    assert broker.consume(reader, "default_queue") is None
    assert broker.totals["redelivered"] == HELD


def stats_of(broker, queue="default_queue"):
    return broker.stats(queue)["queues"][queue]


def test_between_two_chunks_the_mutex_is_free_and_a_neighbour_runs(broker):
    """Between two chunks the mutex is not held: another thread's publish runs there, and
    the counts add up (the first chunk ready, the rest still unacked)."""
    fill(broker, HELD)
    broker.declare_queue("other")
    broker.bind_queue("default_exchange", "other", "other")
    holder = broker.open_session("holder")
    fetch_all(broker, holder, HELD)
    seen = {}

    def at_first_gap():
        seen["free"] = broker.mutex.acquire(blocking=False)
        if seen["free"]:
            broker.mutex.release()
        neighbour = threading.Thread(target=lambda: seen.setdefault("published", broker.publish(
            "default_exchange", "other", "n1", body("n1"))))
        neighbour.start()
        neighbour.join(WAIT)
        seen["stats"] = stats_of(broker)

    close_pausing(broker, holder, at_first_gap)
    assert seen["free"] is True
    assert seen["published"] is True
    assert seen["stats"] == {"ready": REQUEUE_CHUNK, "unacked": HELD - REQUEUE_CHUNK,
                             "consumers": 0}
    assert stats_of(broker, "other")["ready"] == 1
    assert stats_of(broker) == {"ready": HELD, "unacked": 0, "consumers": 0}


def test_between_two_chunks_no_one_acks_or_is_handed_a_message_not_yet_back(broker):
    """Messages of a closed session waiting for their chunk cannot be acked (by it or
    anyone) nor fetched; a fetch between chunks gets one already back, which is then not
    put back twice."""
    ids = fill(broker, HELD)
    holder, reader = broker.open_session("holder"), broker.open_session("reader")
    fetch_all(broker, holder, HELD)
    seen = {}

    def at_first_gap():
        for session, message_id in ((holder, ids[0]), (holder, ids[-1]), (reader, ids[0])):
            with pytest.raises(BrokerError, match="not delivered to this connection"):
                broker.acknowledge(session, message_id)
        seen["fetched"] = broker.consume(reader, "default_queue")[0]
        broker.acknowledge(reader, seen["fetched"])

    close_pausing(broker, holder, at_first_gap)
    # the newest chunk went back first; its oldest message is at the front
    assert seen["fetched"] == ids[HELD - REQUEUE_CHUNK]
    assert ready_ids(broker) == [i for i in ids if i != seen["fetched"]]
    assert broker.totals["acked"] == 1
    assert stats_of(broker) == {"ready": HELD - 1, "unacked": 0, "consumers": 0}


def test_a_purge_between_two_chunks_drops_only_what_is_back(broker):
    """A purge between two chunks drops the ready messages only; those still to come back
    were in flight when it ran, come back after it, and the memory count follows."""
    ids = fill(broker, HELD + BEHIND)
    holder = broker.open_session("holder")
    fetch_all(broker, holder, HELD)
    purged = []
    close_pausing(broker, holder, lambda: purged.append(broker.purge("default_queue")))
    assert purged == [REQUEUE_CHUNK + BEHIND]
    assert ready_ids(broker) == ids[:HELD - REQUEUE_CHUNK]
    assert broker.stats()["memory"]["queued_bytes"] == sum(
        len(body(i)) + COPY_OVERHEAD for i in ids[:HELD - REQUEUE_CHUNK])


class RecordingJournal:
    """Just enough of a Journal to take a snapshot: keeps the records of each cut."""

    def __init__(self):
        self.cuts = []

    def append(self, payload):
        pass

    def check_writable(self):
        pass

    def wants_compaction(self, live_bytes):
        return False

    def cut(self, records):
        self.cuts.append(list(records))


def test_a_snapshot_between_two_chunks_keeps_the_messages_not_yet_back(clock):
    """A journal compaction between two chunks writes every message, those waiting for
    their chunk included, so a restart from it loses none."""
    journal = RecordingJournal()
    broker = Broker(clock=clock, journal=journal)
    broker.declare_defaults()
    ids = fill(broker, HELD + BEHIND)
    holder = broker.open_session("holder")
    fetch_all(broker, holder, HELD)
    close_pausing(broker, holder, broker.snapshot_to_journal)
    (records,) = journal.cuts
    assert sorted(recovery.fold(records).live) == ids


def test_give_backs_go_back_in_the_order_given(broker):
    """A second mass requeue that starts while the first is between chunks waits for it:
    each session's messages are back together, the later ones in front, as one step each
    would have left them."""
    ids = fill(broker, 2 * HELD)
    first, second = broker.open_session("first"), broker.open_session("second")
    fetch_all(broker, first, HELD)
    fetch_all(broker, second, HELD)
    closed = []
    assert close_pausing(broker, first, lambda: closed.append(broker.close_session(second))) \
        == (HELD, 1)
    assert closed == [HELD]
    assert ready_ids(broker) == ids[HELD:] + ids[:HELD]


def test_a_consumer_timeout_and_overdue_fetches_go_back_in_chunks_with_one_line(broker, clock):
    """The redelivery timer's give-backs too large for one hold (a consumer timeout, many
    overdue fetches) are all back, counted once each, with one summary line each, before
    retry_unacknowledged returns; the timed-out consumer is hung up once."""
    broker.consumer_timeout = 300.0
    ids = fill(broker, 2 * HELD)
    fetcher, silent = broker.open_session("fetcher"), broker.open_session("silent")
    fetch_all(broker, fetcher, HELD)
    hung_up = []
    silent.hang_up = lambda: hung_up.append(len(ready_ids(broker)))
    broker.register_consumer(silent, "default_queue", 0)
    assert len(silent.held) == HELD
    clock.advance(31)
    broker.acknowledge(fetcher, ids[0])     # the fetcher is not silent: its fetches are overdue
    with recording("ciphermq.broker", "requeued") as log:
        broker.retry_unacknowledged()
        assert ready_ids(broker) == ids[1:HELD]
        clock.advance(300)
        broker.retry_unacknowledged()
    assert ready_ids(broker) == ids[HELD:] + ids[1:HELD]
    assert hung_up == [2 * HELD - 1], "hung up once, after its messages were back"
    lines = [m for m in log.messages if "requeued for redelivery" in m]
    assert lines == ["%d message(s) requeued for redelivery (not acked in time; first: "
                     "m0001 to default_queue)" % (HELD - 1),
                     "%d message(s) requeued for redelivery (consumer timeout; first: "
                     "m%04d to default_queue)" % (HELD, HELD)]
    assert {m.returns for m in broker._queues["default_queue"].ready} == {1}


# -- over the wire -----------------------------------------------------------------------

def test_a_neighbour_is_answered_while_a_disconnects_requeue_is_between_chunks(
        start_server, monkeypatch):
    """A client that vanishes holding three chunks' worth of fetched messages: while its
    requeue is stopped between two chunks, a neighbour's publish and stats are answered
    (stats shows the first chunk back); then all are back, with one log line."""
    server = start_server()
    gap, go = threading.Event(), threading.Event()
    close_session = server.broker.close_session

    def pausing_close(session, between_chunks=None):
        def pause_once():
            if not gap.is_set():
                gap.set()
                go.wait(WAIT)
            between_chunks()
        return close_session(session, pause_once)

    monkeypatch.setattr(server.broker, "close_session", pausing_close)
    neighbour, holder = Wire(server.address), Wire(server.address)
    try:
        pipelined(neighbour, [publish_line() for _ in range(HELD)])
        replies = pipelined(holder, ["fetch default_queue"] * HELD)
        assert all(reply.startswith("Message: ") for reply in replies)
        with recording("ciphermq.broker", "requeued for redelivery") as log:
            holder.close()
            assert gap.wait(WAIT)
            assert neighbour.call(publish_line()).startswith("ACK ")
            assert stats(neighbour, "default_queue")["queues"]["default_queue"] == {
                "ready": REQUEUE_CHUNK + 1, "unacked": HELD - REQUEUE_CHUNK, "consumers": 0}
            go.set()
            assert log.seen.wait(WAIT)
        assert stats(neighbour, "default_queue")["queues"]["default_queue"] == {
            "ready": HELD + 1, "unacked": 0, "consumers": 0}
        assert len([m for m in log.messages if "requeued" in m]) == 1
    finally:
        go.set()
        neighbour.close()
        holder.close()


def noting_steps_aside(monkeypatch):
    """An Event set whenever any Turn steps aside (Turn.step_aside still runs)."""
    stepped = threading.Event()
    step_aside = turns.Turn.step_aside

    def noted_step_aside(turn):
        stepped.set()
        step_aside(turn)

    monkeypatch.setattr(turns.Turn, "step_aside", noted_step_aside)
    return stepped


def test_a_closing_connection_steps_aside_between_chunks_for_a_busy_neighbour(
        start_server, monkeypatch):
    """Between two chunks of its requeue, a closing connection steps aside for a reader
    busy with a short read (an interactive neighbour), and goes on once that read is over."""
    server = start_server(fair_turn=1e-9, fair_max_wait=WAIT)
    stepped = noting_steps_aside(monkeypatch)
    publisher, holder = Wire(server.address), Wire(server.address)
    try:
        pipelined(publisher, [publish_line() for _ in range(HELD)])
        assert all(r.startswith("Message: ")
                   for r in pipelined(holder, ["fetch default_queue"] * HELD))
        busy = server.turns.turn()      # an interactive neighbour in the middle of a read
        busy.begin(1)
        stepped.clear()
        with recording("ciphermq.broker", "requeued for redelivery") as log:
            holder.close()
            assert stepped.wait(WAIT)
            # it waits for the neighbour: nothing more goes back until its read is over
            assert server.broker.stats("default_queue")["queues"]["default_queue"] == {
                "ready": REQUEUE_CHUNK, "unacked": HELD - REQUEUE_CHUNK, "consumers": 0}
            busy.end()
            assert log.seen.wait(WAIT)
        assert server.broker.stats("default_queue")["queues"]["default_queue"]["ready"] == HELD
    finally:
        publisher.close()
        holder.close()


def test_the_redelivery_timer_steps_aside_between_chunks_for_a_busy_neighbour(
        broker, clock, monkeypatch):
    """The timer's pass that takes back many overdue fetches steps aside between two chunks
    for a reader busy with a short read, goes on once that read is over, and puts all of
    them back."""
    ids = fill(broker, HELD)
    fetch_all(broker, broker.open_session("fetcher"), HELD)
    clock.advance(31)
    stepped = noting_steps_aside(monkeypatch)
    shared = turns.Turns(1e-9, WAIT)
    busy = shared.turn()            # an interactive reader in the middle of a read
    busy.begin(1)
    timer = RedeliveryTimer(broker, shared)
    retry = threading.Thread(target=timer._retry, name="test-retry")
    retry.start()
    try:
        assert stepped.wait(WAIT)
        # its turn began with the pass and was over at the first gap; it waits there
        # for the reader: nothing more goes back until the reader's read is over
        assert stats_of(broker) == {"ready": REQUEUE_CHUNK,
                                    "unacked": HELD - REQUEUE_CHUNK, "consumers": 0}
    finally:
        busy.end()
        retry.join(WAIT)
    assert not retry.is_alive()
    assert ready_ids(broker) == ids
