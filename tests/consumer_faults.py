"""Fault-matrix scenarios for issue 10: a hung receiver, a stale backlog, a full disk.

Each is ``scenario(run, scale)`` like those of ``tests/test_faults.py`` (whose
:class:`FaultRun` it is given), so CI runs them at a small size
(``tests/test_hung_consumers.py``, ``tests/test_receiver_disk_full.py``) and
``bench/faults.py`` at full size (rows 7, 8 and 9).
"""
import json
import shutil
import signal
import subprocess

from conftest import Wire
from test_journal_faults import fill

from ciphermq.receiver import WRITE_FAILED

STORED_LINE = "💾 [RECEIVER] Message"
REJECTED_LINE = "🚫 [RECEIVER] Message"
#: Redelivery passes a stopped receiver is held through (the old code dead-lettered after 3).
STALLED_PASSES = 10


def broker_totals(broker):
    wire = Wire(broker.address)
    try:
        return json.loads(wire.call("stats"))
    finally:
        wire.close()


def hung_receiver(run, scale):
    """The receiver is SIGSTOPped mid-stream and held through many redelivery passes (a
    stuck disk, a debugger), then SIGKILLed; a new one on the same output stores the rest."""
    broker = run.start_broker("--redelivery-interval", "0.5", "--max-deliveries", "3",
                              "--consumer-timeout", "0")
    receiver = run.start_receiver(broker.port, "-v", "--prefetch", "200", "--ack-batch", "20")
    sender = run.start_sender(broker.port, "--window", "64")
    receiver.wait_for(STORED_LINE, timeout=scale.patience, count=max(1, scale.messages // 10))
    receiver.proc.send_signal(signal.SIGSTOP)
    run.faults["receiver SIGSTOPs"] += 1
    seen = sum("stalled" in line for line in broker.lines)
    broker.wait_for_log("stalled", count=seen + STALLED_PASSES, timeout=scale.patience)
    run.kill_soon(receiver, "receiver SIGKILLs while stopped")
    run.finish_sending(sender, broker.port, "--window", "64")
    left = scale.messages - run.stored()
    run.await_receiver(run.start_receiver(broker.port, *(
        ("--max-messages", str(left)) if left else ("--idle-exit", "1"))))
    run.notes.append("%d dead-lettered" % broker_totals(broker)["totals"]["dead_lettered"])


def stale_backlog(run, scale):
    """Every message waits longer than the receiver's --max-age (0 s: the receiver starts
    after the last one was sealed): all are rejected to default_queue.dead, none lost."""
    broker = run.start_broker()
    run.finish_sending(run.start_sender(broker.port, "--window", "64"), broker.port,
                       "--window", "64")
    receiver = run.start_receiver(broker.port, "--max-age", "0")
    receiver.wait_for(REJECTED_LINE, timeout=scale.patience, count=scale.messages)
    receiver.proc.send_signal(signal.SIGTERM)
    run.await_receiver(receiver)
    dead = broker_totals(broker)["queues"].get("default_queue.dead", {"ready": 0})["ready"]
    run.notes.append("%d in default_queue.dead with their reason" % dead)


class CannotMount(Exception):
    """A tmpfs cannot be mounted here (not root, no mount): the caller skips or fails."""


def mount_small_disk(run, size="8m"):
    """A tmpfs of ``size`` under the run's directory, unmounted when the run's stack closes."""
    disk = run.workdir / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise CannotMount("cannot mount a small tmpfs: %s" % done.stderr.strip())
    run.stack.callback(subprocess.run, ["umount", "-l", str(disk)], check=False)
    return disk


def receiver_disk_full(run, scale):
    """The receiver's disk fills up mid-stream: it stops (status 74) acking nothing it did
    not store; once space is freed a new receiver stores the rest."""
    disk = mount_small_disk(run)
    final_output, run.output = run.output, disk / run.output.name
    broker = run.start_broker()
    receiver = run.start_receiver(broker.port, "-v", "--prefetch", "200", "--ack-batch", "20")
    sender = run.start_sender(broker.port, "--window", "64")
    receiver.wait_for(STORED_LINE, timeout=scale.patience, count=max(1, scale.messages // 3))
    filler = fill(disk)
    code = receiver.wait(scale.patience)
    assert code == WRITE_FAILED, "the receiver did not stop for the full disk (%s):\n%s" % (
        code, receiver.stderr)
    run.faults["receiver disk full"] += 1
    run.finish_sending(sender, broker.port, "--window", "64")
    filler.unlink()
    left = scale.messages - run.stored()
    run.await_receiver(run.start_receiver(broker.port, *(
        ("--max-messages", str(left)) if left else ("--idle-exit", "1"))))
    shutil.copyfile(run.output, final_output)      # the checker reads it after the unmount
    run.output = final_output
