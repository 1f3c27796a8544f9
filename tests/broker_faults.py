"""Fault-matrix scenarios for issue 10 on the broker's side: reused ids, a damaged
journal, the journal's disk full.

Each is ``scenario(run, scale)`` like those of ``tests/test_faults.py`` (whose
:class:`FaultRun` it is given), so CI runs them at a small size (the
``test_fault_matrix_row_*`` tests of ``tests/test_faults.py``) and
``bench/faults.py`` at full size (rows 10, 11 and 12).
"""
import json
import os
import subprocess
import sys

from consumer_faults import STORED_LINE, broker_totals, mount_small_disk
from scripts import intact_ids, sender_args
from test_journal_faults import fill, flip

from ciphermq import crypto
from ciphermq.journal import EXIT_DAMAGED, JOURNAL_NAME
from ciphermq.outbox import Outbox, record
from ciphermq.sender import REUSED_ID

ACK_LINE = "✅ [SENDER] Server ACK received"
REJECTED_LINE = "🚫 [SENDER] Message"
JOURNAL_FAILED = "journal write failed"


def events(path, event):
    """The ids of the whole ``event`` lines of a Sender ``--record`` file, in order."""
    ids = []
    if os.path.exists(path):
        with open(path, "rb") as file:
            for line in file:
                if line.endswith(b"\n"):
                    entry = json.loads(line)
                    if entry["event"] == event:
                        ids.append(entry["message_id"])
    return ids


def lines_with(logs, text):
    """How many lines of the files ``logs`` contain ``text``."""
    return sum(text in line for log in logs if log.exists()
               for line in log.read_text(encoding="utf-8").splitlines())


# -- row 10: the same id, other content --------------------------------------------------

