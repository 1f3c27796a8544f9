"""The broker's rules, driven directly with a fake clock (no sockets, no waiting)."""
import gc
import sys
from pathlib import Path

import pytest
from conftest import FakeClock

from ciphermq.broker import Broker
from ciphermq.errors import BrokerError


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def broker(clock):
    broker = Broker(redelivery_interval=30.0, max_deliveries=3, max_queue_length=5,
                    dedup_window=3600.0, clock=clock)
    broker.declare_defaults()
    return broker


def publish(broker, message_id, exchange="default_exchange", key="default_key"):
    return broker.publish(exchange, key, message_id, b'{"message_id": "%s"}' % message_id.encode())


def pushed(broker, session):
    """Ids in the session's pushes, taken without blocking."""
    return [delivery[0] for delivery in broker.take_pushes(session)]


def test_duplicate_publish_is_accepted_but_stored_once(broker):
    """A retried publish is acknowledged again and never queued twice."""
    assert publish(broker, "m1") is True
    assert publish(broker, "m1") is False
    assert broker.stats()["queues"]["default_queue"]["ready"] == 1
    assert broker.stats()["totals"]["duplicates"] == 1


def test_duplicate_of_an_acked_message_within_window_is_not_requeued(broker, clock):
    """An id acked within the dedup window is re-ACKed, not stored again."""
    session = broker.open_session("s")
    publish(broker, "m1")
    assert broker.consume(session, "default_queue")[0] == "m1"
    broker.acknowledge(session, "m1")
    clock.advance(3599)
    broker.retry_unacknowledged()
    assert publish(broker, "m1") is False
    clock.advance(2)
    broker.retry_unacknowledged()
    assert publish(broker, "m1") is True, "after the window the id is forgotten"


def test_dedup_memory_is_capped(clock):
    """At most dedup_max_ids acked ids are remembered, the oldest forgotten first."""
    broker = Broker(dedup_max_ids=3, clock=clock)
    broker.declare_defaults()
    session = broker.open_session("s")
    for i in range(5):
        publish(broker, "m%d" % i)
        broker.consume(session, "default_queue")
        broker.acknowledge(session, "m%d" % i)
    assert publish(broker, "m0") is True and publish(broker, "m1") is True
    assert publish(broker, "m4") is False


def test_unroutable_and_unknown_exchange_are_refused(broker):
    """A publish that reaches no queue is an error and stores nothing."""
    with pytest.raises(BrokerError, match="unroutable"):
        publish(broker, "m1", key="nobody")
    with pytest.raises(BrokerError, match="unknown exchange 'nope'"):
        publish(broker, "m1", exchange="nope")
    assert publish(broker, "m1") is True, "a refused id is not remembered as accepted"


def test_full_queue_refuses_and_drops_nothing(broker):
    """Past max_queue_length publish fails; what was stored stays."""
    for i in range(5):
        publish(broker, "m%d" % i)
    with pytest.raises(BrokerError, match="queue 'default_queue' is full"):
        publish(broker, "m5")
    assert broker.stats()["queues"]["default_queue"]["ready"] == 5


def test_messages_in_flight_count_toward_the_queue_length(broker):
    """max_queue_length bounds ready plus unacked messages: taking some out without an ack
    makes no room, an ack does."""
    for i in range(5):
        publish(broker, "m%d" % i)
    session = broker.open_session("s1")
    assert broker.consume(session, "default_queue") is not None
    assert broker.consume(session, "default_queue") is not None
    queue = broker.stats()["queues"]["default_queue"]
    assert (queue["ready"], queue["unacked"]) == (3, 2)
    with pytest.raises(BrokerError, match="queue 'default_queue' is full"):
        publish(broker, "m5")
    broker.acknowledge(session, "m0")
    assert publish(broker, "m5") is True


