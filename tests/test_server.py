"""The broker over real sockets: every command, framing, delivery and failure rules."""
import json
import socket
import threading

import pytest
from conftest import WAIT, FakeClock, Wire, envelope, parse_message, publish_line

from ciphermq.config import ServerConfig
from ciphermq.server import BrokerServer


def consume_ids(client, count):
    """Read `count` pushed messages; return their ids in arrival order."""
    return [parse_message(client.line())[0] for _ in range(count)]


# -- every command --------------------------------------------------------

def test_ping(connect):
    """ping answers PONG."""
    assert connect().call("ping") == "PONG"


def test_declarations_and_binding(connect):
    """declare_queue is idempotent; bind needs both ends to exist."""
    client = connect()
    assert client.call("declare_queue q1") == "Queue declared"
    assert client.call("declare_queue q1") == "Queue declared"
    assert client.call("declare_exchange ex1") == "Exchange declared"
    assert client.call("declare_exchange ex2 fanout") == "Exchange declared"
    assert client.call("bind ex1 q1 k") == "Queue bound"
    assert client.call("bind nope q1 k") == "Error: unknown exchange 'nope'"
    assert client.call("bind ex1 nope k") == "Error: unknown queue 'nope'"
    assert client.call("declare_exchange ex1 topic") == \
        "Error: exchange 'ex1' already exists with type direct"
    assert client.call("declare_exchange ex3 weird").startswith("Error: unknown exchange type")


def test_publish_consume_ack_round_trip(connect):
    """The document's exchange: publish -> ACK, consume -> Message, ack -> ACK_CONFIRMED."""
    sender, receiver = connect(), connect()
    env = envelope("m-1", extra_field={"kept": True})
    reply = sender.call("publish default_exchange default_key " + json.dumps(env))
    assert reply == "ACK m-1"
    assert receiver.call("consume default_queue") == "Subscribed to queue"
    message_id, pushed = parse_message(receiver.line())
    assert message_id == "m-1"
    assert pushed == dict(env, delivery_count=1), "envelope forwarded untouched + delivery_count"
    assert receiver.call("ack m-1") == "ACK_CONFIRMED m-1"
    stats = json.loads(receiver.call("stats"))
    assert stats["queues"]["default_queue"] == {"ready": 0, "unacked": 0, "consumers": 1}
    assert stats["totals"] == {"published": 1, "duplicates": 0, "delivered": 1,
                               "redelivered": 0, "acked": 1, "dead_lettered": 0}


def test_subscribe_reply_precedes_queued_messages(connect):
    """A consumer always reads 'Subscribed to queue' before the first pushed message."""
    sender = connect()
    for i in range(50):
        sender.send(publish_line("q-%d" % i))
    for _ in range(50):
        assert sender.text().startswith("ACK ")
    receiver = connect()
    assert receiver.call("consume default_queue") == "Subscribed to queue"
    assert consume_ids(receiver, 50) == ["q-%d" % i for i in range(50)]


def test_fetch_pull_mode(connect):
    """fetch returns one message or 'No messages'; the fetched message must be acked."""
    client = connect()
    assert client.call("fetch default_queue") == "No messages"
    client.call(publish_line("f-1").strip())
    message_id, body = parse_message(client.call("fetch default_queue"))
    assert (message_id, body["delivery_count"]) == ("f-1", 1)
    assert client.call("fetch default_queue") == "No messages"
    assert client.call("ack f-1") == "ACK_CONFIRMED f-1"


def test_fetched_but_unacked_message_survives_disconnect(connect):
    """A fetched message is not lost when its client vanishes (the original popped it)."""
    first = connect()
    first.call(publish_line("f-2").strip())
    assert parse_message(first.call("fetch default_queue"))[0] == "f-2"
    first.close()
    second = connect()
    second.call("consume default_queue")
    message_id, body = parse_message(second.line())
    assert (message_id, body["delivery_count"]) == ("f-2", 2)


def test_nack_gives_the_message_back(connect):
    """nack returns the message at once for another delivery."""
    client = connect()
    client.call(publish_line("n-1").strip())
    client.call("fetch default_queue")
    assert client.call("nack n-1") == "NACK_CONFIRMED n-1"
    assert parse_message(client.call("fetch default_queue"))[1]["delivery_count"] == 2
    assert client.call("nack unknown-id").startswith("Error: ")


