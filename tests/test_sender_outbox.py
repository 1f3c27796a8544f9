"""ciphermq.outbox: the sender's pending messages survive crashes and leave once ACKed."""
import json
import threading

import pytest

from ciphermq import sender as sending
from ciphermq.outbox import Outbox, record
from ciphermq.sender import Record
from ciphermq.store import CorruptFile


def envelope(message_id):
    return {"message_id": message_id, "enc_session_key": "a2V5", "nonce": "bm9uY2U=",
            "tag": "dGFn", "ciphertext": "Y2lwaGVy"}


def new(message_id):
    return record(envelope(message_id), "default_exchange", "default_key")


def test_pending_messages_survive_a_reopen_with_identical_envelopes(tmp_path):
    """What was added and not removed is pending after a restart, byte for byte, in order."""
    path = tmp_path / "pending.json"
    with Outbox(path) as outbox:
        outbox.add([new("m1"), new("m2"), new("m3")])
        outbox.remove("m2")
    with Outbox(path) as outbox:
        assert [r["message_id"] for r in outbox.pending()] == ["m1", "m3"]
        assert outbox.pending()[0] == new("m1")


def test_an_outbox_with_nothing_pending_is_compacted_to_empty(tmp_path):
    """Once everything is ACKed, closing leaves an empty file."""
    path = tmp_path / "pending.json"
    with Outbox(path) as outbox:
        outbox.add([new("m1"), new("m2")])
        outbox.remove("m1")
        outbox.remove("m2")
    assert path.read_bytes() == b""


def test_opening_compacts_away_acked_records(tmp_path):
    """On start the file is rewritten with only the pending records."""
    path = tmp_path / "pending.json"
    lines = [new("m1"), new("m2"), {"acked": "m1"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with Outbox(path) as outbox:
        assert len(outbox) == 1
    assert [json.loads(line) for line in path.read_text().splitlines()] == [new("m2")]


def test_a_torn_record_is_ignored_it_was_never_sent(tmp_path):
    """A record cut short by a crash is dropped: its write came before any send of it."""
    path = tmp_path / "pending.json"
    full = json.dumps(new("m1")) + "\n"
    path.write_text(full + json.dumps(new("m2"))[:40])
    with Outbox(path) as outbox:
        assert [r["message_id"] for r in outbox.pending()] == ["m1"]
        outbox.add([new("m3")])
    with Outbox(path) as outbox:
        assert [r["message_id"] for r in outbox.pending()] == ["m1", "m3"]


def test_a_line_that_is_not_a_pending_message_is_refused(tmp_path):
    """A foreign record (not a crash artefact) refuses the outbox instead of guessing."""
    path = tmp_path / "pending.json"
    path.write_text(json.dumps({"message_id": "m1"}) + "\n" + json.dumps(new("m2")) + "\n")
    with pytest.raises(CorruptFile, match="record 1 is not a pending message"):
        Outbox(path)


def test_a_record_torn_by_a_kill_is_cut_before_the_next_run_appends(tmp_path):
    """A Sender killed mid-line leaves a torn record line; the next run cuts it off rather
    than glue its first line to it, so every whole line stays a record the checker reads."""
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"event": "attempted", "message_id": "m1"}) + "\n"
                    + '{"event": "ack', encoding="utf-8")
    with Record(path) as run:
        run.note("acked", "m1")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"event": "attempted", "message_id": "m1"}, {"event": "acked", "message_id": "m1"}]


def test_the_progress_line_counts_sealing_time(tmp_path, capsys):
    """While many messages are sealed a progress line says so, and the rate is over the whole
    run: sealing time included (a fake clock makes each chunk take 2 s)."""
    clock = FakeSealingClock()
    with Outbox(tmp_path / "pending.json") as outbox:
        sender = sending.Sender(outbox, exchange="default_exchange", routing_key="default_key",
                                window=1, ack_timeout=1.0, connect_options={},
                                stop=threading.Event(), clock=clock)
        texts = ["m%d" % i for i in range(2 * sending.ACCEPT_CHUNK)]

        def seal(text):
            clock.now += 2.0 / sending.ACCEPT_CHUNK
            return envelope("id-" + text)

        sender.accept(texts, seal)
        lines = capsys.readouterr().out.splitlines()
        assert any(line.startswith("📊 [SENDER] sealed 1000, sent 0, ACKed 0 of 2000")
                   for line in lines), lines
        sender.report.acked = 2000
        sender.report.progress()
        assert "(4.0 s, 500 msg/s, done)" in capsys.readouterr().out


class FakeSealingClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now
