"""The broker journal: ACK means on disk, replay after restart, torn tails, compaction."""
import json
import os
import threading

import pytest
from conftest import Wire, parse_message, publish_line

from ciphermq import journal as journal_module
from ciphermq import recovery
from ciphermq.config import ServerConfig
from ciphermq.journal import JournalError
from ciphermq.server import BrokerServer


@pytest.fixture
def durable_server(tmp_path):
    """Start brokers on one data directory, one after another; all stopped at teardown."""
    servers = []

    def start(**overrides):
        overrides.setdefault("port", 0)
        overrides.setdefault("data_dir", str(tmp_path / "data"))
        server = BrokerServer(ServerConfig(**overrides)).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


def stats(client):
    return json.loads(client.call("stats"))


# -- the file format ------------------------------------------------------------

# Torn tails, damage and --repair: tests/test_journal_faults.py.


def test_second_broker_on_the_same_directory_is_refused(durable_server, tmp_path):
    """Two brokers never write one journal: the directory is locked."""
    durable_server()
    with pytest.raises(JournalError, match="in use"):
        BrokerServer(ServerConfig(port=0, data_dir=str(tmp_path / "data")))


def test_fold_replays_publish_ack_and_dead_letter():
    """Replaying records rebuilds exactly the live messages and the acked ids."""
    payloads = [
        recovery.queue_record("a"), recovery.queue_record("b"),
        recovery.publish_record("m1", ["a", "b"], b"{1}"),
        recovery.publish_record("m2", ["a"], b"{2}"),
        recovery.ack_record("m1", "a", 1000),
        recovery.dead_letter_record("m2", "a", "a.dead"),
        recovery.publish_record("m3", ["b"], b"{3}"),
        recovery.ack_record("m3", "b", 2000),
    ]
    state = recovery.fold(payloads)
    assert state.live == {"m1": (b"{1}", ["b"]), "m2": (b"{2}", ["a.dead"])}
    assert state.acked == {"m1": 1000, "m3": 2000}
    again = recovery.fold(recovery.snapshot_records(state))
    assert (again.live, again.acked, again.queues) == (state.live, state.acked, state.queues)


# -- ACK means durable --------------------------------------------------------

def connected_then_disk_replaced(durable_server, monkeypatch, fdatasync):
    """A durable broker and a connected client; from then on the journal uses ``fdatasync``."""
    server = durable_server()
    client = Wire(server.address)
    client.call("ping")             # connected and answered before the disk changes
    monkeypatch.setattr(journal_module.os, "fdatasync", fdatasync)
    return server, client


def test_ack_is_sent_only_after_the_record_is_fsynced(durable_server, monkeypatch):
    """The publish's record is in the journal file when fdatasync is entered, and its ACK
    leaves only after that fdatasync has returned."""
    real_fdatasync = os.fdatasync
    acked = threading.Event()           # the client has read a line: the disk may go on
    on_disk_at_entry, synced = [], threading.Event()

    def gated_fdatasync(fd):
        with open("/proc/self/fd/%d" % fd, "rb") as file:
            on_disk_at_entry.append(b'"d-1"' in file.read())
        # Hold the disk (up to a bound) so that an ACK sent before the fsync arrives first;
        # correct code waits here however long it takes, so the bound only limits the test.
        acked.wait(1.0)
        real_fdatasync(fd)
        synced.set()

    _, client = connected_then_disk_replaced(durable_server, monkeypatch, gated_fdatasync)
    try:
        client.send(publish_line("d-1"))
        reply = client.text()
        came_after_fsync = synced.is_set()
        acked.set()
        assert reply == "ACK d-1"
        assert came_after_fsync, "ACK sent before the journal's fdatasync returned"
        assert on_disk_at_entry and on_disk_at_entry[0], "fdatasync entered before the write"
    finally:
        acked.set()
        client.close()


def test_concurrent_publishers_share_fsyncs(durable_server, monkeypatch):
    """Group commit: many publishes in flight cost far fewer fsyncs than publishes."""
    calls = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(journal_module.os, "fdatasync",
                        lambda fd: (calls.append(fd), real_fdatasync(fd)))
    server = durable_server()
    clients = [Wire(server.address) for _ in range(4)]
    try:
        for index, client in enumerate(clients):
            client.send("".join(publish_line("g-%d-%d" % (index, i)) for i in range(200)))
        for client in clients:
            for _ in range(200):
                assert client.text().startswith("ACK g-")
        assert 0 < len(calls) < 800 / 4, "%d fsyncs for 800 publishes" % len(calls)
    finally:
        for client in clients:
            client.close()