def test_topic_and_fanout_exchanges(connect):
    """Topic wildcards and fanout route over the wire as documented."""
    client = connect()
    for command in ("declare_exchange logs topic", "declare_queue errors", "declare_queue all",
                    "bind logs errors *.error", "bind logs all #",
                    "declare_exchange bcast fanout", "bind bcast errors x", "bind bcast all y"):
        assert not client.call(command).startswith("Error")
    assert client.call(publish_line("t-1", "logs", "db.error").strip()) == "ACK t-1"
    assert client.call(publish_line("t-2", "logs", "db.info").strip()) == "ACK t-2"
    assert client.call(publish_line("t-3", "bcast", "whatever").strip()) == "ACK t-3"
    assert client.call(publish_line("t-4", "logs", "nothing").strip()) == "ACK t-4"
    stats = json.loads(client.call("stats"))["queues"]
    assert stats["errors"]["ready"] == 2 and stats["all"]["ready"] == 4
    assert client.call(publish_line("t-5", "default_exchange", "nobody").strip()) == \
        "Error: unroutable: exchange 'default_exchange' has no queue bound for key 'nobody'"


# -- framing ----------------------------------------------------------------

def test_pipelined_commands_in_one_write(connect):
    """Many commands in one segment each get their reply, in order."""
    client = connect()
    batch = "ping\n" + "".join(publish_line("p-%d" % i) for i in range(20)) + "stats\nping\n"
    client.send(batch)
    assert client.text() == "PONG"
    assert [client.text() for _ in range(20)] == ["ACK p-%d" % i for i in range(20)]
    assert json.loads(client.text())["totals"]["published"] == 20
    assert client.text() == "PONG"


def test_command_split_into_one_byte_writes(connect):
    """A command dribbled one byte per segment is understood once complete."""
    client = connect()
    line = publish_line("split-1").encode()
    for i in range(len(line)):
        client.send(line[i:i + 1])
    assert client.text() == "ACK split-1"


def test_one_megabyte_envelope(connect):
    """A 1 MB envelope (far beyond 1024 bytes) is stored and delivered intact."""
    sender, receiver = connect(), connect()
    big = envelope("big-1", ciphertext="A" * (1024 * 1024))
    assert sender.call("publish default_exchange default_key " + json.dumps(big)) == "ACK big-1"
    receiver.call("consume default_queue")
    message_id, body = parse_message(receiver.line())
    assert body["ciphertext"] == big["ciphertext"]


def test_crlf_line_endings_accepted(connect):
    """\\r\\n works like \\n."""
    client = connect()
    client.send("ping\r\nping\r\n")
    assert [client.text(), client.text()] == ["PONG", "PONG"]


# -- bad input: an Error line, connection stays usable --------------------------

@pytest.mark.parametrize("raw, expected", [
    (b"bogus\n", "Error: unknown command 'bogus'"),
    (b"\xff\xfe\xfd\n", "Error: invalid UTF-8 in command"),
    (b"ping\x00\n", "Error: NUL byte in command"),
    (b"publish default_exchange default_key {not json}\n", "Error: invalid JSON"),
    (b"publish default_exchange default_key [1,2]\n", "Error: envelope must be a JSON object"),
    (b'publish default_exchange default_key {"message_id": 5, "enc_session_key": "", '
     b'"nonce": "", "tag": "", "ciphertext": ""}\n', "Error: field 'message_id' must be a string"),
    (b'publish default_exchange default_key {"message_id": "x"}\n',
     "Error: missing field 'enc_session_key'"),
    (b'publish default_exchange default_key {"message_id": "\xc3\x28", "enc_session_key": ""}\n',
     "Error: invalid UTF-8 in envelope"),
    (b"publish default_exchange\n", "Error: usage: publish <exchange> <routing_key> <json>"),
    (b"consume\n", "Error: usage: consume <queue> [prefetch]"),
    (b"consume default_queue lots\n", "Error: prefetch must be an integer"),
    (b"consume no_such_queue\n", "Error: unknown queue 'no_such_queue'"),
    (b"declare_queue bad/name\n", "Error: invalid queue name"),
    (b"ack\n", "Error: usage: ack <message_id>"),
    (b"ping extra\n", "Error: usage: ping"),
])
def test_bad_input_gets_an_error_and_the_connection_goes_on(connect, raw, expected):
    """Each malformed command gets one 'Error: ...' line; the next command still works."""
    client = connect()
    client.send(raw + b"ping\n")
    assert client.text().startswith(expected)
    assert client.text() == "PONG"


