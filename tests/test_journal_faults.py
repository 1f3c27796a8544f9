"""The journal under damage and full disks, and compaction that never thrashes."""
import errno
import math
import os
import subprocess
import sys
import threading

import pytest
from conftest import WAIT, Wire, parse_message, publish_line
from processes import BrokerProcess

from ciphermq import files as files_module
from ciphermq import journal as journal_module
from ciphermq.broker import Broker
from ciphermq.config import ServerConfig
from ciphermq.journal import EXIT_DAMAGED, Journal, JournalDamaged, encode, read_records, scan
from ciphermq.server import BrokerServer


def saved_files(directory, prefix):
    return sorted(path for path in directory.iterdir() if path.name.startswith(prefix))


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- damage: what recovery cuts, what it refuses, what --repair keeps -------------

def test_torn_tail_is_cut_and_everything_before_it_kept(tmp_path):
    """A record half-written by a crash is cut off and saved; every whole record before it
    survives."""
    path = tmp_path / "journal.log"
    good = encode(b"Q q1") + encode(b"Q q2")
    path.write_bytes(good + encode(b"Q q3")[:7])
    journal = Journal(tmp_path)
    assert journal.recover() == [b"Q q1", b"Q q2"]
    journal.close()
    assert path.read_bytes() == good
    [saved] = saved_files(tmp_path, "journal.torn-tail")
    assert saved.read_bytes() == encode(b"Q q3")[:7]


def test_each_torn_tail_is_kept_in_a_new_file_never_overwritten(tmp_path):
    """Two crashes in a row leave two saved tails: the second never overwrites the first."""
    path = tmp_path / "journal.log"
    for torn in (b"0badc0de Q fir", b"0badc0de Q second-torn"):
        path.write_bytes(encode(b"Q q1") + torn)
        journal = Journal(tmp_path)
        assert journal.recover() == [b"Q q1"]
        journal.close()
    assert sorted(p.read_bytes() for p in saved_files(tmp_path, "journal.torn-tail")) == \
        [b"0badc0de Q fir", b"0badc0de Q second-torn"]


def test_damage_followed_by_intact_records_is_refused_and_nothing_changed(tmp_path):
    """A bad record with intact ones after it is not a torn write: recovery refuses, naming
    the offset and what follows, and leaves the file as it was."""
    path = tmp_path / "journal.log"
    records = [encode(b"Q q%d" % i) for i in range(5)]
    data = bytearray(b"".join(records))
    offset = len(records[0]) + 3
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(JournalDamaged, match="offset %d.* 3 intact record" % len(records[0])):
        Journal(tmp_path).recover()
    assert path.read_bytes() == bytes(data)
    assert not saved_files(tmp_path, "journal.damaged")
    assert [payload for payload, _ in read_records(path)] == [b"Q q0"]


@pytest.mark.parametrize("where", ["checksum", "payload", "newline", "new newline"])
def test_repair_keeps_every_intact_record_before_and_after_the_damage(tmp_path, where):
    """--repair keeps every record whose own bytes are intact -- even when the damage
    merged it with its damaged neighbour -- and saves exactly the damaged bytes."""
    path = tmp_path / "journal.log"
    records = [encode(b"Q queue-%d" % i) for i in range(6)]
    start = sum(len(record) for record in records[:2])        # record 2 is damaged
    data = bytearray(b"".join(records))
    offset = {"checksum": start + 2, "payload": start + 12,
              "newline": start + len(records[2]) - 1, "new newline": start + 12}[where]
    data[offset] = ord("\n") if where == "new newline" else data[offset] ^ 0x01
    path.write_bytes(bytes(data))
    journal = Journal(tmp_path, repair=True)
    kept = journal.recover()
    journal.close()
    assert kept == [b"Q queue-%d" % i for i in range(6) if i != 2]
    assert path.read_bytes() == b"".join(records[:2] + records[3:])
    [saved] = saved_files(tmp_path, "journal.damaged")
    assert saved.read_bytes() == bytes(data[start:start + len(records[2])])
    journal = Journal(tmp_path, repair=True)               # a second repair finds nothing
    assert journal.recover() == kept
    journal.close()
    assert len(saved_files(tmp_path, "journal.damaged")) == 1


