"""Hung consumers, reject and ids bound to content: the broker's rules on a fake clock.

Issue 10, items 1-3.  A consumer that stops reading must not turn its messages
into dead letters; a refusal must be visible in ``<queue>.dead``; a known id
with a different envelope must be refused, not silently dropped.
"""
import json

import pytest
from conftest import FakeClock

from ciphermq import recovery
from ciphermq.broker import Broker
from ciphermq.errors import BrokerError
from ciphermq.recovery import envelope_digest


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def broker(clock):
    broker = Broker(redelivery_interval=30.0, max_deliveries=3, consumer_timeout=300.0,
                    clock=clock)
    broker.declare_defaults()
    return broker


def body(message_id, text="x"):
    return b'{"message_id": "%s", "ciphertext": "%s"}' % (message_id.encode(), text.encode())


def publish(broker, message_id, text="x"):
    return broker.publish("default_exchange", "default_key", message_id, body(message_id, text))


def pushed(broker, session):
    return [delivery[0] for delivery in broker.take_pushes(session)]


def queues(broker):
    return broker.stats()["queues"]


# -- 1. hung consumers -------------------------------------------------------------------

def test_a_silent_consumer_never_dead_letters_its_messages(broker, clock):
    """Many redelivery intervals at a consumer that says nothing send nothing to .dead."""
    session = broker.open_session("hung")
    broker.register_consumer(session, "default_queue", 10)
    for i in range(3):
        publish(broker, "m%d" % i)
    assert pushed(broker, session) == ["m0", "m1", "m2"]
    for _ in range(9):                      # 270 s: three times max_deliveries intervals
        clock.advance(30)
        broker.retry_unacknowledged()
    assert broker.stats()["totals"]["dead_lettered"] == 0
    assert queues(broker)["default_queue"]["unacked"] == 3


def test_a_silent_consumer_gets_each_push_again_at_most_once(broker, clock):
    """Pushes to a consumer that reads nothing do not pile up: one repeat, then they wait."""
    session = broker.open_session("hung")
    broker.register_consumer(session, "default_queue", 10)
    publish(broker, "m0")
    pushes = pushed(broker, session)
    for _ in range(8):
        clock.advance(30)
        broker.retry_unacknowledged()
        pushes += pushed(broker, session)
    assert pushes == ["m0", "m0"]


def test_a_silent_consumers_messages_move_to_a_consumer_with_room(broker, clock):
    """Overdue messages of a stalled consumer go to another one, and are not counted."""
    hung, alive = broker.open_session("hung"), broker.open_session("alive")
    broker.register_consumer(hung, "default_queue", 10)
    publish(broker, "m0")
    assert pushed(broker, hung) == ["m0"]
    broker.register_consumer(alive, "default_queue", 10)
    clock.advance(31)
    broker.retry_unacknowledged()
    [(message_id, _, count)] = broker.take_pushes(alive)
    assert (message_id, count) == ("m0", 2)
    assert pushed(broker, hung) == []
    publish(broker, "m1")                   # new work skips the stalled consumer too
    assert pushed(broker, alive) == ["m1"]
    assert broker.acknowledge(alive, "m0") is True


def test_consumer_timeout_disconnects_and_requeues(broker, clock):
    """A consumer silent for consumer_timeout is hung up on; its messages are ready again."""
    hung_up = []
    session = broker.open_session("hung", hang_up=lambda: hung_up.append(True))
    broker.register_consumer(session, "default_queue", 10)
    publish(broker, "m0")
    clock.advance(299)
    broker.retry_unacknowledged()
    assert hung_up == []
    clock.advance(2)
    broker.retry_unacknowledged()
    assert hung_up == [True]
    assert queues(broker)["default_queue"] == {"ready": 1, "unacked": 0, "consumers": 0}
    with pytest.raises(BrokerError):
        broker.acknowledge(session, "m0")


