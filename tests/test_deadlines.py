"""Read deadlines by the clock: however a client paces its bytes, it cannot hold a connection.

These run at the DEFAULT read tick (1 s): a deadline must hold because it is
checked on every pass, not because a test made the reader wake up often.
"""
import socket
import ssl
import threading

import pytest
from conftest import WAIT, FakeClock, Wire, publish_line

from ciphermq import access
from ciphermq.config import ServerConfig

#: How long a dribbler keeps going at most: far past every deadline below plus a tick.
DRIBBLE_FOR = 12.0
#: Its pace: faster than the read tick, so its reads never come back empty.
PACE = 0.4


class Dribbler(threading.Thread):
    """A client that sends ``first`` and then one ``byte`` every PACE seconds, up to DRIBBLE_FOR.

    ``dropped`` is set when a send fails because the broker closed the
    connection (the one after its close is refused), ``exhausted`` when the
    dribbler ran out of budget without being dropped.  The pacing is an
    ``Event.wait`` -- the client's behaviour under test, not a synchronisation.
    """

    def __init__(self, address, first, byte, tls=None):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(address, timeout=WAIT)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.first, self.byte = first, byte
        self.stop = threading.Event()
        self.dropped = threading.Event()
        self.exhausted = threading.Event()

    def run(self):
        try:
            self.sock.sendall(self.first)
            for _ in range(int(DRIBBLE_FOR / PACE)):
                if self.stop.wait(PACE):
                    return
                self.sock.sendall(self.byte)
            self.exhausted.set()
        except OSError:             # EPIPE, ECONNRESET, or a TLS error after the close
            self.dropped.set()

    def close(self):
        self.stop.set()
        self.join(WAIT)
        self.sock.close()


def assert_dropped_while_dribbling(dribbler):
    dribbler.start()
    try:
        assert dribbler.dropped.wait(DRIBBLE_FOR + WAIT)
        assert not dribbler.exhausted.is_set(), "dropped only once the client stopped sending"
    finally:
        dribbler.close()


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users.json"
    token = access.add_user(str(path), "root", ["*"], ["*"], True)
    return str(path), token


def test_default_read_tick_is_the_one_these_tests_use():
    """These tests prove the deadlines at the read tick the broker ships with."""
    assert ServerConfig().read_tick == 1.0


def test_dribbled_line_is_dropped_at_the_line_deadline(start_server):
    """Slowloris: a line fed one byte every 0.4 s is cut off at --line-timeout (plus a tick)."""
    server = start_server(line_timeout=1.0)
    assert_dropped_while_dribbling(
        Dribbler(server.address, b"publish default_exchange default_key {", b"x"))
    bystander = Wire(server.address)
    try:
        assert bystander.call("ping") == "PONG"
    finally:
        bystander.close()


def test_blank_lines_do_not_hold_off_the_login_deadline(start_server, users_file):
    """A client sending a blank line every 0.4 s and never 'auth' is dropped at --auth-timeout."""
    server = start_server(users_file=users_file[0], auth_timeout=1.0)
    assert_dropped_while_dribbling(Dribbler(server.address, b"\n", b"\n"))


def test_tls_dribbled_line_is_dropped_at_the_line_deadline(start_server, certs):
    """Over TLS too, a line fed one byte (one record) at a time is cut off at --line-timeout."""
    trusted = certs[0]
    server = start_server(tls_cert=str(trusted / "server.pem"),
                          tls_key=str(trusted / "server.key"), line_timeout=1.0)
    tls = ssl.create_default_context(cafile=str(trusted / "ca.pem"))
    assert_dropped_while_dribbling(Dribbler(server.address, b"ping\npub", b"x", tls=tls))


def test_tls_blank_lines_do_not_hold_off_the_login_deadline(start_server, certs, users_file):
    """Over TLS, blank lines before 'auth' do not hold off --auth-timeout."""
    trusted = certs[0]
    server = start_server(tls_cert=str(trusted / "server.pem"),
                          tls_key=str(trusted / "server.key"),
                          users_file=users_file[0], auth_timeout=1.0)
    tls = ssl.create_default_context(cafile=str(trusted / "ca.pem"))
    assert_dropped_while_dribbling(Dribbler(server.address, b"\n", b"\n", tls=tls))