def test_over_long_line_is_refused_and_connection_survives(start_server):
    """A line over --max-line-bytes gets an error; the connection keeps working."""
    server = start_server(max_line_bytes=1000)
    client = Wire(server.address)
    try:
        client.send(b"x" * 5000 + b"\nping\n")
        assert client.text() == "Error: line too long (max 1000 bytes)"
        assert client.text() == "PONG"
    finally:
        client.close()


# -- exactly-once delivery rules ----------------------------------------------------

def test_duplicate_publish_is_reacked_and_delivered_once(connect):
    """The sender's retry after a lost ACK gets 'ACK <id>' again; the receiver sees it once."""
    sender, receiver = connect(), connect()
    line = publish_line("dup-1")
    assert sender.call(line.strip()) == "ACK dup-1"
    assert sender.call(line.strip()) == "ACK dup-1"
    receiver.call("consume default_queue")
    assert consume_ids(receiver, 1) == ["dup-1"]
    receiver.call("ack dup-1")
    assert sender.call(line.strip()) == "ACK dup-1", "still a duplicate after the ack"
    pushed, queue = receiver.settled()
    assert pushed == [] and (queue["ready"], queue["unacked"]) == (0, 0), "stored again"
    assert json.loads(sender.call("stats"))["totals"]["duplicates"] == 2


def test_two_consumers_share_100_messages_none_twice(connect):
    """Consumers compete: every message goes to exactly one of them."""
    sender, first, second = connect(), connect(), connect()
    assert first.call("consume default_queue 0") == "Subscribed to queue"
    assert second.call("consume default_queue 0") == "Subscribed to queue"
    sender.send("".join(publish_line("c-%d" % i) for i in range(100)))
    for _ in range(100):
        assert sender.text().startswith("ACK")
    stats = json.loads(sender.call("stats"))["queues"]["default_queue"]
    assert stats == {"ready": 0, "unacked": 100, "consumers": 2}
    got_first = consume_ids(first, 50)
    got_second = consume_ids(second, 50)
    assert sorted(got_first + got_second) == sorted("c-%d" % i for i in range(100))
    assert first.settled()[0] == second.settled()[0] == [], "a message was pushed twice"


def test_consumer_killed_mid_stream_its_messages_go_to_the_other(connect):
    """Unacked messages of a consumer that disconnects are redelivered to the survivor."""
    sender, doomed, survivor = connect(), connect(), connect()
    doomed.call("consume default_queue 5")
    sender.send("".join(publish_line("k-%d" % i) for i in range(10)))
    for _ in range(10):
        sender.text()
    doomed_got = consume_ids(doomed, 5)
    doomed.call("ack " + doomed_got[0])
    doomed.close()
    survivor.call("consume default_queue 0")
    survivor_got = consume_ids(survivor, 9)
    assert sorted(survivor_got + doomed_got[:1]) == sorted("k-%d" % i for i in range(10))
    pushed, queue = survivor.settled()
    assert pushed == [] and (queue["ready"], queue["unacked"]) == (0, 9)


def test_redelivery_after_the_interval(start_server):
    """A message delivered but never acked is pushed again once the interval passes."""
    server = start_server(redelivery_interval=0.2)
    client = Wire(server.address)
    try:
        client.call("consume default_queue")
        client.call(publish_line("r-1").strip())
        first = parse_message(client.line())
        second = parse_message(client.line())    # arrives after ~0.2 s, no ack sent
        assert first[0] == second[0] == "r-1"
        assert (first[1]["delivery_count"], second[1]["delivery_count"]) == (1, 2)
        client.send("ack r-1\n")
        line = client.text()
        while line.startswith("Message: r-1 "):    # a slow machine may see a third delivery
            line = client.text()
        assert line == "ACK_CONFIRMED r-1"
        _, queue = client.settled()
        assert (queue["ready"], queue["unacked"]) == (0, 0), "acked, yet still held"
    finally:
        client.close()