def reused_ids(run, scale):
    """Mid-stream a second sender publishes ids the broker has ACKed, each with another
    envelope: every one is refused with ``Error: message_id ... already used for different
    content``, none is ACKed or stored, and every original is stored once."""
    broker = run.start_broker()
    receiver = run.start_receiver(broker.port, "--max-messages", str(scale.messages))
    sender = run.start_sender(broker.port, "--window", "64")
    sender.wait_for(ACK_LINE, timeout=scale.patience, count=max(1, scale.messages // 3))
    known = events(run.record, "acked")
    taken = run.rng.sample(known, min(len(known), max(1, scale.messages // 10)))
    sealer = crypto.Sealer(run.keys[1])
    impostor_outbox = run.workdir / "impostor_outbox.json"
    impostor_record = run.workdir / "impostor_record.json"
    with Outbox(impostor_outbox) as outbox:
        outbox.add([record(dict(sealer.seal("impostor %d" % i), message_id=message_id),
                           "default_exchange", "default_key")
                    for i, message_id in enumerate(taken)])
    impostor_rejects = run.workdir / "impostor_rejects.json"
    impostor = run._spawn(sender_args(broker.port, run.keys, impostor_outbox,
                                      "--file", os.devnull, "-v",
                                      "--record", str(impostor_record),
                                      "--rejects", str(impostor_rejects)),
                          run.workdir / "impostor.log")
    code = impostor.wait(scale.patience)
    # Refused for good: each goes to the impostor's rejects file with the broker's reason,
    # and the Sender exits 1 ("refused by the broker for good").
    assert code == 1, "the impostor sender: %s\n%s%s" % (code, impostor.stdout, impostor.stderr)
    refused = events(impostor_record, "rejected")
    assert sorted(refused) == sorted(taken), "not every impostor was refused exactly once"
    assert not events(impostor_record, "acked"), "an impostor was ACKed"
    reasons = [line for line in impostor.lines if line.startswith(REJECTED_LINE)]
    assert len(reasons) == len(taken) and all(REUSED_ID in line for line in reasons), \
        reasons[:3]
    kept = [json.loads(line)["message_id"] for line in impostor_rejects.read_bytes().splitlines()]
    assert sorted(kept) == sorted(taken), "the impostor's rejects file misses some"
    run.faults["impostor publishes"] += len(taken)
    run.finish_sending(sender, broker.port, "--window", "64")
    run.await_receiver(receiver)
    stored = [json.loads(line) for line in run.output.read_bytes().splitlines()]
    impostors = [entry["message_id"] for entry in stored
                 if entry["message"].startswith("impostor")]
    assert not impostors, "impostor texts stored: %s" % impostors[:5]
    run.notes.append("{:,} impostors refused for good (`Error: message_id <id> {}`, in "
                     "the impostor's rejects file), 0 ACKed, 0 stored"
                     .format(len(refused), REUSED_ID))


# -- row 11: a flipped byte in the middle of the journal ---------------------------------

def middle_publish(path):
    """(offset, message id) of the publish record nearest the middle of a journal."""
    data = path.read_bytes()
    middle, offset, best = len(data) // 2, 0, None
    for line in data.splitlines(True):
        fields = line.split(b" ", 3)
        if len(fields) == 4 and fields[1] == b"P" and line.endswith(b"\n"):
            distance = abs(offset + len(line) // 2 - middle)
            if best is None or distance < best[0]:
                best = (distance, offset, len(line), fields[2].decode("ascii"))
        offset += len(line)
    _, start, length, message_id = best
    return start, length, message_id


def journal_damage(run, scale):
    """The broker (--data-dir) is SIGKILLed mid-stream and a byte of the publish record in
    the middle of its journal is flipped: the start is refused (exit 4), ``--repair``
    starts it, the clients carry on.  The damaged record's message is lost only if its
    sender had its ACK and the receiver had not stored it: it is noted in
    ``run.destroyed``, never hidden among the rest."""
    data_dir = run.workdir / "data"
    broker = run.start_broker("--data-dir", str(data_dir))
    port = broker.port
    sender = run.start_sender(port, "--window", "32", "--heartbeat", "1")
    # A backlog first, so that records after the damaged one hold messages not yet
    # delivered: a repair that kept only what comes before the damage would lose them.
    sender.wait_for(ACK_LINE, timeout=scale.patience, count=max(1, scale.messages // 2))
    receiver = run.start_receiver(port, "-v", "--ack-batch", "20", "--heartbeat", "1")
    receiver.wait_for(STORED_LINE, timeout=scale.patience, count=max(1, scale.messages // 10))
    run.kill_soon(broker, "broker SIGKILLs")
    journal = data_dir / JOURNAL_NAME
    start, length, damaged = middle_publish(journal)
    flip(journal, start + length // 2)          # inside the envelope: the id stays readable
    run.faults["flipped journal bytes"] += 1
    refused = subprocess.run([sys.executable, "-m", "ciphermq.server", "--port", str(port),
                              "--data-dir", str(data_dir)],
                             capture_output=True, text=True, timeout=scale.patience)
    assert refused.returncode == EXIT_DAMAGED, "start not refused (%s):\n%s" % (
        refused.returncode, refused.stderr)
    assert "damaged at offset %d" % start in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    # No broker runs now, so the sender can hear no more ACKs: did it hear this one's?
    heard = damaged in events(run.record, "acked")
    repaired = run.start_broker("--data-dir", str(data_dir), "--repair", port=port)
    repaired.wait_for_log("repaired")
    run.finish_sending(sender, port, "--window", "32", "--heartbeat", "1")
    receiver.proc.terminate()                   # it finishes what it holds, then exits 0
    run.await_receiver(receiver)
    if heard and damaged not in intact_ids(run.output):
        run.destroyed.append(damaged)
        run.notes.append("the damaged record was the publish of %s, ACKed and not yet "
                         "delivered: the one message the damage destroyed" % damaged)
    elif heard:
        run.notes.append("the damaged record was the publish of %s, already stored by the "
                         "receiver: it cost nothing" % damaged)
    else:
        run.notes.append("the damaged record was the publish of %s, not ACKed before the "
                         "kill: its sender's outbox sent it again" % damaged)
    left = scale.messages - run.stored() - len(run.destroyed)
    run.await_receiver(run.start_receiver(port, *(
        ("--max-messages", str(left)) if left else ("--idle-exit", "1"))))


# -- row 12: the journal's disk fills up ---------------------------------------------------

def leave_room(disk, room):
    """Fill ``disk`` with a ballast file but for about ``room`` bytes; return its path."""
    ballast = fill(disk)
    size = ballast.stat().st_size
    os.truncate(ballast, max(0, size - room))
    return ballast


def journal_disk_full(run, scale):
    """The broker's --data-dir is on a small tmpfs where a ballast file leaves room for
    the journal of about a third of the messages: once the journal has filled it,
    publishes are refused with ``Error: journal write failed``, the receiver keeps
    draining, the sender keeps its messages in its outbox; once the ballast is deleted the
    broker resumes by itself and the sender delivers them."""
    disk = mount_small_disk(run, size="32m")
    broker = run.start_broker("--data-dir", str(disk / "data"))
    envelope = json.dumps(crypto.Sealer(run.keys[1]).seal("fault matrix message 1 of 1"))
    # A publish record holds the envelope and ~60 bytes more; its ack record ~100 bytes.
    ballast = leave_room(disk, scale.messages // 3 * (len(envelope) + 160))
    run.faults["broker disk full"] += 1
    receiver = run.start_receiver(broker.port, "-v", "--ack-batch", "20",
                                  "--max-messages", str(scale.messages))
    sender = run.start_sender(broker.port, "--window", "64")
    sender.wait_for(JOURNAL_FAILED, timeout=scale.patience)
    full_after = len(events(run.record, "acked"))
    # The receiver drains the backlog meanwhile: wait for part of it (what is there).
    receiver.discard_unread()
    queued = broker_totals(broker)["queues"]["default_queue"]
    drained = min(scale.messages // 20, queued["ready"] + queued["unacked"])
    if drained:
        receiver.wait_for(STORED_LINE, timeout=scale.patience, count=drained)
    ballast.unlink()
    broker.wait_for_log("writes succeed again", timeout=scale.patience)
    run.finish_sending(sender, broker.port, "--window", "64")
    run.await_receiver(receiver)
    assert broker.proc.poll() is None, "the broker exited:\n%s" % broker.log
    assert "Traceback" not in broker.log, broker.log
    run.notes.append("disk full after {:,} ACKs; {:,} publishes refused with `Error: journal "
                     "write failed`, and {:,} messages delivered, while it was full"
                     .format(full_after, lines_with(run.sender_logs, JOURNAL_FAILED), drained))