def test_fanout_full_target_refuses_the_whole_publish(broker):
    """If any target queue is full, no queue gets the message (all or nothing)."""
    broker.declare_exchange("fan", "fanout")
    broker.declare_queue("a")
    broker.declare_queue("b")
    broker.bind_queue("fan", "a", "x")
    broker.bind_queue("fan", "b", "x")
    for i in range(5):
        broker.publish("default_exchange", "default_key", "pre%d" % i, b"{}")
    broker.bind_queue("fan", "default_queue", "x")
    with pytest.raises(BrokerError, match="full"):
        broker.publish("fan", "x", "f1", b"{}")
    stats = broker.stats()["queues"]
    assert stats["a"]["ready"] == stats["b"]["ready"] == 0


def test_consumers_compete_round_robin(broker):
    """Each message goes to exactly one consumer, alternating between them."""
    broker.max_queue_length = 100
    s1, s2 = broker.open_session("s1"), broker.open_session("s2")
    broker.register_consumer(s1, "default_queue", 0)
    broker.register_consumer(s2, "default_queue", 0)
    for i in range(6):
        publish(broker, "m%d" % i)
    got1, got2 = pushed(broker, s1), pushed(broker, s2)
    assert sorted(got1 + got2) == ["m%d" % i for i in range(6)]
    assert len(got1) == len(got2) == 3


def test_prefetch_limits_unacked_pushes(broker):
    """A consumer holds at most `prefetch` unacked messages; an ack makes room."""
    broker.max_queue_length = 100
    session = broker.open_session("s")
    broker.register_consumer(session, "default_queue", 2)
    for i in range(5):
        publish(broker, "m%d" % i)
    assert pushed(broker, session) == ["m0", "m1"]
    broker.acknowledge(session, "m0")
    assert pushed(broker, session) == ["m2"]


def test_unacked_delivery_comes_back_after_the_interval(broker, clock):
    """A delivery not acked within the redelivery interval is delivered again."""
    session = broker.open_session("s")
    broker.register_consumer(session, "default_queue", 0)
    publish(broker, "m1")
    assert pushed(broker, session) == ["m1"]
    clock.advance(29)
    broker.retry_unacknowledged()
    assert pushed(broker, session) == []
    clock.advance(2)
    broker.retry_unacknowledged()
    [(message_id, _, count)] = broker.take_pushes(session)
    assert (message_id, count) == ("m1", 2)
    assert broker.stats()["totals"]["redelivered"] == 1


def test_redeliver_reports_when_it_is_next_due(broker, clock):
    """The timer is told the earliest deadline, so it never polls."""
    session = broker.open_session("s")
    publish(broker, "m1")
    broker.consume(session, "default_queue")
    clock.advance(10)
    assert broker.retry_unacknowledged() == pytest.approx(clock.now + 20)


def test_dead_letter_after_max_deliveries(broker, clock):
    """After max_deliveries unacked deliveries the message moves to <queue>.dead, not lost."""
    session = broker.open_session("s")
    publish(broker, "m1")
    for attempt in range(3):
        assert broker.consume(session, "default_queue")[2] == attempt + 1
        clock.advance(31)
        broker.retry_unacknowledged()
    stats = broker.stats()
    assert stats["queues"]["default_queue"] == {"ready": 0, "unacked": 0, "consumers": 0}
    assert stats["queues"]["default_queue.dead"]["ready"] == 1
    assert stats["totals"]["dead_lettered"] == 1
    message_id, _, count = broker.consume(session, "default_queue.dead")
    assert (message_id, count) == ("m1", 1)
    assert broker.acknowledge(session, "m1") is True


def test_nack_requeues_at_the_front(broker):
    """A nacked message is the next one delivered."""
    session = broker.open_session("s")
    publish(broker, "m1")
    publish(broker, "m2")
    assert broker.consume(session, "default_queue")[0] == "m1"
    broker.nack(session, "m1")
    assert broker.consume(session, "default_queue")[:3:2] == ("m1", 2)


