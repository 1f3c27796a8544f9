"""The life of a message id (ciphermq/ids.py), driven directly with a fake clock."""
import pytest
from conftest import FakeClock

from ciphermq import recovery
from ciphermq.ids import MessageIds

BODY = b'{"message_id": "m1", "ciphertext": "AAAA"}'
OTHER = b'{"message_id": "m1", "ciphertext": "BBBB"}'


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def ids(clock):
    return MessageIds(window=3600.0, max_ids=1000, clock=clock)


def test_a_live_id_is_bound_to_its_bytes(ids):
    """While a copy is queued or in flight, the same bytes are a duplicate, others refused."""
    ids.bind("m1", BODY, 1)
    assert ids.bound_to_same("m1", BODY)
    assert not ids.bound_to_same("m1", OTHER)


def test_after_the_first_ack_the_id_stays_bound_by_its_digest(ids):
    """Once acked the bytes are let go, yet the id still accepts only the same bytes."""
    ids.bind("m1", BODY, 1)
    assert ids.settle_copy("m1", BODY) == recovery.envelope_digest(BODY)
    assert "m1" not in ids.live and "m1" in ids.acked_at
    assert ids.bound_to_same("m1", BODY)
    assert not ids.bound_to_same("m1", OTHER)


def test_an_id_acked_before_digests_accepts_any_bytes(ids, clock):
    """An id restored without a digest (journaled before digests) dedups by id alone."""
    ids.restore_acked({"old": 1_000_000}, {}, clock(), 1_000_000)
    assert ids.bound_to_same("old", OTHER)


def test_fanout_copies_keep_the_id_live_until_the_last_is_settled(ids):
    """An id published to three queues is acked at its first settled copy and live until
    its third, and its bytes are counted once however many copies it has."""
    ids.bind("m1", BODY, 3)
    assert ids.live_bytes == len(BODY)
    first = ids.settle_copy("m1", BODY)
    assert "m1" in ids.acked_at and "m1" in ids.live
    assert not ids.bound_to_same("m1", OTHER), "live: compared with the bytes themselves"
    assert ids.settle_copy("m1", BODY) == first
    assert "m1" in ids.live
    assert ids.settle_copy("m1", BODY) == first
    assert "m1" not in ids.live and ids.live_bytes == 0
    assert list(ids.acked_order) == ["m1"], "the id entered the window once"


def test_the_window_forgets_acked_ids_by_age(ids, clock):
    """An acked id is remembered for the dedup window and forgotten, digest too, after it."""
    ids.bind("m1", BODY, 1)
    ids.settle_copy("m1", BODY)
    clock.advance(3599)
    ids.expire(clock())
    assert "m1" in ids.acked_at
    clock.advance(1)
    ids.expire(clock())
    assert "m1" not in ids.acked_at and "m1" not in ids.digests
    assert not ids.acked_order


def test_the_window_holds_at_most_max_ids(clock):
    """Beyond max_ids acked ids the oldest is forgotten first, at ack and at restore."""
    ids = MessageIds(window=3600.0, max_ids=2, clock=clock)
    for name in ("m1", "m2", "m3"):
        ids.bind(name, BODY, 1)
        ids.settle_copy(name, BODY)
    assert list(ids.acked_order) == ["m2", "m3"] and set(ids.digests) == {"m2", "m3"}
    restored = MessageIds(window=3600.0, max_ids=2, clock=clock)
    restored.restore_acked({"a": 1000, "b": 2000, "c": 3000}, {}, clock(), 4000)
    assert list(restored.acked_order) == ["b", "c"]


def test_a_snapshot_restores_the_same_window(ids, clock):
    """The dedup window written by a compaction comes back with its ages and digests."""
    ids.bind("m1", BODY, 1)
    ids.settle_copy("m1", BODY)
    clock.advance(10)
    state = recovery.RecoveredState()
    ids.snapshot_acked(state, clock(), 50_000)
    assert state.acked == {"m1": 40_000}
    restored = MessageIds(window=3600.0, max_ids=1000, clock=clock)
    restored.restore_acked(state.acked, state.acked_digests, clock(), 50_000)
    assert restored.acked_at == ids.acked_at
    assert restored.bound_to_same("m1", BODY) and not restored.bound_to_same("m1", OTHER)
    clock.advance(3590)
    restored.expire(clock())
    assert not restored.acked_at, "the restored id ages from its original ack"
