"""Idle connections cost no wake-ups, and every deadline still holds when they wake up again."""
from conftest import FakeClock, Wire


def _connection_of(server, wire):
    """The broker's Connection handler for the client socket ``wire``."""
    port = wire.sock.getsockname()[1]
    with server._connections_lock:
        (conn,) = [c for c in server._connections if c.client_address[1] == port]
    return conn


def _count_passes(conn):
    """Count the reader's passes (each read that returns, bytes or a tick, checks deadlines)."""
    passes = []
    overdue = conn._overdue
    conn._overdue = lambda framer, heard: (passes.append(heard), overdue(framer, heard))[1]
    return passes


def test_idle_reader_with_no_deadline_pending_does_not_wake_every_tick(start_server):
    """An authenticated connection between lines, without --idle-timeout, waits idle_read_tick
    from the read that left nothing pending: its thread does not wake at any read tick."""
    server = start_server(read_tick=0.05)
    client = Wire(server.address)
    try:
        assert client.call("ping") == "PONG"
        conn = _connection_of(server, client)
        assert conn._long_tick, "chosen before the reply went out"
        passes = _count_passes(conn)
        client.expect_nothing(1.0)              # twenty read ticks
        assert passes == [], "the reader woke %d times in twenty ticks" % len(passes)
        assert client.call("ping") == "PONG", "bytes still wake it at once"
    finally:
        client.close()


def test_a_line_started_after_a_long_idle_wait_brings_the_line_deadline_back(start_server):
    """After waiting idle_read_tick, the first bytes of an unfinished line bring back the short
    read tick, so the line deadline is enforced on time without another byte."""
    clock = FakeClock()
    server = start_server(read_tick=0.05, line_timeout=30.0, clock=clock)
    client = Wire(server.address)
    try:
        assert client.call("ping") == "PONG"
        conn = _connection_of(server, client)
        client.expect_nothing(0.5)              # ten read ticks: the reader waits long now
        assert conn._long_tick
        client.send(b"publish default_exchange")
        client.expect_nothing(0.3)              # the line has started, on the server's clock
        assert not conn._long_tick
        clock.advance(31)
        assert client.closed_by_peer() == b"", "dropped at the next short tick, no byte sent"
    finally:
        client.close()


def test_idle_timeout_keeps_the_short_tick(start_server):
    """With --idle-timeout a deadline is always pending: a silent connection is still dropped
    within it plus one read tick, however long idle_read_tick is."""
    clock = FakeClock()
    server = start_server(read_tick=0.05, idle_timeout=600.0, idle_read_tick=3600.0, clock=clock)
    client = Wire(server.address)
    try:
        assert client.call("ping") == "PONG"
        conn = _connection_of(server, client)
        client.expect_nothing(0.3)
        assert not conn._long_tick
        clock.advance(601)
        assert client.closed_by_peer() == b""
    finally:
        client.close()