def test_closing_a_session_requeues_in_order(broker):
    """A disconnected consumer's messages go back in their original order."""
    s1, s2 = broker.open_session("s1"), broker.open_session("s2")
    broker.register_consumer(s1, "default_queue", 0)
    for i in range(3):
        publish(broker, "m%d" % i)
    assert broker.close_session(s1) == 3
    broker.register_consumer(s2, "default_queue", 0)
    assert pushed(broker, s2) == ["m0", "m1", "m2"]


def test_ack_rules(broker):
    """Only the holder may ack; a repeated ack is confirmed; unknown ids are refused."""
    s1, s2 = broker.open_session("s1"), broker.open_session("s2")
    publish(broker, "m1")
    broker.consume(s1, "default_queue")
    with pytest.raises(BrokerError, match="not delivered to this connection"):
        broker.acknowledge(s2, "m1")
    assert broker.stats()["queues"]["default_queue"]["unacked"] == 1
    assert broker.acknowledge(s1, "m1") is True
    assert broker.acknowledge(s1, "m1") is False
    with pytest.raises(BrokerError):
        broker.acknowledge(s1, "never-seen")


def test_fanout_copies_are_acked_separately(broker):
    """A fanned-out message lives on until every queue's copy is acked."""
    broker.declare_exchange("fan", "fanout")
    for name in ("a", "b"):
        broker.declare_queue(name)
        broker.bind_queue("fan", name, "x")
    s1, s2 = broker.open_session("s1"), broker.open_session("s2")
    broker.publish("fan", "x", "f1", b"{}")
    broker.consume(s1, "a")
    broker.acknowledge(s1, "f1")
    assert broker.publish("fan", "x", "f1", b"{}") is False
    assert broker.consume(s2, "b")[0] == "f1"
    assert broker.acknowledge(s2, "f1") is True


def test_delivery_wait_ends_when_the_session_closes(broker):
    """The delivery thread's wait ends, and the pushes are gone, once the session closes."""
    session = broker.open_session("s")
    broker.close_session(session)
    assert broker.wait_pushes(session, timeout=5) is False
    assert broker.take_pushes(session) is None


def test_batched_calls_hand_back_the_push_writers(broker):
    """publish_many/acknowledge_many return the given write_pushes callbacks, not waking threads."""
    broker.max_queue_length = 100

    def write_pushes():
        raise AssertionError("the broker must not call it: only the caller may")
    session = broker.open_session("s", write_pushes=write_pushes)
    broker.register_consumer(session, "default_queue", 1)
    results, writers = broker.publish_many([("default_exchange", "default_key", "b%d" % i, b"{}")
                                            for i in range(3)])
    assert results == [True, True, True] and writers == [write_pushes]
    assert not session.writer_called
    assert pushed(broker, session) == ["b0"]
    results, writers = broker.acknowledge_many(session, ["b0", "nope"])
    assert results[0] is True and isinstance(results[1], BrokerError)
    assert writers == [write_pushes] and pushed(broker, session) == ["b1"]


def test_topology_is_bounded(clock):
    """Queues, exchanges and bindings have limits, refused with a clear error."""
    broker = Broker(max_queues=2, max_exchanges=1, max_bindings=2, clock=clock)
    broker.declare_queue("a")
    broker.declare_queue("b")
    broker.declare_queue("a")                       # redeclaring is not a new queue
    with pytest.raises(BrokerError, match="too many queues"):
        broker.declare_queue("c")
    broker.declare_exchange("x", "topic")
    with pytest.raises(BrokerError, match="too many exchanges"):
        broker.declare_exchange("y")
    broker.bind_queue("x", "a", "k1")
    broker.bind_queue("x", "b", "k1")
    broker.bind_queue("x", "a", "k1")                     # binding twice is not a new binding
    with pytest.raises(BrokerError, match="too many bindings"):
        broker.bind_queue("x", "a", "k2")