def test_an_acking_consumer_is_not_timed_out(broker, clock):
    """A slow consumer that keeps acking something is never disconnected."""
    hung_up = []
    session = broker.open_session("slow", hang_up=lambda: hung_up.append(True))
    broker.register_consumer(session, "default_queue", 1)
    for i in range(15):
        publish(broker, "m%d" % i)
    for i in range(15):                     # 435 s in all, each acked within 29 s
        assert pushed(broker, session) == ["m%d" % i]
        clock.advance(29)
        broker.retry_unacknowledged()
        broker.acknowledge(session, "m%d" % i)
    assert hung_up == []


def test_poison_message_still_dead_letters_by_disconnects(broker, clock):
    """Give-backs still count: a message whose consumer dies with it max times goes to .dead."""
    publish(broker, "poison")
    for attempt in range(3):
        session = broker.open_session("s%d" % attempt)
        broker.register_consumer(session, "default_queue", 10)
        assert pushed(broker, session) == ["poison"]
        broker.close_session(session)
    assert queues(broker)["default_queue.dead"]["ready"] == 1


def test_timeout_dead_letters_a_message_a_live_consumer_ignores(broker, clock):
    """A consumer that acks others but never this one gives it back, counted, each interval."""
    session = broker.open_session("picky")
    broker.register_consumer(session, "default_queue", 10)
    publish(broker, "poison")
    for attempt in range(3):
        assert pushed(broker, session) == ["poison"]
        clock.advance(1)
        publish(broker, "ok%d" % attempt)
        assert pushed(broker, session) == ["ok%d" % attempt]
        broker.acknowledge(session, "ok%d" % attempt)
        clock.advance(30)
        broker.retry_unacknowledged()
    assert queues(broker)["default_queue.dead"]["ready"] == 1


# -- 2. reject ---------------------------------------------------------------------------

def test_reject_moves_the_message_to_dead_with_its_reason(broker):
    """reject puts the message in <queue>.dead at once, and its reason travels with it."""
    session, rescuer = broker.open_session("r"), broker.open_session("rescuer")
    publish(broker, "old")
    broker.consume(session, "default_queue")
    broker.reject(session, "old", "older than --max-age 5 s")
    assert queues(broker)["default_queue"] == {"ready": 0, "unacked": 0, "consumers": 0}
    message_id, delivered, count = broker.consume(rescuer, "default_queue.dead")
    assert message_id == "old"
    assert json.loads(delivered)["dead_reason"] == "rejected: older than --max-age 5 s"
    with pytest.raises(BrokerError, match="already in default_queue.dead"):
        broker.reject(rescuer, "old", "again")


def test_reject_of_a_message_not_held_is_refused(broker):
    """Only the holder may reject, as only the holder may ack."""
    session = broker.open_session("r")
    publish(broker, "m0")
    with pytest.raises(BrokerError, match="not delivered to this connection"):
        broker.reject(session, "m0", "no")
    assert queues(broker)["default_queue"]["ready"] == 1


def test_reject_and_its_reason_survive_a_replay(broker):
    """The dead-letter record of a reject carries the reason through a journal replay."""
    records = [recovery.queue_record("default_queue"),
               recovery.publish_record("old", ["default_queue"], body("old")),
               recovery.dead_letter_record("old", "default_queue", "default_queue.dead",
                                           "rejected: stale")]
    state = recovery.fold(records)
    again = Broker()
    again.restore(state)
    session = again.open_session("s")
    _, delivered, _ = again.consume(session, "default_queue.dead")
    assert json.loads(delivered)["dead_reason"] == "rejected: stale"
    replayed = recovery.fold(recovery.snapshot_records(state))
    assert replayed.reasons == {"old": "rejected: stale"}


# -- 3. ids bind content -----------------------------------------------------------------

def test_same_id_same_bytes_is_a_duplicate(broker):
    """A retried publish with the same envelope is re-ACKed as a duplicate."""
    assert publish(broker, "m0") is True
    assert publish(broker, "m0") is False


