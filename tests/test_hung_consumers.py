"""Hung consumers and refused messages with real processes (issue 10, items 1 and 2).

A broker process, bin/Sender.py and bin/Receiver.py; the receiver is SIGSTOPped
mid-stream (a stuck disk, a debugger) and later SIGKILLed or woken, and the
checker judges the files the scripts leave.  Every wait is on a log or stdout
line, never a sleep.
"""
import json
import signal

import pytest
from conftest import Wire
from consumer_faults import broker_totals, hung_receiver, stale_backlog
from scripts import (
    PATIENCE,
    assert_exactly_once,
    finished_records,
    read_records,
    receiver_args,
    run_sender,
)
from test_faults import CI, play

from ciphermq import checker

COUNT = 300


def send(broker, keys, tmp_path, *args):
    record = tmp_path / "record.json"
    result = run_sender(broker.port, keys, tmp_path / "outbox.json", "--record", str(record),
                        *args, timeout=PATIENCE * 3)
    assert result.returncode == 0, result.stdout + result.stderr
    return record


@pytest.fixture
def sent(broker_process, keys, tmp_path):
    """A broker with a 0.2 s redelivery interval and 3 max deliveries, and COUNT messages."""
    def start(*broker_args):
        broker = broker_process("--redelivery-interval", "0.2", "--max-deliveries", "3",
                                *broker_args)
        return broker, send(broker, keys, tmp_path, "--count", str(COUNT))
    return start


def stop_mid_stream(spawn, broker, keys, output):
    """A receiver (prefetch 100, batches of 10) that is SIGSTOPped after storing 50."""
    receiver = spawn(receiver_args(broker.port, keys, output, "--prefetch", "100",
                                   "--ack-batch", "10", "--decrypt-threads", "1", "-v"))
    receiver.wait_for("saved to file", count=50)
    receiver.proc.send_signal(signal.SIGSTOP)
    return receiver


def test_a_hung_then_killed_receiver_loses_nothing_and_dead_letters_nothing(
        sent, spawn, keys, tmp_path):
    """SIGSTOP for many redelivery intervals, SIGKILL, restart: 0 lost, 0 in .dead (issue 10 #1)."""
    broker, record = sent("--consumer-timeout", "0")
    output = tmp_path / "out.json"
    receiver = stop_mid_stream(spawn, broker, keys, output)
    # 10 passes of the redelivery timer find it stalled: old code dead-letters after 3.
    broker.wait_for_log("stalled", count=10)
    assert broker_totals(broker)["totals"]["dead_lettered"] == 0
    receiver.proc.send_signal(signal.SIGKILL)
    receiver.wait()
    stored = len({r["message_id"] for r in finished_records(output)})   # a kill may tear one
    again = spawn(receiver_args(broker.port, keys, output,
                                "--max-messages", str(COUNT - stored)))
    assert again.wait(PATIENCE * 3) == 0, again.stdout + again.stderr
    tally = checker.check([record], output)
    assert (len(tally.lost), len(tally.duplicated), len(tally.stored)) == (0, 0, COUNT)
    stats = broker_totals(broker)
    assert stats["totals"]["dead_lettered"] == 0
    assert stats["queues"].get("default_queue.dead", {"ready": 0})["ready"] == 0


def test_a_hung_receiver_is_timed_out_and_its_messages_redelivered(
        sent, spawn, keys, tmp_path):
    """--consumer-timeout disconnects a stopped receiver; woken, it reconnects: exactly once."""
    broker, record = sent("--consumer-timeout", "1")
    output = tmp_path / "out.json"
    receiver = stop_mid_stream(spawn, broker, keys, output)
    broker.wait_for_log("acked nothing for 1 s")
    receiver.proc.send_signal(signal.SIGCONT)
    receiver.wait_for("Connection to the broker lost")
    receiver.wait_for("Subscribed to")
    receiver.discard_unread()
    while len({r["message_id"] for r in finished_records(output)}) < COUNT:
        receiver.wait_for("[RECEIVER]")
    receiver.proc.send_signal(signal.SIGTERM)
    assert receiver.wait() == 0
    tally = checker.check([record], output)
    assert (len(tally.lost), len(tally.duplicated), len(tally.stored)) == (0, 0, COUNT)
    assert broker_totals(broker)["totals"]["dead_lettered"] == 0


def test_a_stale_backlog_is_dead_lettered_with_a_reason_and_the_checker_says_so(
        broker_process, spawn, keys, tmp_path, capsys):
    """A backlog older than --max-age goes to .dead with its reason; the checker counts it."""
    broker = broker_process()
    record = send(broker, keys, tmp_path, "--count", "20")
    output = tmp_path / "out.json"
    # The receiver starts after every message was sealed, so with --max-age 0 all are stale.
    receiver = spawn(receiver_args(broker.port, keys, output, "--max-age", "0", "-v"))
    receiver.wait_for("rejected", count=20)
    receiver.proc.send_signal(signal.SIGTERM)
    assert receiver.wait() == 0
    assert read_records(output) == []
    rejects = read_records(tmp_path / "out.rejects.json")
    assert len(rejects) == 20 and all(r["reason"] == "older than max_age_seconds"
                                      for r in rejects)
    stats = broker_totals(broker)
    assert stats["queues"]["default_queue"]["ready"] == 0
    assert stats["queues"]["default_queue.dead"]["ready"] == 20
    rescuer = Wire(broker.address)
    try:
        message = rescuer.call("fetch default_queue.dead")
        assert json.loads(message.split(" ", 2)[2])["dead_reason"] == \
            "rejected: older than max_age_seconds"
    finally:
        rescuer.close()
    assert checker.main(["--record", str(record), "--output", str(output)]) == 0
    report = capsys.readouterr().out
    assert "🚫 [CHECKER] 20 rejected" in report
    assert "✅ [CHECKER] 0 lost" not in report
    assert "but not all delivered" in report
    assert_exactly_once(read_records(output), [])


def test_fault_matrix_rows_hung_receiver_and_stale_backlog(keys, tmp_path):
    """The matrix's rows 7 and 8 at CI size: the hung receiver loses and dead-letters
    nothing; the stale backlog is all rejected, none lost, none stored."""
    (tmp_path / "hung").mkdir()
    (tmp_path / "stale").mkdir()
    hung = play(hung_receiver, tmp_path / "hung", keys, CI)
    assert hung.tally.ok and hung.tally.acked == hung.tally.attempted, hung.verdict()
    assert len(hung.tally.stored) == CI.messages and "0 dead-lettered" in hung.notes, \
        hung.verdict()
    stale = play(stale_backlog, tmp_path / "stale", keys, CI)
    assert stale.tally.ok and not stale.tally.stored, stale.verdict()
    assert stale.tally.rejected == stale.tally.acked and len(stale.tally.acked) == CI.messages
    assert "{:,} in default_queue.dead with their reason".format(CI.messages) in stale.notes
