"""Reply, the client's per-command future: cheap, and every waiter sees the one answer."""
import threading

import pytest

from ciphermq.client import Reply
from ciphermq.errors import ConnectionLost


def test_every_waiter_gets_the_reply_once_it_arrives():
    """Several threads waiting on one Reply all return its line when the reader fills it in."""
    reply = Reply("publish m-1", b"ACK m-1")
    results, started = [], threading.Barrier(4)

    def wait():
        started.wait()
        results.append(reply.result(5.0))

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for thread in waiters:
        thread.start()
    started.wait()
    assert not reply.done()
    reply._set(b"ACK m-1")
    for thread in waiters:
        thread.join(5.0)
    assert results == ["ACK m-1"] * 3 and reply.done()
    assert reply.result(0) == "ACK m-1", "and it stays answered"


def test_a_timed_out_wait_leaves_the_reply_waiting():
    """result() raises TimeoutError when nothing came; the reply can still arrive afterwards."""
    reply = Reply("ack m-2", b"ACK_CONFIRMED m-2")
    with pytest.raises(TimeoutError):
        reply.result(0.01)
    reply._set(b"ACK_CONFIRMED m-2")
    assert reply.result(0) == "ACK_CONFIRMED m-2"


def test_the_first_answer_stands():
    """A reply is filled in once: a later _set (the connection ending) changes nothing."""
    reply = Reply("ping", b"PONG")
    reply._set(b"PONG")
    reply._set(error="connection closed")
    assert reply.result(0) == "PONG"
    lost = Reply("ping", b"PONG")
    lost._set(error="connection closed")
    with pytest.raises(ConnectionLost):
        lost.result(0)
