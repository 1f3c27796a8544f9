"""Hostile input: the broker shrugs.

``CASES`` is a table of hostile clients.  Each row names what the client does
(``why``), what the broker must do about it (``expect``) and the limits it runs
under (a ``profile``); ``test_hostile`` runs every row against its own real broker
on port 0.  Around every case a well-behaved **neighbour** connection stores a
sentinel message before the hostile client starts and, afterwards, must still get
``PONG`` and find its message intact: no hostile input may stall a neighbour or
lose what is stored.

A case whose broker behaviour is wrong today carries ``bug=``: its test is
``xfail(strict=True)``, so fixing the broker makes it fail until the mark goes.

The same table is in docs/SECURITY.md, rendered by :func:`render_table`;
``test_security_md_shows_this_table`` keeps the two identical.  After changing a
case, print the new table with ``.venv/bin/python tests/test_hostile.py``.
"""
import contextlib
import dataclasses
import json
import logging
import random
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
from conftest import WAIT, Wire, envelope, parse_message, publish_line
from scripts import require_openssl

from ciphermq import access
from ciphermq.transport import PLAINTEXT_ON_TLS_PORT

REPO = Path(__file__).resolve().parent.parent
LIMIT = 8192                    # max_line_bytes of the "small" profile
NAME_RULE = "(1-128 of A-Z a-z 0-9 . _ : -)"
HAS_OPENSSL = shutil.which("openssl") is not None

#: Broker limits per profile.  ``...`` is filled in at run time (a file or directory).
PROFILES = {
    "small": dict(max_line_bytes=LIMIT, line_timeout=0.5),
    "idle": dict(idle_timeout=0.3),
    "few": dict(max_connections=4),
    "churn": dict(max_connections=16),
    "short-queue": dict(max_queue_length=3),
    "write-timeout": dict(write_timeout=0.3),
    "users": dict(users_file=..., auth_timeout=0.5),
    "tls": dict(tls_cert=..., tls_key=..., auth_timeout=0.5),
    "journal": dict(data_dir=...),
}


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    why: str                        # the hostile input, in one line
    expect: str                     # what the broker does about it, in one line
    run: Callable                   # run(ctx: Hostile): plays the client and asserts
    profile: str = "small"
    bug: Optional[str] = None       # set while the broker does not yet do what `expect` says


# -- what a case gets --------------------------------------------------------------------

class Hostile:
    """One case's world: its broker, the neighbour, and ways to open more connections.

    Every connection opened here is closed when the case ends.
    """

    def __init__(self, server, profile, env, stack):
        self.server = server
        self.profile = profile
        self.env = env
        self._stack = stack
        self.neighbour = None

    def connect(self, login=True, user="root"):
        """A protocol client; over TLS on a TLS broker, and authenticated (as ``user``) on one
        with --users unless ``login`` is false."""
        client = Wire(self.server.address,
                      tls=self.env.client_tls() if self.profile == "tls" else None)
        self._stack.callback(client.close)
        if self.profile == "users" and login:
            assert client.call("auth %s %s" % (user, self.env.tokens[user])) == "AUTH_OK"
        return client

    def raw(self, receive_buffer=None):
        """A bare TCP socket to the broker (no TLS, no auth)."""
        sock = socket.socket()
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(WAIT)
        sock.connect(self.server.address)
        self._stack.callback(sock.close)
        return sock


class Environment:
    """Files shared by the module's cases: a users file and (with openssl) TLS certificates."""

    def __init__(self, tmp_path_factory):
        directory = tmp_path_factory.mktemp("hostile")
        self.users_file = directory / "users.json"
        self.tokens = {
            "root": access.add_user(str(self.users_file), "root", ["*"], ["*"], True),
            "alice": access.add_user(str(self.users_file), "alice", ["default_exchange"], [],
                                     False),
        }
        self.certs = None
        if HAS_OPENSSL:
            self.certs = directory / "certs"
            subprocess.run([sys.executable, str(REPO / "bin" / "certs.py"),
                            "--out-dir", str(self.certs)],
                           check=True, capture_output=True, timeout=60)

    def client_tls(self):
        return ssl.create_default_context(cafile=str(self.certs / "ca.pem"))

    def config(self, profile, tmp_path):
        values = {"users_file": str(self.users_file), "data_dir": str(tmp_path / "data")}
        if self.certs is not None:
            values.update(tls_cert=str(self.certs / "server.pem"),
                          tls_key=str(self.certs / "server.key"))
        return {key: values[key] if value is ... else value
                for key, value in PROFILES[profile].items()}


# -- small helpers for the cases ---------------------------------------------------------

ENVELOPE_TAIL = b'"enc_session_key": "a2V5", "nonce": "bm9uY2U=", "tag": "dGFn", ' \
                b'"ciphertext": "Y2lwaGVy"'


def raw_envelope(message_id=b"h-1", extra=b""):
    """An envelope's JSON as raw bytes, ``extra`` spliced in unchecked (to write hostile JSON)."""
    return b'{"message_id": "%s", %s%s}' % (message_id, ENVELOPE_TAIL,
                                             b", " + extra if extra else b"")


def publish(body, exchange=b"default_exchange", key=b"default_key"):
    return b"publish %s %s %s\n" % (exchange, key, body)


def request(client, line):
    """Send one raw line (bytes ending in a newline) and return the reply as str."""
    client.send(line)
    return client.text()


def assert_eof(client):
    """The broker has closed the connection: the next read is EOF, not another line."""
    with pytest.raises((EOFError, ConnectionResetError)):
        client.line()


def assert_nothing_stored(ctx, queue="default_queue"):
    assert ctx.neighbour.call("fetch %s" % queue) == "No messages"


def dribble(client, data, gap=0.1):
    """Send ``data`` a byte every ``gap`` seconds (each gap a bounded read that must stay silent).

    Returns how many bytes went out before the broker hung up, or None if it never did.
    """
    for sent in range(len(data)):
        try:
            client.send(data[sent:sent + 1])
            line = client.line(timeout=gap)
        except socket.timeout:
            continue
        except (EOFError, ConnectionError):
            return sent
        raise AssertionError("unexpected reply while dribbling: %r" % line)
    return None


def answers(data, *expected):
    """A case: send ``data`` at once; the broker answers exactly ``expected``, then ``ping`` still
    gets ``PONG`` (so nothing else was answered either)."""
    def run(ctx):
        client = ctx.connect()
        client.send(data)
        assert [client.text() for _ in expected] == list(expected)
        assert client.call("ping") == "PONG"
    return run


