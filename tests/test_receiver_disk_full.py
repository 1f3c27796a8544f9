"""The receiver on a full disk (issue 10, item 5, receiver side): it stops with one ❌ line
naming the file and the reason, exit status 74, and acks nothing it did not store."""
import os

import pytest
from consumer_faults import CannotMount, receiver_disk_full
from scripts import intact_ids, publish_sealed, queue_stats, read_records, receiver_args
from test_faults import CI, play
from test_journal_faults import fill, small_disk  # noqa: F401  (the tmpfs fixture, reused)

from ciphermq.receiver import WRITE_FAILED


def test_a_full_disk_stops_the_receiver_cleanly_and_acks_nothing_unwritten(
        small_disk, server, keys, spawn):  # noqa: F811
    """Output on a full tmpfs: one ❌ line, status 74, no traceback, every ack stored;
    with space again, a new receiver stores the rest exactly once."""
    output = small_disk / "out.json"
    publish_sealed(server.address, keys, ["before %d" % i for i in range(3)])
    receiver = spawn(receiver_args(server.address[1], keys, output, "-v"))
    receiver.wait_for("saved to file", count=3)
    filler = fill(small_disk)
    big = ["after %d " % i + "x" * 6000 for i in range(3)]
    publish_sealed(server.address, keys, big)
    assert receiver.wait() == WRITE_FAILED
    errors = [line for line in receiver.stderr.splitlines() if line.strip()]
    assert errors == ["❌ [RECEIVER] cannot write %s: No space left on device; stopped "
                      "without acking what it could not store" % output], receiver.stderr
    assert "Traceback" not in receiver.stdout + receiver.stderr
    stored = intact_ids(output)         # a torn last line is cut off at the next start
    assert server.broker.stats()["totals"]["acked"] == len(stored) == 3
    assert queue_stats(server)["ready"] == 3, "the unwritten three are still the broker's"
    filler.unlink()
    again = spawn(receiver_args(server.address[1], keys, output, "--max-messages", "3"))
    assert again.wait() == 0, again.stdout + again.stderr
    records = read_records(output)
    assert sorted(r["message"] for r in records) == \
        sorted(["before %d" % i for i in range(3)] + big)


def test_fault_matrix_row_receiver_disk_full(keys, tmp_path):
    """The matrix's row 9 at CI size: the receiver's disk fills mid-stream, nothing is lost
    or duplicated once it has space again."""
    try:
        result = play(receiver_disk_full, tmp_path, keys, CI)
    except CannotMount as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    assert result.tally.ok and result.tally.acked == result.tally.attempted, result.verdict()
    assert len(result.tally.stored) == CI.messages and result.faults["receiver disk full"] == 1