# A failing disk (full, EIO): tests/test_journal_faults.py.


# -- replay -------------------------------------------------------------------

def test_restart_restores_queues_bindings_messages_and_dedup(durable_server):
    """After a restart: declarations, ready and in-flight messages are back; acked ones are not,
    and an acked id is still recognised as a duplicate."""
    first = durable_server()
    client = Wire(first.address)
    for command in ("declare_exchange logs topic", "declare_queue errors",
                    "bind logs errors *.error"):
        assert not client.call(command).startswith("Error")
    for message_id in ("r-1", "r-2", "r-3"):
        assert client.call(publish_line(message_id).strip()) == "ACK " + message_id
    assert client.call(publish_line("t-1", "logs", "db.error").strip()) == "ACK t-1"
    assert parse_message(client.call("fetch default_queue"))[0] == "r-1"
    assert client.call("ack r-1") == "ACK_CONFIRMED r-1"
    assert parse_message(client.call("fetch default_queue"))[0] == "r-2"   # in flight
    client.close()
    first.stop()

    second = durable_server()
    client = Wire(second.address)
    try:
        queues = stats(client)["queues"]
        assert queues["default_queue"]["ready"] == 2 and queues["errors"]["ready"] == 1
        assert client.call(publish_line("r-1").strip()) == "ACK r-1"
        assert client.call(publish_line("t-2", "logs", "x.error").strip()) == "ACK t-2"
        assert stats(client)["totals"]["duplicates"] == 1
        client.call("consume default_queue")
        got = [parse_message(client.line()) for _ in range(2)]
        assert [message_id for message_id, _ in got] == ["r-2", "r-3"]
        pushed, queue = client.settled()
        assert pushed == [] and (queue["ready"], queue["unacked"]) == (0, 2)
    finally:
        client.close()


def test_dead_lettered_message_survives_restart(durable_server):
    """A dead-lettered message is still in <queue>.dead after a restart."""
    first = durable_server(max_deliveries=1)
    client = Wire(first.address)
    client.call(publish_line("dl-1").strip())
    client.call("fetch default_queue")
    assert client.call("nack dl-1") == "NACK_CONFIRMED dl-1"
    client.close()
    first.stop()
    second = durable_server()
    client = Wire(second.address)
    try:
        assert stats(client)["queues"]["default_queue.dead"]["ready"] == 1
        assert parse_message(client.call("fetch default_queue.dead"))[0] == "dl-1"
    finally:
        client.close()


def test_compaction_shrinks_the_journal_and_loses_nothing(durable_server, tmp_path):
    """When most of the journal is acked it is rewritten smaller; live messages survive it."""
    server = durable_server(compact_min_bytes=20_000)
    publisher, consumer = Wire(server.address), Wire(server.address)
    path = tmp_path / "data" / "journal.log"
    published_bytes = 0
    try:
        consumer.call("consume default_queue 0")
        for round_number in range(4):
            lines = "".join(publish_line("c-%d-%d" % (round_number, i), ciphertext="x" * 300)
                            for i in range(50))
            published_bytes += len(lines)
            publisher.send(lines)
            for _ in range(50):
                assert publisher.text().startswith("ACK")
            ids = [parse_message(consumer.line())[0] for _ in range(50)]
            consumer.send("".join("ack %s\n" % message_id for message_id in ids))
            for _ in range(50):
                assert consumer.text().startswith("ACK_CONFIRMED")
        for i in range(5):
            assert publisher.call(publish_line("keep-%d" % i).strip()) == "ACK keep-%d" % i
        # Which ack asks for a compaction depends on how the writer batched the records, so
        # the size left is not fixed; but one was asked for by the last ack at the latest,
        # and is done before the next write (keep-0) is durable.
        assert server.broker.journal.compactions >= 1
        assert path.stat().st_size < published_bytes, "compacted: smaller than the publishes"
    finally:
        publisher.close()
        consumer.close()
    server.stop()
    again = durable_server()
    client = Wire(again.address)
    try:
        assert stats(client)["queues"]["default_queue"]["ready"] == 5
        same = publish_line("c-0-0", ciphertext="x" * 300)   # the same bytes: a duplicate
        assert client.call(same.strip()) == "ACK c-0-0"
        assert stats(client)["totals"]["duplicates"] == 1, "dedup window survives compaction"
    finally:
        client.close()