def test_fetch_without_ack_is_redelivered(start_server):
    """A fetched message that is never acked comes back after the interval."""
    server = start_server(redelivery_interval=0.2)
    client, other = Wire(server.address), Wire(server.address)
    try:
        client.call(publish_line("fr-1").strip())
        assert parse_message(client.call("fetch default_queue"))[0] == "fr-1"
        other.call("consume default_queue")
        message_id, body = parse_message(other.line())
        assert (message_id, body["delivery_count"]) == ("fr-1", 2)
    finally:
        client.close()
        other.close()


def test_dead_letter_after_max_deliveries(start_server):
    """A message given back max-deliveries times ends in <queue>.dead, not lost, not looping."""
    server = start_server(redelivery_interval=30, max_deliveries=3)
    client, rescuer = Wire(server.address), Wire(server.address)
    try:
        client.call("consume default_queue")
        client.call(publish_line("poison-1").strip())
        counts, lines = [], [client.text()]
        for _ in range(3):          # a nack's reply and the next push may come either way round
            push = next(line for line in lines if line.startswith("Message:"))
            counts.append(parse_message(push)[1]["delivery_count"])
            client.send("nack poison-1\n")
            lines = [client.text()]
            if lines[0] != "NACK_CONFIRMED poison-1":
                lines.append(client.text())
                assert "NACK_CONFIRMED poison-1" in lines
            elif len(counts) < 3:
                lines = [client.text()]
        assert counts == [1, 2, 3]
        rescuer.call("consume default_queue.dead")
        message_id, body = parse_message(rescuer.line())
        assert (message_id, body["delivery_count"]) == ("poison-1", 1)
        assert rescuer.call("ack poison-1") == "ACK_CONFIRMED poison-1"
        stats = json.loads(rescuer.call("stats"))
        assert stats["totals"]["dead_lettered"] == 1
        for name in ("default_queue", "default_queue.dead"):
            queue = stats["queues"][name]
            assert (queue["ready"], queue["unacked"]) == (0, 0), "poison-1 still in " + name
    finally:
        client.close()
        rescuer.close()


def test_foreign_ack_is_refused_and_changes_nothing(connect):
    """A connection cannot ack a message delivered to another one."""
    owner, stranger = connect(), connect()
    owner.call(publish_line("own-1").strip())
    owner.call("fetch default_queue")
    assert stranger.call("ack own-1") == \
        "Error: message 'own-1' is not delivered to this connection"
    assert json.loads(owner.call("stats"))["queues"]["default_queue"]["unacked"] == 1
    assert owner.call("ack own-1") == "ACK_CONFIRMED own-1"


def test_a_late_ack_from_a_consumer_that_lost_the_message_is_refused(start_server):
    """Stale ack: once an unacked message is taken back and handed to another consumer, the
    first consumer's late ack is refused and the new holder's ack is the one that counts."""
    clock = FakeClock()
    server = start_server(redelivery_interval=30.0, clock=clock)
    slow, other = Wire(server.address), Wire(server.address)
    try:
        assert slow.call(publish_line("stale-1").strip()) == "ACK stale-1"
        message_id, body = parse_message(slow.call("fetch default_queue"))
        assert (message_id, body["delivery_count"]) == ("stale-1", 1)
        clock.advance(31)
        server.broker.retry_unacknowledged()        # what the timer does when it is due
        message_id, body = parse_message(other.call("fetch default_queue"))
        assert (message_id, body["delivery_count"]) == ("stale-1", 2)
        assert slow.call("ack stale-1") == \
            "Error: message 'stale-1' is not delivered to this connection"
        queue = json.loads(slow.call("stats"))["queues"]["default_queue"]
        assert (queue["ready"], queue["unacked"]) == (0, 1), "the late ack took the message"
        assert other.call("ack stale-1") == "ACK_CONFIRMED stale-1"
    finally:
        slow.close()
        other.close()