def answers_then_closes(data, *expected):
    """A case: a client that has not logged in sends ``data``; the broker answers exactly
    ``expected`` and closes the connection."""
    def run(ctx):
        client = ctx.connect(login=False)
        client.send(data)
        assert [client.text() for _ in expected] == list(expected)
        assert_eof(client)
    return run


def invalid_queue(shown):
    return "Error: invalid queue name '%s' %s" % (shown, NAME_RULE)


INVALID_ID = "Error: invalid message_id %s" % NAME_RULE


def many(lines_and_replies):
    """Join ``[(line bytes, expected reply)]`` into one ``answers`` case."""
    return answers(b"".join(line for line, _ in lines_and_replies),
                   *[reply for _, reply in lines_and_replies])


# -- cases that need more than one exchange of lines ----------------------------------------

def run_endless_line(ctx):
    client = ctx.connect()
    for _ in range(16):                             # 1 MiB, never a newline
        client.send(b"A" * 65536)
    client.send(b"\n")
    assert client.text() == "Error: line too long (max %d bytes)" % LIMIT
    assert client.call("ping") == "PONG"


def run_endless_line_dribbled(ctx):
    client = ctx.connect()
    client.send(b"A" * (LIMIT + 100))
    assert client.text() == "Error: line too long (max %d bytes)" % LIMIT
    assert dribble(client, b"A" * 15) is not None   # 1.5 s: three line deadlines


def run_slowloris(ctx):
    client = ctx.connect()
    assert dribble(client, publish(raw_envelope(b"slow-1"))) is not None
    assert_nothing_stored(ctx)


def run_lines_straddling_reads(ctx):
    client = ctx.connect()
    client.send(b"ping\npi")
    for _ in range(10):                 # 1 s in all; every line is finished within 0.1 s
        assert client.text() == "PONG"
        client.expect_nothing(0.1)
        client.send(b"ng\npi")
    assert client.text() == "PONG"
    assert client.call("ng") == "PONG"


def run_cr_only(ctx):
    client = ctx.connect()
    client.send(b"ping\rping\rping\r")
    assert_eof(client)


def run_idle(ctx):
    silent = ctx.connect()
    for _ in range(50):                 # the neighbour talks while the other stays silent
        assert ctx.neighbour.call("ping") == "PONG"
        try:
            line = silent.line(timeout=0.1)
        except socket.timeout:
            continue
        except EOFError:
            return
        raise AssertionError("unexpected line: %r" % line)
    raise AssertionError("the silent client was never dropped")


def run_too_many_connections(ctx):
    others = [ctx.connect() for _ in range(3)]     # with the neighbour: 4, the limit
    assert [client.call("ping") for client in others] == ["PONG"] * 3
    refused = ctx.connect()
    assert refused.text() == "Error: too many connections (max 4)"
    assert_eof(refused)
    assert [client.call("ping") for client in others] == ["PONG"] * 3


def run_connection_churn(ctx):
    before = set(threading.enumerate())
    for round_ in range(60):
        kind = round_ % 4
        if kind == 0:                               # polite
            client = Wire(ctx.server.address)
            assert client.call("ping") == "PONG"
            client.close()
        elif kind == 1:                             # connect and vanish
            socket.create_connection(ctx.server.address).close()
        elif kind == 2:                             # half a line, then a reset
            sock = socket.create_connection(ctx.server.address)
            sock.sendall(b"publish default_exchange default_key {")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        else:                                       # a consumer that leaves
            client = Wire(ctx.server.address)
            assert client.call("consume default_queue") == "Subscribed to queue"
            client.close()
    # Connections are accepted in order: once a newer one is answered, all were taken.
    probe = Wire(ctx.server.address)
    assert probe.call("ping") == "PONG"
    probe.close()
    deadline = time.monotonic() + WAIT
    started = [thread for thread in threading.enumerate() if thread not in before]
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert [thread.name for thread in started if thread.is_alive()] == []
    clients = [ctx.connect() for _ in range(15)]   # every slot is free again
    assert [client.call("ping") for client in clients] == ["PONG"] * 15
    assert json.loads(clients[0].call("stats"))["queues"]["default_queue"]["consumers"] == 0


def run_queue_full(ctx):
    client = ctx.connect()
    for i in range(3):
        assert client.call(publish_line("qf-%d" % i).strip()) == "ACK qf-%d" % i
    assert client.call(publish_line("qf-3").strip()) == "Error: queue 'default_queue' is full"
    for i in range(3):
        assert parse_message(client.call("fetch default_queue"))[0] == "qf-%d" % i
        assert client.call("ack qf-%d" % i) == "ACK_CONFIRMED qf-%d" % i


def run_dot_names_are_not_paths(ctx):
    data_dir = Path(ctx.server.config.data_dir)
    before = sorted(str(path) for path in data_dir.parent.rglob("*"))
    client = ctx.connect()
    for name in ("..", ".", "...", ".dead", "..:..", "-.-"):
        assert client.call("declare_queue %s" % name) == "Queue declared"
    assert client.call("bind default_exchange .. dots") == "Queue bound"
    assert client.call(publish_line("dots-1", key="dots").strip()) == "ACK dots-1"
    assert sorted(str(path) for path in data_dir.parent.rglob("*")) == before
    assert {"..", ".", "...", ".dead"} <= set(json.loads(client.call("stats"))["queues"])


def run_edge_numbers(ctx):
    numbers = (b"[-0, 0.0, -0.0, 1.7976931348623157e308, 5e-324, 1e-400, -1e-400, "
               b"123456789012345678901234567890, 1E+2, " + b"7" * 4300 + b"]")
    client = ctx.connect()
    assert request(client, publish(raw_envelope(b"num-1", b'"x": ' + numbers))) == "ACK num-1"
    client.send(b"fetch default_queue\n")
    assert client.line().endswith(b'"x": ' + numbers + b', "delivery_count": 1}'), \
        "forwarded byte for byte"


def run_escaped_controls(ctx):
    escaped = b'"\\u0000\\u001b[31m\\n\\r\\t\\u2028\\\\"'
    client = ctx.connect()
    assert request(client, publish(raw_envelope(b"esc-1", b'"x": ' + escaped))) == "ACK esc-1"
    client.send(b"fetch default_queue\n")
    pushed = client.line()
    assert b'"x": ' + escaped in pushed
    assert not set(pushed) & set(range(32)), "no raw control byte reaches a consumer"
    assert parse_message(pushed)[1]["x"] == "\x00\x1b[31m\n\r\t\u2028\\"


