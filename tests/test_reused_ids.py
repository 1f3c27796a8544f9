"""Ids bind content (issue 10, item 3): a known message_id with other bytes is refused."""
from conftest import envelope, publish_line
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
