"""Ids bind content (issue 10, item 3): a known message_id with other bytes is refused."""
import json

from conftest import Wire, envelope, parse_message, publish_line
from scripts import run_sender

from ciphermq.outbox import Outbox, record


def test_a_reused_id_with_different_content_gets_an_error_on_the_wire(connect):
    """Same id + same bytes is re-ACKed; same id + other bytes is an Error, stored nowhere."""
    client = connect()
    first = publish_line("reused-1", ciphertext="Zmlyc3Q=")
    assert client.call(first.strip()) == "ACK reused-1"
    assert client.call(first.strip()) == "ACK reused-1"
    assert client.call(publish_line("reused-1", ciphertext="c2Vjb25k").strip()) == \
        "Error: message_id reused-1 already used for different content"
    assert client.call("fetch default_queue").endswith('"ciphertext": "Zmlyc3Q=", '
                                                        '"delivery_count": 1}')
    assert client.call("ack reused-1") == "ACK_CONFIRMED reused-1"
    assert client.call(publish_line("reused-1", ciphertext="c2Vjb25k").strip()) == \
        "Error: message_id reused-1 already used for different content", "after the ack too"


def _refused_unless_the_same_bytes(client, message_ids):
    """Each id: its first envelope is re-ACKed, another one is refused."""
    for message_id in message_ids:
        assert client.call(publish_line(message_id, ciphertext="c2Vjb25k").strip()) == \
            "Error: message_id %s already used for different content" % message_id
        assert client.call(publish_line(message_id, ciphertext="Zmlyc3Q=").strip()) == \
            "ACK " + message_id


def test_an_id_stays_bound_queued_in_flight_acked_and_across_restarts(start_server, tmp_path):
    """An id stays bound to its envelope while queued, in flight and acked, and after a restart
    and a compaction of the journal (live ids by their stored bytes, acked ids by a digest)."""
    data_dir = str(tmp_path / "data")
    ids = ("bound-acked", "bound-in-flight", "bound-queued")
    first = start_server(data_dir=data_dir, redelivery_interval=30.0)
    client = Wire(first.address)
    try:
        for message_id in ids:
            assert client.call(publish_line(message_id, ciphertext="Zmlyc3Q=").strip()) == \
                "ACK " + message_id
        assert parse_message(client.call("fetch default_queue"))[0] == "bound-acked"
        assert client.call("ack bound-acked") == "ACK_CONFIRMED bound-acked"
        assert parse_message(client.call("fetch default_queue"))[0] == "bound-in-flight"
        _refused_unless_the_same_bytes(client, ids)
    finally:
        client.close()
    first.stop()
    ready = 2                           # bound-in-flight is ready again after a restart
    for compact in (True, False):       # restart, compact, restart again
        server = start_server(data_dir=data_dir, redelivery_interval=30.0)
        client = Wire(server.address)
        try:
            _refused_unless_the_same_bytes(client, ids)
            stats = json.loads(client.call("stats"))
            assert stats["queues"]["default_queue"]["ready"] == ready, "nothing refused stored"
            assert stats["totals"]["published"] == 0
            if compact:
                ready += 1
                server.broker.journal.request_compaction()
                # The compaction is done before the next record is durable.
                assert client.call(publish_line("after-compaction").strip()) == \
                    "ACK after-compaction"
                assert server.broker.journal.compactions == 1
        finally:
            client.close()
        server.stop()


def test_the_sender_reports_a_reused_id_as_refused_once(server, connect, keys, tmp_path):
    """The Sender shows the refusal once, moves the message to its rejects file (final),
    and does not send it again."""
    assert connect().call(publish_line("taken-1", ciphertext="Zmlyc3Q=").strip()) == \
        "ACK taken-1"
    outbox = tmp_path / "outbox.json"
    with Outbox(outbox) as pending:
        pending.add([record(envelope("taken-1", ciphertext="b3RoZXI="),
                            "default_exchange", "default_key")])
    result = run_sender(server.address[1], keys, outbox, "--message", "fresh")
    refusals = [line for line in result.stdout.splitlines() if "taken-1" in line and
                ("refused" in line or "Sending" in line)]
    assert refusals == [
        "🚀 [SENDER] Sending message taken-1...",
        "🚫 [SENDER] Message taken-1 refused for good (message_id taken-1 already used for "
        "different content): moved to %s" % (tmp_path / "rejected_messages.json")], result.stdout
    assert "taken-1" not in outbox.read_text(), "final: the outbox forgets it"
    assert server.broker.stats()["totals"]["published"] == 2, "taken-1 once, fresh once"


def test_the_receiver_rejects_a_known_id_with_another_envelope(start_server, keys, spawn,
                                                               tmp_path):
    """A stored id redelivered with a different envelope is rejected to .dead, not acked."""
    from scripts import publish_sealed, read_records, receiver_args
    server = start_server(redelivery_interval=30.0)
    output = tmp_path / "out.json"
    [taken] = publish_sealed(server.address, keys, ["original"])
    receiver = spawn(receiver_args(server.address[1], keys, output, "--max-messages", "1"))
    assert receiver.wait() == 0, receiver.stderr
    # A second broker (no dedup memory of the first) delivers another envelope under that id.
    other = start_server(redelivery_interval=30.0)
    publish_sealed(other.address, keys, ["impostor"], message_id=taken)
    publish_sealed(other.address, keys, ["after"])
    receiver = spawn(receiver_args(other.address[1], keys, output, "--max-messages", "1", "-v"))
    assert receiver.wait() == 0, receiver.stderr
    assert sorted(r["message"] for r in read_records(output)) == ["after", "original"]
    rejects = read_records(tmp_path / "out.rejects.json")
    assert [(r["message_id"], r["reason"]) for r in rejects] == [
        (taken, "message_id already used for different content")]
    assert other.broker.stats()["queues"]["default_queue.dead"]["ready"] == 1


def test_a_purged_id_stays_bound_across_restarts(start_server, tmp_path):
    """A purged id stays bound to its envelope, before a restart and after one (the purge
    record names ids only: recovery digests the bytes of their publish records)."""
    data_dir = str(tmp_path / "data")
    first = start_server(data_dir=data_dir, redelivery_interval=30.0)
    client = Wire(first.address)
    try:
        assert client.call(publish_line("purged-1", ciphertext="Zmlyc3Q=").strip()) == \
            "ACK purged-1"
        assert client.call("purge default_queue") == "Purged 1"
        _refused_unless_the_same_bytes(client, ["purged-1"])
    finally:
        client.close()
    first.stop()
    for compact in (True, False):       # restart, compact, restart again
        server = start_server(data_dir=data_dir, redelivery_interval=30.0)
        client = Wire(server.address)
        try:
            _refused_unless_the_same_bytes(client, ["purged-1"])
            assert json.loads(client.call("stats"))["queues"]["default_queue"]["ready"] == 0
            if compact:
                server.broker.journal.request_compaction()
                assert client.call(publish_line("after-compaction").strip()) == \
                    "ACK after-compaction"
                assert client.call("fetch default_queue").startswith("Message: after-")
                assert client.call("ack after-compaction").startswith("ACK_CONFIRMED")
        finally:
            client.close()
        server.stop()