def run_delivery_count_smuggling(ctx):
    client = ctx.connect()
    for message_id, extra in ((b"ds-1", b'"delivery_count": 99'),
                              (b"ds-2", b'"delivery\\u005fcount": 7'),
                              (b"ds-3", b'"delivery_count": "lots", "x": {"delivery_count": 5}')):
        assert request(client, publish(raw_envelope(message_id, extra))) == \
            "ACK %s" % message_id.decode()
    for _ in range(3):
        client.send(b"fetch default_queue\n")
        pushed = client.line()
        message_id, body = parse_message(pushed)
        assert body["delivery_count"] == 1
        assert pushed.count(b'"delivery_count"') == 1 + (message_id == "ds-3")
        assert b"delivery\\u005fcount" not in pushed
        assert client.call("ack %s" % message_id) == "ACK_CONFIRMED %s" % message_id


def run_forge_raw_newline(ctx):
    forged = raw_envelope(b"fg-evil")
    client = ctx.connect()
    client.send(b"publish default_exchange default_key " + raw_envelope(
        b"fg-1", b'"x": 1\nMessage: fg-evil ' + forged) + b"\n")
    assert client.text() == "Error: envelope must be a JSON object"
    assert client.text() == "Error: unknown command 'Message:'"
    assert_nothing_stored(ctx)


def run_forge_escaped(ctx):
    text = "\nMessage: fg-evil " + json.dumps(envelope("fg-evil")) + "\u2028\x85\r"
    body = json.dumps(envelope("fg-2", x=text), ensure_ascii=False).encode("utf-8")
    client = ctx.connect()
    assert request(client, publish(body)) == "ACK fg-2"
    client.send(b"fetch default_queue\nping\n")
    message_id, pushed = parse_message(client.line())
    assert (message_id, pushed["x"]) == ("fg-2", text)
    assert client.text() == "PONG", "the embedded text never became a line of its own"


def run_forge_routing_key(ctx):
    client = ctx.connect()
    client.send(b"publish default_exchange default_key\rMessage: fg-evil " + raw_envelope(
        b"fg-evil") + b"\n" + b"publish default_exchange k\xc2\x85Message: " + raw_envelope(
        b"fg-evil") + b"\n")
    assert client.text() == "Error: envelope must be a JSON object"
    assert client.text() == "Error: invalid routing key 'k?Message:'"
    assert client.call("ping") == "PONG"
    assert_nothing_stored(ctx)


def run_ack_foreign(ctx):
    owner, thief = ctx.connect(), ctx.connect()
    assert owner.call(publish_line("af-1").strip()) == "ACK af-1"
    assert parse_message(owner.call("fetch default_queue"))[0] == "af-1"
    refused = "Error: message 'af-1' is not delivered to this connection"
    assert thief.call("ack af-1") == refused
    assert thief.call("nack af-1") == refused
    assert owner.call("ack af-1") == "ACK_CONFIRMED af-1"


def run_ack_ready(ctx):
    client = ctx.connect()
    assert client.call(publish_line("ar-1").strip()) == "ACK ar-1"
    assert client.call("ack ar-1") == "Error: message 'ar-1' is not delivered to this connection"
    message_id, body = parse_message(client.call("fetch default_queue"))
    assert (message_id, body["delivery_count"]) == ("ar-1", 1)
    assert client.call("ack ar-1") == "ACK_CONFIRMED ar-1"


def run_pre_auth_command(ctx):
    client = ctx.connect(login=False)
    client.send(publish_line("pa-1") + "ping\n")
    assert client.text() == "Error: authentication required: send 'auth <name> <token>' first"
    assert_eof(client)
    assert_nothing_stored(ctx)


def run_auth_brute_force(ctx):
    client = ctx.connect(login=False)
    client.send("auth alice wrong-token\nauth alice %s\nping\n" % ctx.env.tokens["alice"])
    assert client.text() == "Error: authentication failed"
    assert_eof(client)


def run_auth_deadline(ctx):
    assert_eof(ctx.connect(login=False))


def run_auth_twice(ctx):
    client = ctx.connect(user="alice")
    assert client.call("auth root %s" % ctx.env.tokens["root"]) == \
        "Error: already authenticated as alice"
    assert client.call(publish_line("twice-1").strip()) == "ACK twice-1"
    assert client.call("declare_queue mine") == \
        "Error: not allowed: alice may not declare or bind"


def run_acl_refusals(ctx):
    alice = ctx.connect(user="alice")
    for command, reply in (
            ("consume default_queue", "alice may not consume from queue 'default_queue'"),
            ("fetch vault", "alice may not consume from queue 'vault'"),
            ("declare_queue sneaky", "alice may not declare or bind"),
            ("bind default_exchange vault default_key", "alice may not declare or bind"),
            ("stats", "alice may not declare or bind"),
            (publish_line("acl-1", exchange="vault", key="vault").strip(),
             "alice may not publish to exchange 'vault'")):
        assert alice.call(command) == "Error: not allowed: " + reply
    assert alice.call("ping") == "PONG"
    assert "sneaky" not in json.loads(ctx.neighbour.call("stats"))["queues"]


def run_consumer_never_reads(ctx):
    stuck = ctx.raw(receive_buffer=4096)
    stuck.sendall(b"consume default_queue 0\n")
    reply = b""
    while not reply.endswith(b"\n"):
        reply += stuck.recv(1)
    assert reply == b"Subscribed to queue\n"        # ... and it never reads again
    publisher = ctx.connect()
    count = 12                                      # 12 MB: more than any socket buffer
    for i in range(count):
        assert publisher.call(publish_line("nr-%d" % i, ciphertext="B" * 1_000_000).strip()) \
            == "ACK nr-%d" % i, "a publisher is never held up by a stuck consumer"
    live = ctx.connect()
    assert live.call("consume default_queue 0") == "Subscribed to queue"
    got = [parse_message(live.line())[0] for _ in range(count)]
    assert sorted(got) == sorted("nr-%d" % i for i in range(count))


def run_flood_without_reading(ctx):
    flooder = ctx.raw(receive_buffer=4096)
    try:
        for _ in range(10_000):                     # each stats reply is ~40 times its command
            flooder.sendall(b"stats\n" * 1000)
    except (BrokenPipeError, ConnectionResetError):
        return                                      # dropped at its write deadline
    raise AssertionError("the broker kept serving a client that never reads")


def read_to_eof(sock):
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def run_half_close_after_commands(ctx):
    sock = ctx.raw()
    sock.sendall(b"ping\n" + publish_line("hc-1").encode() + b"ping")
    sock.shutdown(socket.SHUT_WR)
    assert read_to_eof(sock) == b"PONG\nACK hc-1\n", "complete lines answered, the rest dropped"
    assert parse_message(ctx.neighbour.call("fetch default_queue"))[0] == "hc-1"


