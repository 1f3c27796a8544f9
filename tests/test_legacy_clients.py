"""The design document's original clients against our broker: what works, what cannot.

The original Receiver reads with one ``recv(1024)`` per line.
``ciphermq/legacy_reader.py`` holds a stand-in (not the original's code, and
shared with tutorial lesson 11) that reads exactly that way: one
``recv(1024)`` is one line; a read that ``startswith("Message:")`` is
``split(" ", 2)`` and ``json.loads``-ed, then acked with one ``recv(1024)``
for the reply.  Whatever else shares a read is lost to it.  docs/PROTOCOL.md
("The document's original clients") states what these tests show.
"""
import base64
import json
import re
import socket
from pathlib import Path

from conftest import WAIT, FakeClock, publish_line
from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.PublicKey import RSA
from scripts import run_sender

from ciphermq.legacy_reader import LegacyReader

#: The broker's --redelivery-interval in these tests; the fake clock jumps past it.
INTERVAL = 30.0


def original_reader(address):
    """The shared stand-in for the original reader, with this file's patience."""
    return LegacyReader(address, timeout=WAIT * 4)


def publish(server, ids):
    """Publish ``ids`` (small test envelopes) and wait for their ACKs."""
    with socket.create_connection(server.address, timeout=WAIT) as publisher:
        publisher.sendall("".join(publish_line(i) for i in ids).encode())
        acks = b""
        while acks.count(b"\n") < len(ids):
            acks += publisher.recv(1024)
        assert acks.count(b"ACK ") == len(ids), acks


def dead(server):
    return server.broker.stats()["queues"].get("default_queue.dead", {"ready": 0})["ready"]


def test_at_the_default_prefetch_a_burst_never_reaches_the_original_reader(start_server):
    """Three messages queued before the original reader starts share its reads at every
    delivery, so it parses and acks none of them: the broker keeps them (none lost), drops the
    reader after --consumer-timeout, and after --max-deliveries such returns all are dead."""
    clock = FakeClock()
    server = start_server(redelivery_interval=INTERVAL, max_deliveries=2,
                          consumer_timeout=10 * INTERVAL, clock=clock)
    ids = ["burst-%d" % n for n in range(3)]
    publish(server, ids)
    for returned in (1, 2):
        reader = original_reader(server.address).start()     # the original script reconnects
        try:
            seen = ""
            while seen.count("Message:") < 3:              # the reader has read them all
                seen += reader.next_event()[1]
            assert reader.stored == []
            clock.advance(10 * INTERVAL + 1)               # silent past --consumer-timeout
            server.broker.retry_unacknowledged()
            expected_dead = 3 if returned == 2 else 0
            assert dead(server) == expected_dead and reader.stored == []
        finally:
            reader.close()


def test_at_prefetch_one_the_original_reader_gets_every_message_exactly_once(start_server):
    """With the broker's --prefetch 1, a message that shares a read with the subscription
    reply or an ACK_CONFIRMED is lost to the original reader only until its redelivery, which
    arrives alone: all are stored once, none dies, at most one redelivery each."""
    clock = FakeClock()
    server = start_server(redelivery_interval=INTERVAL, max_deliveries=2, clock=clock,
                          default_prefetch=1)
    ids = ["one-%02d" % n for n in range(20)]
    publish(server, ids)
    reader = original_reader(server.address).start()
    redeliveries = 0
    history = []
    try:
        while len(reader.stored) < len(ids):
            kind, text = reader.next_event()
            history.append((kind, text[:40]))
            assert kind in ("subscribed", "message", "reply"), history
            lost = text.count("Message:") - (kind == "message")
            assert lost in (0, 1)
            if lost:                # the reader is idle; the broker holds that one message
                redeliveries += 1
                clock.advance(INTERVAL + 1)
                server.broker.retry_unacknowledged()
        assert sorted(reader.stored) == ids and dead(server) == 0
        assert redeliveries <= len(ids)
    finally:
        reader.close()


def test_one_message_at_a_time_reaches_the_original_reader_at_the_default_prefetch(
        start_server):
    """Messages published one at a time, each after the last one's ACK_CONFIRMED, arrive in
    reads of their own: the original reader stores each, and each confirmation is alone."""
    server = start_server(redelivery_interval=INTERVAL)
    reader = original_reader(server.address).start()
    try:
        assert reader.next_event() == ("subscribed", "Subscribed to queue\n")
        for n in range(3):
            publish(server, ["single-%d" % n])
            assert reader.next_event()[0] == "message"
            assert reader.next_event() == ("reply", "ACK_CONFIRMED single-%d\n" % n)
        assert reader.stored == ["single-0", "single-1", "single-2"]
    finally:
        reader.close()


def test_a_v1_envelope_opens_the_way_the_original_receiver_opens_it(server, keys, tmp_path):
    """``Sender.py --envelope-version 1`` writes the document's five fields, which RSA-OAEP
    with its default SHA-1 and AES-GCM open, as the original Receiver does."""
    result = run_sender(server.address[1], keys, tmp_path / "pending.json",
                        "--envelope-version", "1", "--message", "for the original")
    assert result.returncode == 0, result.stdout + result.stderr
    with socket.create_connection(server.address, timeout=WAIT) as wire:
        wire.sendall(b"fetch default_queue\n")
        line = b""
        while not line.endswith(b"\n"):
            line += wire.recv(4096)
    _, message_id, body = line.decode().split(" ", 2)
    envelope = json.loads(body)
    envelope.pop("delivery_count")
    assert set(envelope) == {"message_id", "enc_session_key", "nonce", "tag", "ciphertext"}
    private_key = RSA.import_key(keys[0].read_bytes())
    session_key = PKCS1_OAEP.new(private_key).decrypt(base64.b64decode(envelope["enc_session_key"]))
    cipher = AES.new(session_key, AES.MODE_GCM, nonce=base64.b64decode(envelope["nonce"]))
    plaintext = cipher.decrypt_and_verify(base64.b64decode(envelope["ciphertext"]),
                                          base64.b64decode(envelope["tag"]))
    assert plaintext.decode() == "for the original" and message_id == envelope["message_id"]


def test_protocol_md_says_what_these_tests_show():
    """PROTOCOL.md's section on the original clients names every test of this file, each of
    which exists, and no longer claims they "work unchanged"."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()
    assert "work unchanged" not in text
    section = text[text.index("## The document's original clients"):]
    named = set(re.findall(r"tests/test_legacy_clients\.py::(\w+)", section))
    here = {name for name in globals() if name.startswith("test_")}
    assert named == here - {"test_protocol_md_says_what_these_tests_show"}