DOCUMENT_NAMES = ("declare_queue", "declare_exchange", "bind_queue", "publish",
                  "register_consumer", "consume", "acknowledge", "retry_unacknowledged")


def test_the_design_documents_operations_are_broker_methods_mapped_in_the_docs():
    """Each server function the design document names is one Broker method, and the map says so."""
    architecture = (Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURE.md").read_text()
    table = architecture.split("## From the design document to the code (broker)", 1)[1]
    for name in DOCUMENT_NAMES:
        assert callable(getattr(Broker, name, None)), name
        assert "| `%s` | `Broker.%s`" % (name, name) in table, name


def test_pulled_and_pushed_messages_go_through_the_document_names(broker, clock):
    """The document's names together: push, pull, acknowledge, and retry what was not acked."""
    pusher, puller = broker.open_session("push"), broker.open_session("pull")
    publish(broker, "p1")
    publish(broker, "p2")
    assert broker.consume(puller, "default_queue")[0] == "p1"
    broker.register_consumer(pusher, "default_queue", 0)
    assert pushed(broker, pusher) == ["p2"]
    assert broker.acknowledge(pusher, "p2") is True
    clock.advance(31)
    broker.retry_unacknowledged()
    assert pushed(broker, pusher) == ["p1"]         # taken back from the puller, pushed again


def test_a_batch_is_delivered_and_acked_exactly_as_one_at_a_time(clock):
    """Batches (publish_many, acknowledge_many) hand over exactly what single calls would."""
    def run(batched):
        broker = Broker(max_unacked=4, clock=clock)
        broker.declare_defaults()
        broker.declare_queue("other")
        broker.bind_queue("default_exchange", "other", "other_key")
        first, second = broker.open_session("first"), broker.open_session("second")
        broker.register_consumer(first, "default_queue", 3)
        broker.register_consumer(second, "default_queue", 2)
        broker.register_consumer(first, "other", 0)
        publishes = [("default_exchange", "other_key" if n % 3 == 0 else "default_key",
                      "m%d" % n, b'{"message_id": "m%d"}' % n) for n in range(12)]
        if batched:
            results, _ = broker.publish_many(publishes)
        else:
            results = [broker.publish(*item) for item in publishes]
        seen = [results, pushed(broker, first), pushed(broker, second)]
        acks = seen[1][:3] + ["m99"]            # the last is refused: never delivered
        if batched:
            results, _ = broker.acknowledge_many(first, acks)
        else:
            results = []
            for message_id in acks:
                try:
                    results.append(broker.acknowledge(first, message_id))
                except BrokerError as exc:
                    results.append(exc)
        seen += [[str(r) for r in results], pushed(broker, first), pushed(broker, second),
                 broker.stats()["queues"]]
        return seen

    assert run(batched=True) == run(batched=False)


def test_refused_publishes_and_acks_are_freed_at_once_not_by_the_garbage_collector():
    """A batch refused at max_memory (and a refused ack) forms no reference cycle: its
    envelopes are freed as soon as the caller lets go of the results."""
    broker = Broker(max_memory=10)
    broker.declare_defaults()
    body = b'{"message_id": "m1", "ciphertext": "%s"}' % (b"QUJD" * 100)
    ids = ["never-delivered"]
    body_refs, ids_refs = sys.getrefcount(body), sys.getrefcount(ids)
    collecting = gc.isenabled()
    gc.disable()                # a collection now would hide a cycle
    try:
        results, _ = broker.publish_many([("default_exchange", "default_key", "m1", body)])
        assert str(results[0]) == "broker memory limit reached"
        del results
        acks, _ = broker.acknowledge_many(broker.open_session("s"), ids)
        assert isinstance(acks[0], BrokerError)
        del acks
        assert (sys.getrefcount(body), sys.getrefcount(ids)) == (body_refs, ids_refs)
    finally:
        if collecting:
            gc.enable()