def run_half_close_mid_line(ctx):
    sock = ctx.raw()
    sock.sendall(publish_line("hm-1").encode()[:-5])
    sock.shutdown(socket.SHUT_WR)
    assert read_to_eof(sock) == b""
    assert_nothing_stored(ctx)


def reset(sock):
    """Close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def run_rst_mid_line(ctx):
    sock = ctx.raw()
    sock.sendall(publish_line("rm-1").encode()[:-10])
    reset(sock)
    assert ctx.neighbour.call("ping") == "PONG"
    assert_nothing_stored(ctx)


def run_rst_holding_a_message(ctx):
    holder = Wire(ctx.server.address)
    assert holder.call(publish_line("rh-1").strip()) == "ACK rh-1"
    assert parse_message(holder.call("fetch default_queue"))[0] == "rh-1"
    reset(holder.sock)
    heir = ctx.connect()
    assert heir.call("consume default_queue") == "Subscribed to queue"
    message_id, body = parse_message(heir.line())
    assert (message_id, body["delivery_count"]) == ("rh-1", 2)
    assert heir.call("ack rh-1") == "ACK_CONFIRMED rh-1"


def _received_until_closed(sock):
    """Everything the broker sends on ``sock`` until it closes it (EOF or reset)."""
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


def closes_without_a_line(sock):
    """True once the broker closes ``sock`` (EOF or reset) having sent no line of text."""
    data = _received_until_closed(sock)
    return b"\n" not in data or not data.isascii()     # a TLS alert at most, never a reply


def closes_with_the_tls_hint_at_most(sock):
    """True once the broker closes ``sock`` having sent, as text, at most the one line that
    tells a plaintext client to use TLS (never a reply to what it sent)."""
    data = _received_until_closed(sock)
    return data in (b"", PLAINTEXT_ON_TLS_PORT) or b"\n" not in data or not data.isascii()


def run_tls_garbage(ctx):
    sock = ctx.raw()
    sock.sendall(random.Random(5).randbytes(4000) + b"\n" + publish_line("tg-1").encode())
    assert closes_with_the_tls_hint_at_most(sock)
    assert_nothing_stored(ctx)


def run_tls_plaintext(ctx):
    sock = ctx.raw()
    sock.sendall(b"ping\n" + publish_line("tp-1").encode())
    data = b""
    while not data.endswith(b"\n"):
        data += sock.recv(4096)
    assert data == PLAINTEXT_ON_TLS_PORT       # the hint, then the close: nothing executed
    assert closes_with_the_tls_hint_at_most(sock)
    assert_nothing_stored(ctx)


def run_tls_handshake_stall(ctx):
    assert closes_without_a_line(ctx.raw())


def run_tls_to_plain_port(ctx):
    context = ssl.create_default_context()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        context.wrap_socket(ctx.raw(), server_hostname="localhost")


# -- the table ----------------------------------------------------------------------------

def _punctuation():
    return [(b"declare_queue a%sb\n" % bytes([c]), invalid_queue("a%sb" % chr(c)))
            for c in b"!\"#$%&'()*+,/;<=>?@[\\]^`{|}~"]


def _controls():
    codes = [c for c in range(1, 32) if c not in (9, 10, 11, 12, 13)] + [127]
    return [(b"declare_queue a%sb\n" % bytes([c]), invalid_queue("a?b")) for c in codes]


def _lookalikes():
    names = {"d\u0435fault_queue": "d\u0435fault_queue",       # Cyrillic e
             "\uff44efault_queue": "\uff44efault_queue",       # fullwidth d
             "default_queu\u00e9": "default_queu\u00e9",
             "default\u00a0queue": "default?queue",            # no-break space
             "default\u200bqueue": "default?queue",            # zero-width space
             "\u202edefault_queue": "?default_queue",          # right-to-left override
             "queue\u0661\u0662": "queue\u0661\u0662"}         # Arabic-Indic digits
    return [(b"declare_queue %s\n" % name.encode(), invalid_queue(shown))
            for name, shown in names.items()]


def _nested(depth, leaf=b"1"):
    for _ in range(depth):
        leaf = b'{"a": ' + leaf + b"}"
    return leaf


def _extras(count):
    return b", ".join(b'"x%d": %d' % (i, i) for i in range(count))


def _json_error_position(body, needle):
    return body.decode("utf-8").index(needle)


_CONTROL_BODY = raw_envelope(b"cc-1", b'"x": "a\x01b"')
_UNTERMINATED_BODY = raw_envelope(b"cc-2", b'"x": "abc')
_OVERSIZE = publish(raw_envelope(b"big-1").replace(b'"Y2lwaGVy"', b'"' + b"A" * LIMIT + b'"'))
USAGE = {
    "declare_queue": "declare_queue <queue>", "fetch": "fetch <queue>",
    "ack": "ack <message_id>", "nack": "nack <message_id>",
    "consume": "consume <queue> [prefetch]", "bind": "bind <exchange> <queue> <routing_key>",
    "declare_exchange": "declare_exchange <exchange> [direct|fanout|topic]",
    "publish": "publish <exchange> <routing_key> <json>", "ping": "ping", "stats": "stats [queue]",
}
PREFETCH_ERROR = "Error: prefetch must be an integer from 0 to 65535"

CASES = [
    # -- line length and timing ---------------------------------------------------------
    Case("line-under-limit", "a command line one byte under max_line_bytes",
         "executed normally", answers(b"ping" + b" " * (LIMIT - 5) + b"\n", "PONG")),
    Case("line-at-limit", "a command line of exactly max_line_bytes, ended by \\r\\n",
         "executed normally (the \\r is not counted)",
         answers(b"ping" + b" " * (LIMIT - 4) + b"\r\n", "PONG")),
    Case("line-over-limit", "a command line one byte over max_line_bytes",
         "`Error: line too long (max N bytes)`, line discarded, connection usable",
         answers(b"ping" + b" " * (LIMIT - 3) + b"\n",
                 "Error: line too long (max %d bytes)" % LIMIT)),
    Case("endless-line", "1 MiB without a newline, then one",
         "one `Error: line too long`, the bytes are discarded as they come (memory stays "
         "bounded), connection usable", run_endless_line),
    Case("endless-line-dribbled", "an over-long line, then one more byte every 0.1 s, forever",
         "closed at line_timeout like any unfinished line", run_endless_line_dribbled),
    Case("slowloris", "a publish dribbled one byte every 0.1 s",
         "closed at line_timeout; the half line is never executed", run_slowloris),
    Case("lines-straddling-reads", "a well-behaved client whose every read ends mid-line "
         "(each line finished within 0.1 s) for longer than line_timeout",
         "never dropped: each line has its own deadline", run_lines_straddling_reads),
    Case("cr-only-line-endings", "lines ended by a bare \\r",
         "no line is ever complete: closed at line_timeout, nothing executed", run_cr_only),
    Case("idle-connection", "a client that connects and says nothing",
         "closed at idle_timeout (when set); a neighbour that talks is kept", run_idle,
         profile="idle"),
    # -- resources ----------------------------------------------------------------------
    Case("too-many-connections", "one connection more than max_connections",
         "`Error: too many connections (max N)` and a clean close; the others go on",
         run_too_many_connections, profile="few"),
    Case("connection-churn", "60 connections opened and closed fast: polite, vanishing, "
         "reset mid-line, consuming",
         "every handler and delivery thread ends, every connection slot and consumer is "
         "freed", run_connection_churn, profile="churn"),
    Case("queue-full", "a publish to a queue at max_queue_length",
         "`Error: queue 'q' is full`, nothing stored; what was queued is kept", run_queue_full,
         profile="short-queue"),
    # -- names ----------------------------------------------------------------------------
    Case("name-path-like", "queue names like `../x`, `/etc/passwd`, `..\\x`, `C:\\x`, `%2e%2e`",
         "`Error: invalid queue name '...' (1-128 of A-Z a-z 0-9 . _ : -)`",
         many([(b"declare_queue %s\n" % name, invalid_queue(name.decode()))
               for name in (b"../x", b"/etc/passwd", b"..\\x", b"C:\\x", b"%2e%2e", b"~root")])),
    Case("name-dot-segments", "queues named `..`, `.`, `...` on a broker with --data-dir",
         "accepted as plain names: no file or directory is created, names never become "
         "paths", run_dot_names_are_not_paths, profile="journal"),
    Case("name-punctuation", "every printable ASCII character outside `[A-Za-z0-9._:-]` in a "
         "name", "`Error: invalid queue name 'a!b' ...`, one per line", many(_punctuation())),
    Case("name-control-chars", "C0 control characters and DEL inside a name",
         "`Error: invalid queue name 'a?b' ...` (controls echoed as `?`)", many(_controls())),
    Case("name-ascii-whitespace", "tab, \\v, \\f or \\r inside a name",
         "they separate arguments: `Error: usage: declare_queue <queue>`",
         many([(b"declare_queue a%sb\n" % bytes([c]), "Error: usage: declare_queue <queue>")
               for c in b"\t\x0b\x0c\r"])),
    Case("name-unicode-lookalikes", "Cyrillic, fullwidth, accented, zero-width, bidi-override "
         "and non-ASCII digit look-alikes of a real queue name",
         "`Error: invalid queue name ...`; invisible characters echoed as `?`",
         many(_lookalikes())),
    Case("name-length", "names of 128 and 129 characters",
         "128 accepted; 129 refused, echoed cut to 40 characters",
         many([(b"declare_queue %s\n" % (b"q" * 128), "Queue declared"),
               (b"declare_queue %s\n" % (b"q" * 129), invalid_queue("q" * 40 + "..."))])),
    Case("name-empty", "missing names and an empty `message_id`",
         "`Error: usage: ...` / `Error: invalid message_id ...`",
         many([(b"declare_queue\n", "Error: usage: declare_queue <queue>"),
               (b"declare_queue   \n", "Error: usage: declare_queue <queue>"),
               (b"fetch \n", "Error: usage: fetch <queue>"),
               (publish(raw_envelope(b"")), INVALID_ID)])),
    Case("message-id-hostile", "message ids that are paths, hold spaces, escaped newlines, "
         "accents or 129 characters", "`Error: invalid message_id (1-128 of ...)`",
         many([(publish(raw_envelope(message_id)), INVALID_ID)
               for message_id in (b"../x", b"a b", b"a\\u000ab", b"\\u00e9t\\u00e9", b"q" * 129,
                                  b"a/b")])),
    # -- JSON -----------------------------------------------------------------------------
    Case("json-depth-extra", "an extra field nested 8 levels deep (--max-json-depth), and 7",
         "`Error: JSON nested deeper than 8 levels`; 7 levels accepted",
         many([(publish(raw_envelope(b"dp-7", b'"x": ' + _nested(7))), "ACK dp-7"),
               (publish(raw_envelope(b"dp-8", b'"x": ' + _nested(8))),
                "Error: JSON nested deeper than 8 levels"),
               (publish(raw_envelope(b"dp-9", b'"x": ' + b"[" * 8 + b"]" * 8)),
                "Error: JSON nested deeper than 8 levels")])),
    Case("json-depth-bomb", "4,000 nested arrays in one envelope",
         "`Error: invalid JSON: nested too deeply` (the parser's recursion limit is caught)",
         answers(publish(raw_envelope(b"bomb-1", b'"x": ' + b"[" * 4000 + b"]" * 4000)),
                 "Error: invalid JSON: nested too deeply")),
    Case("json-too-many-fields", "33 extra fields (--max-extra-fields is 32)",
         "`Error: too many fields (at most 32 extra)`; 32 accepted",
         many([(publish(raw_envelope(b"tf-32", _extras(32))), "ACK tf-32"),
               (publish(raw_envelope(b"tf-33", _extras(33))),
                "Error: too many fields (at most 32 extra)")])),
    Case("json-over-size", "an envelope bigger than max_line_bytes",
         "`Error: line too long`, nothing stored",
         answers(_OVERSIZE, "Error: line too long (max %d bytes)" % LIMIT)),
    Case("json-huge-integer", "an integer of 4,301 digits (4,300 accepted)",
         "`Error: invalid JSON: integer longer than 4300 digits`",
         many([(publish(raw_envelope(b"int-1", b'"x": ' + b"9" * 4300)), "ACK int-1"),
               (publish(raw_envelope(b"int-2", b'"x": ' + b"9" * 4301)),
                "Error: invalid JSON: integer longer than 4300 digits")])),
    Case("json-number-out-of-range", "`1e999` and `-1e999`, alone and with a smuggled "
         "`delivery_count`", "`Error: invalid JSON: number out of range: 1e999`",
         many([(publish(raw_envelope(b"inf-1", b'"x": 1e999')),
                "Error: invalid JSON: number out of range: 1e999"),
               (publish(raw_envelope(b"inf-2", b'"x": -1e999')),
                "Error: invalid JSON: number out of range: -1e999"),
               (publish(raw_envelope(b"inf-3", b'"x": 1e999, "delivery_count": 3')),
                "Error: invalid JSON: number out of range: 1e999")])),
    Case("json-edge-numbers", "`-0`, `-0.0`, the largest and smallest doubles, underflow, a "
         "30-digit and a 4,300-digit integer", "accepted and forwarded byte for byte",
         run_edge_numbers),
    Case("json-duplicate-keys", "a key given twice: top level, nested, and spelled with a "
         "`\\u` escape", "`Error: invalid JSON: duplicate key in JSON object`",
         many([(publish(body), "Error: invalid JSON: duplicate key in JSON object") for body in (
             b'{"message_id": "dk-1", "message_id": "dk-2", ' + ENVELOPE_TAIL + b"}",
             raw_envelope(b"dk-3", b'"x": 1, "x": 2'),
             raw_envelope(b"dk-4", b'"x": {"a": 1, "a": 2}'),
             b'{"message_id": "dk-5", "message\\u005fid": "dk-5", ' + ENVELOPE_TAIL + b"}")])),
    Case("json-nan-infinity", "`NaN`, `Infinity`, `-Infinity` as values",
         "`Error: invalid JSON: NaN is not valid JSON` (and the same for each)",
         many([(publish(raw_envelope(b"nan-1", b'"x": ' + value)),
                "Error: invalid JSON: %s is not valid JSON" % name)
               for value, name in ((b"NaN", "NaN"), (b"Infinity", "Infinity"),
                                   (b"-Infinity", "-Infinity"), (b"[1, NaN]", "NaN"))])),
    Case("json-lone-surrogate-extra", "escaped lone surrogates (`\\ud800`, `\\udc00`) in extra "
         "values, keys and nested lists", "`Error: invalid string in envelope (lone surrogate)`; "
         "a proper pair is accepted",
         many([(publish(raw_envelope(b"ls-%d" % i, extra)),
                "Error: invalid string in envelope (lone surrogate)")
               for i, extra in enumerate((b'"x": "\\ud800"', b'"x": "a\\udc00"',
                                          b'"\\ud800": 1', b'"x": [["\\udbff"]]'))]
              + [(publish(raw_envelope(b"ls-pair", b'"x": "\\ud83d\\ude00"')), "ACK ls-pair")])),
    Case("json-lone-surrogate-required", "lone surrogates in `message_id`, `ciphertext`, `nonce`",
         "`Error: invalid message_id ...` / `Error: field 'ciphertext' must be base64 text`",
         many([(publish(raw_envelope(b"\\ud800")), INVALID_ID),
               (publish(raw_envelope(b"ls-c").replace(b'"Y2lwaGVy"', b'"\\udfff"')),
                "Error: field 'ciphertext' must be base64 text"),
               (publish(raw_envelope(b"ls-n").replace(b'"bm9uY2U="', b'"\\ud800"')),
                "Error: field 'nonce' must be base64 text")])),
    Case("json-raw-control-chars", "a raw \\x01 inside a JSON string; a string left open",
         "`Error: invalid JSON: Invalid control character at position N` / "
         "`Unterminated string starting at position N`",
         many([(publish(_CONTROL_BODY), "Error: invalid JSON: Invalid control character at "
                "position %d" % _json_error_position(_CONTROL_BODY, "\x01")),
               (publish(_UNTERMINATED_BODY), "Error: invalid JSON: Unterminated string starting "
                "at position %d" % _json_error_position(_UNTERMINATED_BODY, '"abc'))])),
    Case("json-escaped-control-chars", "`\\u0000`, ANSI escapes, `\\n`, `\\r`, `\\u2028` "
         "escaped inside strings", "accepted; forwarded still escaped, so no raw control "
         "byte reaches a consumer", run_escaped_controls),
    # -- encodings and bytes ------------------------------------------------------------------
    Case("bom", "a UTF-8 byte-order mark before a verb, a name, a JSON object",
         "`Error: unknown command '?ping'` / `invalid queue name '?q'` / `envelope must be a "
         "JSON object`",
         many([(b"\xef\xbb\xbfping\n", "Error: unknown command '?ping'"),
               (b"declare_queue \xef\xbb\xbfq\n", invalid_queue("?q")),
               (publish(b"\xef\xbb\xbf" + raw_envelope(b"bom-1")),
                "Error: envelope must be a JSON object")])),
    Case("utf16-utf32", "commands encoded as UTF-16 and UTF-32 (with BOMs)",
         "`Error: NUL byte in command` for each piece; nothing executed",
         answers("ping\n".encode("utf-16") + b"\n" + "ping\n".encode("utf-32") + b"\n"
                 + publish("{}".encode("utf-16-le")),
                 *["Error: NUL byte in command"] * 5)),
    Case("overlong-utf8", "overlong UTF-8 (`\\xc0\\xaf` = '/', `\\xc0\\xae` = '.') and "
         "UTF-8-encoded surrogates in verb, name and JSON",
         "`Error: invalid UTF-8 in command` / `invalid queue name` / `invalid UTF-8 in envelope`",
         many([(b"\xc0\xafping\n", "Error: invalid UTF-8 in command"),
               (b"declare_queue \xc0\xae\xc0\xae\n", invalid_queue("\ufffd" * 4)),
               (publish(raw_envelope(b"ol-1", b'"x": "\xc0\xaf"')),
                "Error: invalid UTF-8 in envelope"),
               (publish(raw_envelope(b"ol-2", b'"x": "\xed\xa0\x80"')),
                "Error: invalid UTF-8 in envelope")])),
    Case("invalid-utf8", "stray and truncated UTF-8 bytes in verb, name and JSON",
         "`Error: invalid UTF-8 in command` / `invalid queue name 'q\ufffd'` / `invalid UTF-8 "
         "in envelope`",
         many([(b"\xff\xfe\n", "Error: invalid UTF-8 in command"),
               (b"declare_queue q\xff\n", invalid_queue("q\ufffd")),
               (publish(raw_envelope(b"iu-1", b'"x": "\xff"')), "Error: invalid UTF-8 in envelope"),
               (publish(raw_envelope(b"iu-2", b'"x": "\xe2\x82"')),
                "Error: invalid UTF-8 in envelope")])),
    Case("nul-bytes", "NUL bytes alone, after a verb, inside a name, inside JSON",
         "`Error: NUL byte in command`",
         answers(b"\x00\nping\x00\ndeclare_queue a\x00b\n"
                 + publish(raw_envelope(b"nul-1", b'"x": "a\x00b"')),
                 *["Error: NUL byte in command"] * 4)),
    # -- lines and arguments ------------------------------------------------------------------
    Case("blank-lines", "empty lines, \\r\\n alone, lines of spaces, tabs, \\v and \\f",
         "ignored: no reply at all", answers(b"\n\r\n   \n\t\x0b\x0c\r\n")),
    Case("tabs-between-args", "tabs instead of spaces between arguments",
         "accepted: any ASCII whitespace separates arguments",
         answers(b"declare_queue\ttabbed\nbind\tdefault_exchange\ttabbed\ttab.key\nping\t\n",
                 "Queue declared", "Queue bound", "PONG")),
    Case("extra-args", "one argument too many, for every command",
         "`Error: usage: <command> <arguments>`",
         many([(b"ping x\n", "Error: usage: ping"),
               (b"stats x y\n", "Error: usage: stats [queue]"),
               (b"declare_queue a b\n", "Error: usage: " + USAGE["declare_queue"]),
               (b"declare_exchange e direct x\n", "Error: usage: " + USAGE["declare_exchange"]),
               (b"bind a b c d\n", "Error: usage: " + USAGE["bind"]),
               (b"consume default_queue 1 2\n", "Error: usage: " + USAGE["consume"]),
               (b"fetch a b\n", "Error: usage: " + USAGE["fetch"]),
               (b"ack a b\n", "Error: usage: " + USAGE["ack"]),
               (b"nack a b\n", "Error: usage: " + USAGE["nack"])])),
    Case("missing-args", "commands without their arguments",
         "`Error: usage: <command> <arguments>`",
         many([(verb.encode() + b"\n", "Error: usage: " + USAGE[verb])
               for verb in ("declare_queue", "declare_exchange", "consume", "fetch", "ack",
                            "nack", "publish")]
              + [(b"bind default_exchange default_queue\n", "Error: usage: " + USAGE["bind"]),
                 (b"publish default_exchange default_key\n",
                  "Error: usage: " + USAGE["publish"])])),
    Case("prefetch-numbers", "prefetch `-1`, `65536`, 20 digits, `0x10`, `\u0661\u0662`, `+1`, "
         "`1e3`, `1.5`", "`Error: prefetch must be an integer from 0 to 65535`; 65535 accepted",
         many([(b"consume default_queue %s\n" % value.encode(), PREFETCH_ERROR)
               for value in ("-1", "65536", "9" * 20, "0x10", "\u0661\u0662", "+1", "1e3", "1.5")]
              + [(b"consume default_queue 65535\n", "Subscribed to queue")])),
    Case("unknown-verbs", "`PING`, `ping;`, a bidi override before `ping`, a 50-letter verb, an "
         "HTTP request", "`Error: unknown command '...'` (printable, cut to 40 characters)",
         answers(b"PING\nping;\n" + "\u202eping\n".encode() + b"x" * 50 + b"\n"
                 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                 "Error: unknown command 'PING'", "Error: unknown command 'ping;'",
                 "Error: unknown command '?ping'", "Error: unknown command '%s...'" % ("x" * 40),
                 "Error: unknown command 'GET'", "Error: unknown command 'Host:'")),
    # -- what a consumer receives -----------------------------------------------------------
    Case("delivery-count-smuggling", "a publisher setting `delivery_count` (plainly, through a "
         "`\\u` escape, as a string)", "the publisher's field is removed; the consumer sees the "
         "broker's count (1) exactly once", run_delivery_count_smuggling),
    Case("forge-message-raw-newline", "a publish whose JSON holds a raw newline followed by "
         "`Message: <id> {...}`", "framing splits it: two `Error:` lines "
         "(`envelope must be a JSON object`, `unknown command 'Message:'`), nothing stored",
         run_forge_raw_newline),
    Case("forge-message-escaped", "`\\nMessage: ...` escaped inside a JSON string, plus raw "
         "U+2028 and U+0085", "stored and pushed as one line, byte for byte; no forged line "
         "appears", run_forge_escaped),
    Case("forge-message-routing-key", "a routing key ending in \\r or U+0085 followed by "
         "`Message: ...`", "`Error: envelope must be a JSON object` / `invalid routing key`, "
         "nothing stored", run_forge_routing_key),
    # -- acknowledgements ----------------------------------------------------------------------
    Case("ack-foreign", "ack and nack of a message delivered to another connection",
         "`Error: message 'id' is not delivered to this connection`; the owner still acks it",
         run_ack_foreign),
    Case("ack-never-seen", "ack and nack of ids never published",
         "`Error: message 'id' is not delivered to this connection`",
         many([(b"ack never-seen\n",
                "Error: message 'never-seen' is not delivered to this connection"),
               (b"nack never-seen\n",
                "Error: message 'never-seen' is not delivered to this connection")])),
    Case("ack-ready-message", "ack of a message that is queued but not delivered to anyone",
         "refused; the message is still delivered afterwards", run_ack_ready),
    Case("ack-malformed", "ack/nack of `../x`, `*`, `a/b`, a 129-character id",
         "`Error: invalid message id name '...' (1-128 of ...)`",
         many([(b"%s %s\n" % (verb, message_id),
                "Error: invalid message id name '%s' %s" % (shown, NAME_RULE))
               for verb, message_id, shown in ((b"ack", b"../x", "../x"), (b"ack", b"*", "*"),
                                               (b"nack", b"a/b", "a/b"),
                                               (b"ack", b"q" * 129, "q" * 40 + "..."))])),
    # -- access control (--users) ---------------------------------------------------------------
    Case("auth-brute-force", "a wrong token, then the right one, pipelined on one connection",
         "`Error: authentication failed` and closed: one attempt per connection",
         run_auth_brute_force, profile="users"),
    Case("auth-unknown-user", "auth as a user that does not exist",
         "the same `Error: authentication failed` and close (no user enumeration)",
         answers_then_closes(b"auth mallory whatever\n", "Error: authentication failed"),
         profile="users"),
    Case("auth-malformed", "`auth` with a third word after the token",
         "`Error: usage: auth <name> <token>` (the token is not echoed) and closed",
         answers_then_closes(b"auth alice secret-token extra\n",
                             "Error: usage: auth <name> <token>"), profile="users"),
    Case("auth-pre-auth-command", "a publish before auth",
         "`Error: authentication required: ...` and closed; nothing stored",
         run_pre_auth_command, profile="users"),
    Case("auth-deadline", "a client that connects and never authenticates",
         "closed at auth_timeout", run_auth_deadline, profile="users"),
    Case("auth-twice", "a second auth (as root) on an authenticated connection",
         "`Error: already authenticated as alice`; the principal does not change",
         run_auth_twice, profile="users"),
    Case("acl-refusals", "a publish-only principal consuming, fetching, declaring, binding, "
         "asking stats, publishing elsewhere", "`Error: not allowed: ...` each time; nothing "
         "changes; connection usable", run_acl_refusals, profile="users"),
    # -- sockets ----------------------------------------------------------------------------------
    Case("consumer-never-reads", "a consumer that subscribes and stops reading while 12 MB "
         "is pushed", "dropped at write_timeout; its messages go to a live consumer; "
         "publishers never wait", run_consumer_never_reads, profile="write-timeout"),
    Case("flood-without-reading", "pipelined commands, never reading a reply",
         "dropped at write_timeout", run_flood_without_reading, profile="write-timeout"),
    Case("half-close-after-commands", "ping, publish, half a line, then shutdown(SHUT_WR)",
         "replies to the complete lines are delivered, the half line is dropped, then the "
         "broker closes", run_half_close_after_commands),
    Case("half-close-mid-line", "half a publish, then shutdown(SHUT_WR)",
         "closed without a reply; nothing stored", run_half_close_mid_line),
    Case("rst-mid-line", "half a publish, then a TCP reset",
         "connection forgotten (INFO log); nothing stored", run_rst_mid_line),
    Case("rst-holding-a-message", "a client that fetched a message and resets",
         "the message is requeued and redelivered (delivery_count 2)", run_rst_holding_a_message),
    # -- TLS -----------------------------------------------------------------------------------
    Case("tls-garbage", "4,000 random bytes and a publish to a TLS port",
         "handshake fails, at most `Error: the broker expects TLS: pass --tls-ca`, connection "
         "closed, nothing executed", run_tls_garbage, profile="tls"),
    Case("tls-plaintext", "plain-text commands to a TLS port",
         "`Error: the broker expects TLS: pass --tls-ca`, connection closed, nothing executed",
         run_tls_plaintext, profile="tls"),
    Case("tls-handshake-stall", "a TCP connection to a TLS port that never starts the handshake",
         "closed at auth_timeout (the handshake deadline)", run_tls_handshake_stall,
         profile="tls"),
    Case("tls-to-plain-port", "a TLS handshake to a plain-text port",
         "the client's handshake fails (the broker answers in text or times the line out)",
         run_tls_to_plain_port),
]


# -- the neighbour ----------------------------------------------------------------------------

def store_sentinel(neighbour, case_id):
    """The neighbour's message, kept in a queue of its own that no case touches."""
    for command, reply in (("declare_exchange vault", "Exchange declared"),
                           ("declare_queue vault", "Queue declared"),
                           ("bind vault vault vault", "Queue bound")):
        assert neighbour.call(command) == reply
    sentinel = envelope("sentinel-" + case_id, ciphertext="c2VudGluZWw=")
    line = "publish vault vault %s" % json.dumps(sentinel)
    assert neighbour.call(line) == "ACK " + sentinel["message_id"]
    return sentinel