def test_repeated_ack_is_confirmed_again(connect):
    """The receiver's retry after a lost confirmation gets ACK_CONFIRMED again."""
    client = connect()
    client.call(publish_line("again-1").strip())
    client.call("fetch default_queue")
    assert client.call("ack again-1") == "ACK_CONFIRMED again-1"
    assert client.call("ack again-1") == "ACK_CONFIRMED again-1"
    totals = json.loads(client.call("stats"))["totals"]
    assert totals["acked"] == 1


def test_queue_full_refuses_without_dropping(start_server):
    """Past --max-queue-length publish answers 'queue is full' and keeps what it had."""
    server = start_server(max_queue_length=3)
    client = Wire(server.address)
    try:
        for i in range(3):
            assert client.call(publish_line("full-%d" % i).strip()) == "ACK full-%d" % i
        assert client.call(publish_line("full-3").strip()) == \
            "Error: queue 'default_queue' is full"
        client.call("consume default_queue")
        assert consume_ids(client, 3) == ["full-0", "full-1", "full-2"]
    finally:
        client.close()


# -- no client can stall another -------------------------------------------------

def test_consumer_that_never_reads_does_not_stall_others(start_server):
    """A consumer that stops reading blocks only itself; it is dropped at its write deadline
    and everything it held goes to a live consumer."""
    server = start_server(write_timeout=1.0)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # fills after a few messages
    stuck.connect(server.address)
    sender, bystander, live = Wire(server.address), Wire(server.address), Wire(server.address)
    try:
        stuck.sendall(b"consume default_queue 0\n")
        assert bystander.call("ping") == "PONG"   # the subscribe has been processed by now
        count, payload = 200, "B" * 50_000        # 10 MB: far more than socket buffers hold
        for i in range(count):
            sender.send(publish_line("s-%d" % i, ciphertext=payload))
            assert sender.text() == "ACK s-%d" % i, "the publisher is never held up"
            if i == count // 2:
                assert bystander.call("ping") == "PONG"
        assert live.call("consume default_queue 0") == "Subscribed to queue"
        got = consume_ids(live, count)           # includes all the stuck consumer held
        assert sorted(got) == sorted("s-%d" % i for i in range(count))
        assert json.loads(bystander.call("stats"))["queues"]["default_queue"]["consumers"] == 1
    finally:
        for client in (sender, bystander, live):
            client.close()
        stuck.close()


def test_two_hundred_idle_connections(start_server):
    """200 idle clients do not stop the broker serving a 201st."""
    server = start_server()
    idle = [Wire(server.address) for _ in range(200)]
    try:
        active = Wire(server.address)
        assert active.call("ping") == "PONG"
        assert active.call(publish_line("idle-1").strip()) == "ACK idle-1"
        assert all(client.call("ping") == "PONG" for client in idle[::20])
        active.close()
    finally:
        for client in idle:
            client.close()


def test_connections_beyond_the_limit_are_refused_cleanly(start_server):
    """Past --max-connections a client gets one Error line and a clean close."""
    server = start_server(max_connections=2)
    first, second = Wire(server.address), Wire(server.address)
    try:
        assert first.call("ping") == second.call("ping") == "PONG"
        third = Wire(server.address)
        assert third.text() == "Error: too many connections (max 2)"
        assert third.closed_by_peer() == b""
        third.close()
        assert first.call("ping") == "PONG"
    finally:
        first.close()
        second.close()


def test_clean_shutdown_leaves_no_thread_running():
    """stop() closes every connection and joins every thread it started."""
    before = set(threading.enumerate())
    server = BrokerServer(ServerConfig(port=0)).start()
    publisher, consumer = Wire(server.address), Wire(server.address)
    consumer.call("consume default_queue 1")
    publisher.call(publish_line("bye-1").strip())
    publisher.call(publish_line("bye-2").strip())
    parse_message(consumer.line())
    server.stop()
    assert consumer.closed_by_peer() == b""
    assert publisher.closed_by_peer() == b""
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []
    consumer.close()
    publisher.close()
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=WAIT)