def test_flipped_byte_mid_journal_refuses_start_and_repair_keeps_every_intact_message(
        tmp_path):
    """A flipped byte in record k of N: the broker process exits 4 with a clear message and
    no traceback; with --repair a consumer gets exactly the N-1 intact messages."""
    data_dir = tmp_path / "data"
    count, damaged = 40, 7
    broker = BrokerProcess("--data-dir", str(data_dir))
    client = Wire(broker.address)
    try:
        client.send("".join(publish_line("m-%d" % i) for i in range(count)))
        assert [client.text() for _ in range(count)] == ["ACK m-%d" % i for i in range(count)]
    finally:
        client.close()
    assert broker.stop() == 0
    path = data_dir / "journal.log"
    record = path.read_bytes().index(b" P m-%d " % damaged) - 8     # its checksum's offset
    flip(path, record + 40)
    damaged_bytes = path.read_bytes()

    refused = subprocess.run(
        [sys.executable, "-m", "ciphermq.server", "--port", "0", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=WAIT * 4)
    assert refused.returncode == EXIT_DAMAGED, refused.stderr
    assert "damaged at offset %d" % record in refused.stderr
    assert "%d intact record(s) follow" % (count - damaged - 1) in refused.stderr
    assert "--repair" in refused.stderr and "Traceback" not in refused.stderr
    assert path.read_bytes() == damaged_bytes, "a refused start changes nothing"

    repaired = BrokerProcess("--data-dir", str(data_dir), "--repair")
    client = Wire(repaired.address)
    try:
        got = []
        while True:
            reply = client.call("fetch default_queue")
            if reply == "No messages":
                break
            got.append(parse_message(reply)[0])
            assert client.call("ack " + got[-1]) == "ACK_CONFIRMED " + got[-1]
        assert sorted(got) == sorted("m-%d" % i for i in range(count) if i != damaged)
    finally:
        client.close()
        repaired.stop()
    assert "Traceback" not in repaired.log


# -- full disks ----------------------------------------------------------------

@pytest.fixture
def durable_server(tmp_path):
    """Start brokers with a journal (fast write retries); all stopped at teardown."""
    servers = []

    def start(data_dir=None, **overrides):
        overrides.setdefault("port", 0)
        overrides.setdefault("journal_retry_interval", 0.05)
        server = BrokerServer(ServerConfig(data_dir=str(data_dir or tmp_path / "data"),
                                           **overrides)).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


class FailingDisk:
    """Stands in for the disk under the journal: while ``full`` is set, a write stores half
    its bytes and then fails with ENOSPC, as a real full disk does."""

    def __init__(self, monkeypatch):
        self.full = threading.Event()
        self.failures = 0
        real_write_all = files_module.write_all

        def write_all(fd, data):
            if self.full.is_set():
                self.failures += 1
                real_write_all(fd, data[:len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write_all(fd, data)
        monkeypatch.setattr(files_module, "write_all", write_all)


def test_full_disk_refuses_publishes_keeps_consumers_draining_and_recovers(
        durable_server, monkeypatch, tmp_path):
    """While journal writes fail, publishes get 'Error: journal write failed: ...' (never an
    ACK), consumers still fetch and ack, and publishing resumes by itself; the journal holds
    no trace of the failed partial writes."""
    server = durable_server()
    publisher, consumer = Wire(server.address), Wire(server.address)
    disk = FailingDisk(monkeypatch)
    try:
        for i in range(3):
            assert publisher.call(publish_line("before-%d" % i).strip()) == "ACK before-%d" % i
        disk.full.set()
        refusal = "Error: journal write failed: No space left on device"
        assert publisher.call(publish_line("during-1").strip()) == refusal   # the write failed
        assert publisher.call(publish_line("during-2").strip()) == refusal   # refused up front
        assert publisher.call("declare_queue other") == refusal
        for i in range(3):
            message_id, _ = parse_message(consumer.call("fetch default_queue"))
            assert message_id == "before-%d" % i
            assert consumer.call("ack " + message_id) == "ACK_CONFIRMED " + message_id
        assert server.journal.write_error is not None
        disk.full.clear()
        assert server.journal.wait_until_writable(WAIT)
        assert publisher.call(publish_line("after-1").strip()) == "ACK after-1"
        # during-1 reached the broker's memory before its write failed: the retry stored it,
        # so the sender's retry with the same id is a duplicate, ACKed now that it is on disk
        assert publisher.call(publish_line("during-1").strip()) == "ACK during-1"
    finally:
        publisher.close()
        consumer.close()
    assert disk.failures >= 1
    server.stop()
    result = scan(tmp_path / "data" / "journal.log")
    assert result.damaged == [], "a partial write was left in the journal"
    again = durable_server()
    client = Wire(again.address)
    try:
        ids = [parse_message(client.call("fetch default_queue"))[0] for _ in range(2)]
        assert sorted(ids) == ["after-1", "during-1"]
        assert client.call("fetch default_queue") == "No messages"
    finally:
        client.close()


def test_failed_fsync_acks_nothing_and_the_broker_keeps_running(durable_server, monkeypatch):
    """An fsync that fails (EIO) turns the ACK into an Error line; the broker does not stop."""
    server = durable_server()
    client = Wire(server.address)
    client.call("ping")
    failing = threading.Event()
    failing.set()
    real_fdatasync = os.fdatasync

    def fdatasync(fd):
        if failing.is_set():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fdatasync(fd)
    monkeypatch.setattr(journal_module.os, "fdatasync", fdatasync)
    try:
        assert client.call(publish_line("eio-1").strip()) == \
            "Error: journal write failed: Input/output error"
        assert not server.stop_requested.is_set()
        failing.clear()
        assert server.journal.wait_until_writable(WAIT)
        assert client.call(publish_line("eio-2").strip()) == "ACK eio-2"
    finally:
        client.close()


def test_a_journal_stopped_for_good_closes_the_publisher_without_an_ack(durable_server,
                                                                        monkeypatch):
    """If the journal's writer stops for good (a bug, not a disk error), a publish waiting for
    it gets no ACK: its connection is closed with nothing sent."""
    server = durable_server()
    client = Wire(server.address)
    client.call("ping")

    def broken_fdatasync(fd):
        raise RuntimeError("planted bug in the journal writer")
    monkeypatch.setattr(journal_module.os, "fdatasync", broken_fdatasync)
    try:
        client.send(publish_line("doomed-1"))
        received = client.closed_by_peer()
        assert b"ACK" not in received, "ACKed a publish the journal never wrote: %r" % received
    finally:
        client.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the test (we run as root); skipped where mount is not
    permitted -- but under CI=true that is a failure, not a skip."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        reason = "cannot mount a small tmpfs: %s" % done.stderr.strip()
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory):
    """Fill the disk under ``directory`` with one file; return its path."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_journal_on_a_real_full_disk_refuses_then_resumes(small_disk, durable_server):
    """On a full tmpfs, publishes are refused with the disk's reason and consumers drain;
    once space is freed, publishing resumes with nothing lost."""
    server = durable_server(small_disk / "data")
    publisher, consumer = Wire(server.address), Wire(server.address)
    try:
        assert publisher.call(publish_line("first").strip()) == "ACK first"
        filler = fill(small_disk)
        body = "x" * 20_000
        reply = publisher.call(publish_line("big-1", ciphertext=body).strip())
        assert reply == "Error: journal write failed: No space left on device"
        message_id, _ = parse_message(consumer.call("fetch default_queue"))
        assert consumer.call("ack " + message_id) == "ACK_CONFIRMED first"
        filler.unlink()
        assert server.journal.wait_until_writable(WAIT)
        assert publisher.call(publish_line("big-2", ciphertext=body).strip()) == "ACK big-2"
    finally:
        publisher.close()
        consumer.close()


def test_start_on_a_full_disk_says_the_disk_is_full(small_disk):
    """A broker started on a full disk says so (not a port problem), and refuses publishes
    with an Error line instead of crashing."""
    fill(small_disk)
    broker = BrokerProcess("--data-dir", str(small_disk / "data"))
    client = Wire(broker.address)
    try:
        assert client.call(publish_line("p-1").strip()) == \
            "Error: journal write failed: No space left on device"
    finally:
        client.close()
        code = broker.stop()
    assert code == 0
    assert "is full" in broker.log and "Cannot start on" not in broker.log
    assert "Traceback" not in broker.log


def test_start_that_cannot_save_a_torn_tail_on_a_full_disk_says_the_disk_is_full(small_disk):
    """When the torn tail cannot be saved for lack of space, the broker exits 1 saying the
    disk is full, without a traceback, and cuts nothing."""
    data_dir = small_disk / "data"
    data_dir.mkdir()
    journal = data_dir / "journal.log"
    journal.write_bytes(encode(b"Q q1") + b"0badc0de Q torn")
    fill(small_disk)
    done = subprocess.run(
        [sys.executable, "-m", "ciphermq.server", "--port", "0", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=WAIT * 4)
    assert done.returncode == 1, done.stderr
    assert "the disk is full" in done.stderr and "Traceback" not in done.stderr
    assert "Cannot start on" not in done.stderr
    assert journal.read_bytes().endswith(b"0badc0de Q torn")
    assert not saved_files(data_dir, "journal.torn-tail")


# -- compaction never thrashes --------------------------------------------------

def test_failed_compaction_keeps_the_old_journal_and_every_record(tmp_path, monkeypatch,
                                                                  caplog):
    """A compaction that cannot write its new file (a full disk) leaves the old journal
    standing and writes the records it had cut to it; it is not retried at once."""
    def no_space(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files_module, "create_exclusive", no_space)
    journal = Journal(tmp_path, compact_min_bytes=0, fsync=False)
    journal.recover()
    journal.start(snapshot=lambda: journal.cut([b"Q snapshot"]))
    journal.append(b"Q q1")
    assert journal.sync(WAIT)
    journal.request_compaction()
    journal.append(b"Q q2")
    assert journal.sync(WAIT)
    journal.close()
    assert journal.compactions == 0
    assert "next try at %d bytes" % (2 * len(encode(b"Q q1"))) in caplog.text   # not at once
    assert [payload for payload, _ in read_records(tmp_path / "journal.log")] == \
        [b"Q q1", b"Q q2"]
    assert not (tmp_path / "journal.log.tmp").exists()


def test_compactions_are_geometric_with_many_remembered_ids(tmp_path, monkeypatch):
    """With acked ids remembered (they survive every compaction), N acks past the minimum
    size cause O(log N) compactions, not one per ack."""
    compactions = []
    real_compact = Journal._compact
    monkeypatch.setattr(Journal, "_compact",
                        lambda self: (compactions.append(1), real_compact(self)))
    journal = Journal(tmp_path, compact_min_bytes=2_000, fsync=False)
    broker = Broker(journal=journal)
    journal.recover()
    journal.start(snapshot=broker.snapshot_to_journal)
    try:
        broker.declare_defaults()
        session = broker.open_session("consumer")
        count = 2_000
        for i in range(count):
            broker.publish("default_exchange", "default_key", "id-%06d" % i, b"{}")
            broker.consume(session, "default_queue")
            broker.acknowledge(session, "id-%06d" % i)
            assert broker.sync(WAIT)
    finally:
        journal.close()
    assert 1 <= len(compactions) <= 2 * math.log2(count) + 2, \
        "%d compactions for %d acks" % (len(compactions), count)