def check_sentinel(neighbour, sentinel):
    assert neighbour.call("ping") == "PONG", "the neighbour is not stalled"
    message_id, body = parse_message(neighbour.call("fetch vault"))
    assert (message_id, body) == (sentinel["message_id"], dict(sentinel, delivery_count=1))
    assert neighbour.call("ack " + message_id) == "ACK_CONFIRMED " + message_id


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    return Environment(tmp_path_factory)


def _param(case):
    marks = []
    if case.bug:
        marks.append(pytest.mark.xfail(strict=True, reason="BUG: " + case.bug))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_hostile(case, start_server, environment, tmp_path, caplog):
    """Each hostile input gets its documented answer, while a neighbour is neither stalled nor
    robbed and no broker thread fails."""
    if case.profile == "tls":
        require_openssl()           # skips without openssl; under CI=true, fails
    server = start_server(**environment.config(case.profile, tmp_path))
    with contextlib.ExitStack() as stack:
        ctx = Hostile(server, case.profile, environment, stack)
        ctx.neighbour = ctx.connect()
        sentinel = store_sentinel(ctx.neighbour, case.id)
        case.run(ctx)
        check_sentinel(ctx.neighbour, sentinel)
    errors = [record.getMessage() for record in caplog.records
              if record.name.startswith("ciphermq") and record.levelno >= logging.ERROR]
    assert errors == [], "the server's handle_error (or another ERROR) fired"


