"""Crash safety of the broker process itself: SIGKILL, restart, count what survived."""
import json
import random

import pytest
from conftest import Wire, parse_message, publish_line


def publish_until_killed(broker, ids, kill_after, rng):
    """Pipeline publishes of ``ids``; SIGKILL the broker after ``kill_after`` ACKs.

    Returns the ids ACKed before the kill (publishes still in flight are
    neither counted nor known to be lost: they are simply sent again).
    """
    client = Wire(broker.address)
    acked = []
    try:
        position = 0
        while position < len(ids):
            chunk = ids[position:position + rng.randint(20, 120)]
            position += len(chunk)
            client.send("".join(publish_line(message_id) for message_id in chunk))
            for _ in chunk:
                reply = client.text()
                assert reply.startswith("ACK "), reply
                acked.append(reply[4:])
                if kill_after is not None and len(acked) >= kill_after:
                    broker.kill()
                    return acked
        return acked
    finally:
        client.close()


def drain(broker):
    """Consume and ack everything in default_queue; return the ids in delivery order."""
    client = Wire(broker.address)
    try:
        ready = json.loads(client.call("stats"))["queues"]["default_queue"]["ready"]
        client.call("consume default_queue 0")
        ids = [parse_message(client.line())[0] for _ in range(ready)]
        pushed, queue = client.settled()
        ids += [parse_message(line)[0] for line in pushed]
        assert (queue["ready"], queue["unacked"]) == (0, len(ids)), "more than stats said"
        return ids
    finally:
        client.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_broker_sigkilled_repeatedly_loses_no_acked_message(broker_process, tmp_path, seed):
    """With --data-dir, every message ever ACKed survives repeated SIGKILLs, stored once."""
    rng = random.Random(seed)
    data_dir = str(tmp_path / "data")
    all_ids = ["crash-%d-%04d" % (seed, i) for i in range(600)]
    ever_acked = set()
    unconfirmed = list(all_ids)
    for _ in range(4):
        broker = broker_process("--data-dir", data_dir)
        acked = publish_until_killed(broker, unconfirmed, rng.randint(1, len(unconfirmed) - 1),
                                     rng)
        ever_acked.update(acked)
        unconfirmed = [message_id for message_id in unconfirmed if message_id not in acked]
    broker = broker_process("--data-dir", data_dir)
    ever_acked.update(publish_until_killed(broker, unconfirmed, None, rng))
    stored = drain(broker)
    assert ever_acked == set(all_ids)
    assert len(stored) == len(set(stored)), "a message was stored twice"
    assert set(stored) == ever_acked, "lost: %s" % sorted(ever_acked - set(stored))[:5]


@pytest.mark.parametrize("durable", [False, True], ids=["memory-only", "data-dir"])
def test_memory_only_broker_loses_queued_messages_when_killed(broker_process, tmp_path,
                                                              durable):
    """Negative control: without --data-dir a killed broker loses what it had ACKed; the same
    steps with --data-dir give all 100 back, so the harness does see survivors."""
    args = ("--data-dir", str(tmp_path / "data")) if durable else ()
    broker = broker_process(*args)
    ids = ["mem-%d" % i for i in range(100)]
    assert publish_until_killed(broker, ids, None, random.Random(0)) == ids
    broker.kill()
    restarted = broker_process(*args)
    survivors = drain(restarted)
    if durable:
        assert sorted(survivors) == sorted(ids)
    else:
        assert survivors == [], "memory-only: the 100 ACKed messages are gone"