def test_same_id_different_bytes_is_refused_live_and_acked(broker):
    """A known id with another envelope is refused, while queued and after its ack."""
    session = broker.open_session("s")
    publish(broker, "m0", "first")
    with pytest.raises(BrokerError, match="message_id m0 already used for different content"):
        publish(broker, "m0", "second")
    broker.consume(session, "default_queue")
    broker.acknowledge(session, "m0")
    results, _ = broker.publish_many([("default_exchange", "default_key", "m0",
                                       body("m0", "second"))])
    assert isinstance(results[0], BrokerError)
    assert "already used for different content" in str(results[0])
    assert broker.stats()["queues"]["default_queue"]["ready"] == 0


def test_digests_of_acked_ids_survive_the_journal():
    """After a replay (and a compaction) a reused id with new content is still refused."""
    records = [recovery.queue_record("default_queue"),
               recovery.publish_record("m0", ["default_queue"], body("m0", "first")),
               recovery.ack_record("m0", "default_queue", 1000,
                                   envelope_digest(body("m0", "first")))]
    for state in (recovery.fold(records),
                  recovery.fold(recovery.snapshot_records(recovery.fold(records)))):
        again = Broker(wall_clock=lambda: 2.0)
        again.restore(state)
        again.declare_defaults()
        assert again.publish("default_exchange", "default_key", "m0",
                             body("m0", "first")) is False
        with pytest.raises(BrokerError, match="already used for different content"):
            again.publish("default_exchange", "default_key", "m0", body("m0", "second"))


def test_reject_arguments_are_checked_and_the_reason_tamed():
    """reject needs an id; its reason is printable ASCII, one line, at most 200 characters."""
    from ciphermq import protocol
    from ciphermq.errors import ProtocolError
    with pytest.raises(ProtocolError, match=r"usage: reject <message_id> \[reason\]"):
        protocol.parse_reject(b"")
    with pytest.raises(ProtocolError, match="invalid message id name"):
        protocol.parse_reject(b"a/b why")
    assert protocol.parse_reject(b"m1") == ("m1", "no reason given")
    assert protocol.parse_reject(b"m1  too\told \x01\xff  ") == ("m1", "too old ??")
    assert protocol.parse_reject(b"m1 " + b"x" * 500)[1] == "x" * protocol.MAX_REJECT_REASON


def test_reject_on_the_wire(connect):
    """reject answers REJECT_CONFIRMED and the message is in <queue>.dead with its reason."""
    from conftest import parse_message, publish_line
    client = connect()
    assert client.call(publish_line("wr-1").strip()) == "ACK wr-1"
    assert parse_message(client.call("fetch default_queue"))[0] == "wr-1"
    assert client.call("reject wr-1 tampered envelope") == "REJECT_CONFIRMED wr-1"
    message_id, envelope = parse_message(client.call("fetch default_queue.dead"))
    assert (message_id, envelope["dead_reason"]) == ("wr-1", "rejected: tampered envelope")
    assert client.call("reject wr-2") == \
        "Error: message 'wr-2' is not delivered to this connection"


def test_a_push_chaos_lost_is_redelivered_to_a_silent_consumer(broker, clock):
    """A push chaos mode dropped comes back at every interval, however silent the consumer."""
    session = broker.open_session("s")
    broker.register_consumer(session, "default_queue", 10)
    publish(broker, "m0")
    pushes = []
    for _ in range(3):
        pushes += pushed(broker, session)
        broker.lose_pushes(session, ["m0"])
        clock.advance(31)
        broker.retry_unacknowledged()
    assert pushes == ["m0", "m0", "m0"]


def test_a_slow_consumer_behind_its_prefetch_is_not_counted(broker, clock):
    """Overdue messages a consumer has not reached yet (it acks older ones) wait, uncounted."""
    session = broker.open_session("slow")
    broker.register_consumer(session, "default_queue", 10)
    for i in range(4):
        publish(broker, "m%d" % i)
    assert pushed(broker, session) == ["m0", "m1", "m2", "m3"]
    for i in range(4):                      # one message every 31 s: the rest are overdue
        clock.advance(31)
        broker.acknowledge(session, "m%d" % i)
        broker.retry_unacknowledged()
        assert pushed(broker, session) == []
    assert broker.stats()["totals"]["redelivered"] == 0
    assert broker.stats()["totals"]["acked"] == 4