class HandshakeDribbler(Dribbler):
    """Sends a genuine TLS ClientHello one byte every PACE seconds: the handshake never ends."""

    def __init__(self, address, tls):
        bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        hello = tls.wrap_bio(bio_in, bio_out, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            hello.do_handshake()
        client_hello = bio_out.read()
        super().__init__(address, client_hello[:1], None)
        self.rest = client_hello[1:1 + int(DRIBBLE_FOR / PACE)]

    def run(self):
        try:
            self.sock.sendall(self.first)
            for byte in self.rest:      # far fewer bytes than a ClientHello has
                if self.stop.wait(PACE):
                    return
                self.sock.sendall(bytes([byte]))
            self.exhausted.set()
        except OSError:
            self.dropped.set()


def test_tls_handshake_deadline_runs_on_the_servers_clock(start_server, certs):
    """The TLS handshake is bounded by --auth-timeout on the server's clock, like every other
    deadline: half a ClientHello is dropped once that clock passes 30 s, seconds before the
    real clock could."""
    trusted = certs[0]
    clock = FakeClock()
    server = start_server(tls_cert=str(trusted / "server.pem"),
                          tls_key=str(trusted / "server.key"), auth_timeout=30.0, clock=clock)
    tls = ssl.create_default_context(cafile=str(trusted / "ca.pem"))
    outgoing = ssl.MemoryBIO()
    hello = tls.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    client_hello = outgoing.read()
    with socket.create_connection(server.address, timeout=WAIT) as sock:
        sock.sendall(client_hello[:len(client_hello) // 2])
        assert clock.wait_for_reads(3), "the handshake never looked at the clock"
        clock.advance(31)
        assert sock.recv(100) == b"", "half a handshake outlived --auth-timeout"


def test_tls_handshake_dribbled_is_dropped_at_the_login_deadline(start_server, certs):
    """A TLS ClientHello fed one byte every 0.4 s is cut off at --auth-timeout (plus a tick)."""
    trusted = certs[0]
    server = start_server(tls_cert=str(trusted / "server.pem"),
                          tls_key=str(trusted / "server.key"), auth_timeout=1.0)
    tls = ssl.create_default_context(cafile=str(trusted / "ca.pem"))
    assert_dropped_while_dribbling(HandshakeDribbler(server.address, tls))


def test_a_real_user_gets_a_slot_while_dribblers_hold_them_all(start_server, users_file):
    """20 pre-auth dribblers filling --max-connections are dropped by deadline; a user gets in."""
    path, token = users_file
    server = start_server(users_file=path, auth_timeout=1.0, max_connections=20)
    dribblers = [Dribbler(server.address, b"\n", b"\n") for _ in range(20)]
    try:
        for dribbler in dribblers:
            dribbler.start()
        user = None
        for _ in range(int(DRIBBLE_FOR / PACE)):   # a user retrying at the dribblers' pace
            candidate = Wire(server.address)
            try:                # a refused connection is told at once, before it sends anything
                refusal = candidate.text(timeout=0.5)
            except socket.timeout:      # accepted -- or, on a loaded machine, refused late
                try:
                    refusal = candidate.call("auth root %s" % token)
                except (OSError, EOFError):     # refused and closed before we read it
                    refusal = None
                if refusal == "AUTH_OK":
                    user = candidate
                    break
            assert refusal in ("Error: too many connections (max 20)", None)
            candidate.close()
            dribblers[0].stop.wait(PACE)
        assert user is not None, "every slot stayed taken"
        assert not any(d.exhausted.is_set() for d in dribblers), "the dribblers gave up first"
        assert user.call("ping") == "PONG"
        user.close()
        for dribbler in dribblers:
            assert dribbler.dropped.wait(WAIT)
    finally:
        for dribbler in dribblers:
            dribbler.close()


def test_line_deadline_runs_on_the_servers_clock(start_server):
    """Connections measure deadlines on the clock given to the server, so tests need not wait."""
    clock = FakeClock()
    server = start_server(line_timeout=30.0, clock=clock)
    client = Wire(server.address)
    try:
        client.send(b"ping\npublish")           # one read: the line starts as PONG is sent
        assert client.text() == "PONG"
        clock.advance(29)
        client.send(b" default_exchange")       # within the deadline: still going...
        client.send(publish_line("in-time")[len("publish default_exchange"):])
        assert client.text() == "ACK in-time"   # ...as its reply shows
        client.send(b"ping\npublish")           # the next line starts, in the read PONG shows
        assert client.text() == "PONG"
        clock.advance(31)
        client.send(b" default_key")            # the next byte finds the deadline passed
        assert client.closed_by_peer() == b""
    finally:
        client.close()


def test_complete_lines_reset_the_line_deadline(start_server):
    """Each line gets its own --line-timeout: a client whose every line takes 29 s of 30 is
    never cut off, though an unfinished line is open the whole time (5 x 29 s in all)."""
    clock = FakeClock()
    server = start_server(line_timeout=30.0, clock=clock)
    client = Wire(server.address)
    try:
        client.send(b"pi")                      # a line begins and stays unfinished...
        for _ in range(5):
            clock.advance(29)
            client.send(b"ng\npi")              # ...finished within 29 s, the next one begun
            assert client.text() == "PONG"
        clock.advance(29)
        client.send(b"ng\n")
        assert client.text() == "PONG"
    finally:
        client.close()


def test_idle_deadline_runs_on_the_servers_clock(start_server):
    """A connection silent past --idle-timeout on the server's clock is dropped at the next tick."""
    clock = FakeClock()
    server = start_server(idle_timeout=600.0, clock=clock)
    client = Wire(server.address)
    try:
        assert client.call("ping") == "PONG"    # heard: the idle clock starts now
        clock.advance(599)
        assert clock.wait_for_reads(2)          # the connection looked at the time: kept
        assert client.call("ping") == "PONG"
        clock.advance(601)
        assert client.closed_by_peer() == b""
    finally:
        client.close()


def test_idle_connection_is_dropped_when_asked(start_server):
    """With --idle-timeout a silent client is disconnected (at the default read tick)."""
    server = start_server(idle_timeout=0.5)
    client = Wire(server.address)
    try:
        assert client.call("ping") == "PONG"
        assert client.closed_by_peer() == b""
    finally:
        client.close()