# -- the table in docs/SECURITY.md --------------------------------------------------------------

TABLE_BEGIN = "<!-- hostile-cases: generated by tests/test_hostile.py, do not edit by hand -->"
TABLE_END = "<!-- /hostile-cases -->"


def _cell(text):
    return text.replace("|", "\\|")


def _limits(profile):
    return ", ".join(key if value is ... else "%s=%s" % (key, value)
                     for key, value in PROFILES[profile].items())


def render_table():
    """The markdown table of CASES, as docs/SECURITY.md shows it (between the markers)."""
    rows = ["| # | case (`test_hostile[...]`) | hostile input | broker behaviour | limits |",
            "|---|---|---|---|---|"]
    for number, case in enumerate(CASES, 1):
        expect = case.expect + (" — **open bug, test is xfail**" if case.bug else "")
        rows.append("| %d | `%s` | %s | %s | %s |" % (
            number, case.id, _cell(case.why), _cell(expect), _cell(_limits(case.profile))))
    return "\n".join([TABLE_BEGIN] + rows + [TABLE_END])


def test_broker_never_loads_the_crypto_code():
    """The broker cannot decrypt: starting it imports neither ciphermq.crypto nor pycryptodome."""
    probe = ("import sys, ciphermq.server; "
             "print(sorted(m for m in sys.modules if m.startswith(('ciphermq.crypto', 'Crypto'))))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_case_table_is_big_and_unambiguous():
    """At least 40 hostile cases, each with a unique id, a reason and an expected behaviour."""
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)
    assert all(case.why and case.expect and case.profile in PROFILES for case in CASES)


def test_security_md_shows_this_table():
    """docs/SECURITY.md holds exactly the table rendered from CASES, so the two cannot drift."""
    text = (REPO / "docs" / "SECURITY.md").read_text(encoding="utf-8")
    start, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    assert 0 <= start < end, "docs/SECURITY.md lacks the hostile-cases markers"
    assert text[start:end + len(TABLE_END)] == render_table(), \
        "docs/SECURITY.md is out of date: paste the output of python tests/test_hostile.py"


def test_security_md_cites_only_tests_that_exist():
    """Every ``tests/<file>::<test>`` that docs/SECURITY.md gives as proof names a real test."""
    text = (REPO / "docs" / "SECURITY.md").read_text(encoding="utf-8")
    cited = re.findall(r"tests/(test_\w+\.py)::(test_\w+)(?:\[([\w-]+)\])?", text)
    assert cited
    case_ids = {case.id for case in CASES}
    missing = [(module, name, param) for module, name, param in cited
               if "def %s(" % name not in (REPO / "tests" / module).read_text(encoding="utf-8")
               or (param and param not in case_ids)]
    assert missing == []


if __name__ == "__main__":
    print(render_table())
