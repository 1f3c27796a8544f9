"""The blocking client both scripts use: one connection, one reader thread.

A :class:`Client` is one TCP (or TLS) connection to the broker.  Commands are
written by whichever thread calls them; every line the broker sends is read by
the connection's one reader thread, ``ciphermq-client-reader-<host:port>``,
which frames the byte stream by newline and hands each line to its owner:

* a ``Message: <id> <json>`` line that does not answer a ``fetch`` is a *push*
  on a consuming connection: it goes to the queue :attr:`Client.deliveries`;
* any other line is the reply to the oldest command still waiting for one.
  The broker answers every command with exactly one line, in order, so a FIFO
  of :class:`Reply` handles is all the matching there is -- and each reply is
  checked against its command (``ACK <id>`` must name the id published), so a
  lost or extra line ends the connection instead of being misattributed.

Because the reader, not the caller, reads the replies, waiting for an
``ACK_CONFIRMED`` never stops pushed messages from being read, and any number
of publishes can be in flight on one connection (pipelining).

Failures are translated at this boundary: a socket error, EOF, a reply out of
step, or a broker silent past the heartbeat all end the connection with
:class:`~ciphermq.errors.ConnectionLost`, which every waiting Reply raises and
which puts ``None`` into :attr:`Client.deliveries`.  An ``Error: ...`` reply
raises :class:`~ciphermq.errors.ServerError` for its own command only.

Heartbeat: when nothing has arrived for ``heartbeat`` seconds the reader sends
``ping``; whenever a command (that ping included) has waited
``heartbeat_timeout`` seconds with not one byte from the broker, the
connection is presumed dead -- so a silently stalled (half-open) TCP
connection is noticed instead of waited on forever.

Locks (taken in this order only, never the reverse; no socket I/O under
``_mutex``):

1. ``transport.send_lock`` -- guards writing the socket, and makes "join the
   FIFO, then write" one step, so that FIFO order is wire order;
2. ``Client._mutex`` -- guards ``_pending``, ``_consuming`` and ``_error``.
"""
import collections
import json
import logging
import selectors
import socket
import threading
import time
from queue import Queue
from typing import NamedTuple

from . import protocol
from .errors import ConnectionLost, ServerError
from .transport import PLAINTEXT_ON_TLS_PORT, PlainTransport, TlsTransport, TransportError

log = logging.getLogger(__name__)

#: Longest line accepted from the broker: a 16 MiB message, base64'd, and then some.
MAX_LINE_BYTES = 64 * 1024 * 1024
#: ``Reply.expect`` for a fetch: a ``Message:`` line or ``No messages``.
FETCH = object()
#: What a TLS broker says to a plaintext client, as the reader sees the line.
_PLAINTEXT_REFUSAL = PLAINTEXT_ON_TLS_PORT.rstrip(b"\n")


class Delivery(NamedTuple):
    """One message pushed by the broker (or answered to ``fetch``)."""

    message_id: str
    body: bytes             # the envelope JSON as the broker sent it, delivery_count included


class Reply:
    """The broker's answer to one command: a small future the reader thread fills in.

    One is made per command, so it is kept cheap: instead of an Event (a
    Condition and two locks), ``_latch`` is a plain lock taken at creation and
    released by the reader when the reply arrives; a waiter takes it and gives
    it straight back, so any number of waiters pass once it is open.
    """

    __slots__ = ("command", "expect", "sent_at", "_latch", "_arrived", "_line", "_error")

    def __init__(self, command, expect=None):
        self.command = command      # for messages: "publish <id>", "ack <id>", "ping"...
        self.expect = expect        # the exact line that answers it, FETCH, or None (any)
        self.sent_at = None
        self._latch = threading.Lock()
        self._latch.acquire()       # open (released) once the reply has arrived
        self._arrived = False
        self._line = None
        self._error = None          # why the connection ended before the reply came

    def done(self):
        """True once the reply (or the connection's end) has arrived.  Does not block."""
        return self._arrived

    def result(self, timeout=None):
        """Block until the reply arrives, at most ``timeout`` seconds; return it as str.

        Raises TimeoutError if it has not arrived in time (it may still come
        later), ServerError for an ``Error: ...`` reply, and ConnectionLost if
        the connection ended first.
        """
        if not self._arrived:
            if not self._latch.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
                raise TimeoutError("no reply to %s within %.1f s" % (self.command, timeout))
            self._latch.release()
        if self._error is not None:
            raise ConnectionLost(self._error)
        text = self._line.decode("utf-8", "replace")
        if text.startswith("Error: "):
            raise ServerError(text[len("Error: "):])
        return text

    def _accepts(self, line):
        if line.startswith(b"Error: ") or self.expect is None:
            return True
        if self.expect is FETCH:
            return line.startswith(b"Message: ") or line == b"No messages"
        return line == self.expect

    def _set(self, line=None, error=None):
        """Fill the reply in and open the latch; once only (later calls change nothing)."""
        if self._arrived:
            return
        self._line, self._error = line, error
        self._arrived = True
        self._latch.release()


# -- the client --------------------------------------------------------------------

class Client:
    """One connection to the broker.  Connects in the constructor.

    ``timeout`` bounds connecting, the TLS handshake, each write (a broker
    that stops reading for that long is gone) and, by default, the blocking
    calls' wait for their reply.  ``heartbeat`` (seconds, None: off) and
    ``heartbeat_timeout`` (default: ``heartbeat``) are described in the module
    docstring.  ``tls_context`` (see :func:`client_tls_context`) turns on TLS,
    checking the broker's certificate against ``server_hostname`` (default:
    ``host``).  ``auth=(name, token)`` sends ``auth <name> <token>`` as the
    first line and expects ``AUTH_OK``.

    Raises ConnectionLost if the broker cannot be reached or the handshake
    fails, ServerError if it refuses the authentication.  Use as a context
    manager, or call :meth:`close`.
    """

    def __init__(self, host="127.0.0.1", port=5672, *, timeout=5.0, heartbeat=5.0,
                 heartbeat_timeout=None, tls_context=None, server_hostname=None, auth=None,
                 clock=time.monotonic):
        if auth is not None:
            check_auth(*auth)
        self.address = (host, port)
        self.peer = "%s:%s" % (host, port)
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat if heartbeat_timeout is None else heartbeat_timeout
        self._clock = clock
        #: Pushed deliveries, in arrival order; ``None`` once the connection has ended.
        self.deliveries = Queue()
        self._mutex = threading.Lock()          # see the module docstring
        self._pending = collections.deque()     # Replies awaited, oldest first
        self._consuming = False
        self._error = None                      # why the connection ended (str), or None
        self._last_received = clock()           # only touched by the reader thread
        self._transport = self._connect(tls_context, server_hostname or host)
        self._reader = threading.Thread(
            target=self._read_loop, name="ciphermq-client-reader-%s" % self.peer, daemon=True)
        self._reader.start()
        if auth is not None:
            self._authenticate(*auth)

    def _connect(self, tls_context, server_hostname):
        try:
            sock = socket.create_connection(self.address, timeout=self.timeout)
        except OSError as exc:
            raise ConnectionLost("cannot connect to %s: %s" % (self.peer, exc)) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls_context is None:
                return PlainTransport(sock)
            return TlsTransport(sock, tls_context, server_side=False,
                                server_hostname=server_hostname, handshake_timeout=self.timeout)
        except (OSError, TransportError) as exc:
            sock.close()
            raise ConnectionLost("cannot talk to %s: %s" % (self.peer, exc)) from None

    def _authenticate(self, name, token):
        reply = self._request(b"auth %s %s\n" % (name.encode(), token.encode()),
                              Reply("auth %s" % name, b"AUTH_OK"))
        try:
            reply.result(self.timeout)
        except ServerError as exc:
            self.close()
            raise ServerError("authentication as %s refused: %s" % (name, exc)) from None
        except TimeoutError:
            self.close()
            raise ConnectionLost("no answer to auth from %s" % self.peer) from None

    # -- state ------------------------------------------------------------------

    @property
    def lost(self):
        """True once the connection has ended (lost or closed).  Does not block."""
        with self._mutex:
            return self._error is not None

    def close(self):
        """Close the connection; replies still awaited raise ConnectionLost.

        Safe to call twice and from any thread; joins the reader thread
        (unless called from it).
        """
        self._fail("connection closed by the client", quiet=True)
        if threading.current_thread() is not self._reader:
            self._reader.join(self.timeout)
        self._transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- commands -----------------------------------------------------------------

    def call(self, line, timeout=None):
        """Send one raw command line; block for its reply (str).

        ``timeout`` defaults to the client's.  Raises TimeoutError,
        ServerError or ConnectionLost as :meth:`Reply.result` does.
        """
        if isinstance(line, str):
            line = line.encode("utf-8")
        line = line.rstrip(b"\r\n")
        if b"\n" in line:
            raise ValueError("one command per call: the line holds a newline")
        reply = self._request(line + b"\n", Reply(line.split(b" ", 1)[0].decode()))
        return reply.result(self._wait(timeout))

    def ping(self, timeout=None):
        """Round trip ``ping`` -> ``PONG``; blocks, raises like :meth:`call`."""
        self._request(b"ping\n", Reply("ping", b"PONG")).result(self._wait(timeout))

    def publish_async(self, exchange, routing_key, envelope):
        """Send ``publish``; return its :class:`Reply` (``ACK <id>``) without waiting.

        ``envelope`` is a dict or its JSON text (str or bytes) with a
        ``message_id``.  Raises ConnectionLost if the connection has ended,
        ProtocolError for a name the broker would refuse.
        """
        return self.publish_many([(exchange, routing_key, envelope)])[0]

    def publish_many(self, messages):
        """Send several publishes in one write; return their Replies, in order.

        ``messages`` holds ``(exchange, routing_key, envelope)`` tuples.
        """
        commands, prefixes = [], {}
        for exchange, routing_key, envelope in messages:
            message_id, body = envelope_bytes(envelope)
            prefix = prefixes.get((exchange, routing_key))
            if prefix is None:      # each name checked once per call, not once per message
                prefix = prefixes[exchange, routing_key] = b"publish %s %s " % (
                    _name(exchange, "exchange"), _routing_key(routing_key))
            commands.append((prefix + body + b"\n", Reply("publish %s" % message_id,
                                                          protocol.ack_reply(message_id)[:-1])))
        return self._send(commands)

    def publish(self, exchange, routing_key, envelope, timeout=None):
        """Publish and block until ``ACK <id>``; raises like :meth:`call`."""
        self.publish_async(exchange, routing_key, envelope).result(self._wait(timeout))

    def consume(self, queue, prefetch=None, timeout=None):
        """Subscribe to ``queue``; block for ``Subscribed to queue``.

        From then on pushed messages arrive in :attr:`deliveries` as
        :class:`Delivery` tuples.  ``prefetch`` is the most unacked pushes
        the broker keeps in flight (None: the broker's default; 0: no limit).
        """
        line = b"consume %s" % _name(queue, "queue")
        if prefetch is not None:
            line += b" %d" % prefetch
        with self._mutex:
            self._consuming = True
        self._request(line + b"\n", Reply("consume %s" % queue, b"Subscribed to queue")).result(
            self._wait(timeout))

    def fetch(self, queue, timeout=None):
        """Pull one message: a :class:`Delivery`, or None if the queue is empty.

        Blocks for the reply.  A fetched message must be acked like a pushed
        one.  Not allowed on a consuming connection (a ``Message:`` line
        there is a push, so the answer could not be told apart).
        """
        with self._mutex:
            if self._consuming:
                raise RuntimeError("fetch on a consuming connection: use a second connection")
        text = self._request(b"fetch %s\n" % _name(queue, "queue"),
                             Reply("fetch %s" % queue, FETCH)).result(self._wait(timeout))
        if text == "No messages":
            return None
        return _parse_message_line(text.encode("utf-8"))

    def ack_async(self, message_id):
        """Send ``ack <id>``; return its :class:`Reply` (``ACK_CONFIRMED <id>``) without waiting."""
        return self.ack_many([message_id])[0]

    def ack_many(self, message_ids):
        """Send several acks in one write; return their Replies, in order."""
        commands = []
        for message_id in message_ids:
            raw = _name(message_id, "message id")
            commands.append((b"ack %s\n" % raw, Reply(
                "ack %s" % message_id, protocol.ack_confirmed_reply(message_id)[:-1])))
        return self._send(commands)

    def reject_many(self, refusals):
        """Send ``reject <id> <reason>`` for ``(id, reason)`` pairs in one write; their Replies.

        The broker moves each message to ``<queue>.dead`` with its reason and
        answers ``REJECT_CONFIRMED <id>``.
        """
        commands = []
        for message_id, reason in refusals:
            raw = _name(message_id, "message id")
            text = " ".join(str(reason).split()).encode("ascii", "replace")
            commands.append((b"reject %s %s\n" % (raw, text), Reply(
                "reject %s" % message_id, protocol.reject_confirmed_reply(message_id)[:-1])))
        return self._send(commands)

    def ack(self, message_id, timeout=None):
        """Ack and block until ``ACK_CONFIRMED <id>``; raises like :meth:`call`."""
        self.ack_async(message_id).result(self._wait(timeout))

    # -- writing ------------------------------------------------------------------

    def _wait(self, timeout):
        return self.timeout if timeout is None else timeout

    def _request(self, line, reply):
        return self._send([(line, reply)])[0]

    def _send(self, commands, blocking=True):
        """Queue the Replies and write their lines in one ``sendall``.

        Returns the Replies, or None if ``blocking`` is false and another
        thread is writing.  Raises ConnectionLost if the connection has ended
        or the write fails (then the connection is ended for everyone).
        """
        if not commands:
            return []
        data = b"".join(line for line, _ in commands)
        replies = [reply for _, reply in commands]
        send_lock = self._transport.send_lock
        if not send_lock.acquire(blocking):
            return None
        try:
            now = self._clock()
            with self._mutex:
                if self._error is not None:
                    raise ConnectionLost(self._error)
                for reply in replies:
                    reply.sent_at = now
                self._pending.extend(replies)
            try:
                self._transport.sendall(data)
            except OSError as exc:
                reason = "sending to %s failed: %s" % (self.peer, _describe(exc))
                self._fail(reason)
                raise ConnectionLost(reason) from None
        finally:
            send_lock.release()
        return replies

    # -- reading: the reader thread only ---------------------------------------------

    def _read_loop(self):
        framer = protocol.LineFramer(MAX_LINE_BYTES)
        selector = selectors.DefaultSelector()
        try:
            selector.register(self._transport.sock, selectors.EVENT_READ)
            while True:
                wait = self._check_heartbeat()
                if not self._transport.pending() and not selector.select(wait):
                    continue
                data = self._transport.recv()
                if not data:
                    raise ConnectionLost("connection closed by the broker")
                self._last_received = self._clock()
                for line in framer.feed(data):
                    self._dispatch(line)
        except ConnectionLost as exc:
            self._fail(str(exc))
        except (OSError, ValueError) as exc:   # ValueError: select on a closed socket
            self._fail("connection to %s lost: %s" % (self.peer, _describe(exc)))
        finally:
            selector.close()

    def _check_heartbeat(self):
        """Return how long the reader may wait for bytes; ping or give up when due."""
        now = self._clock()
        with self._mutex:
            if self._error is not None:
                raise ConnectionLost(self._error)
            oldest = self._pending[0].sent_at if self._pending else None
        if self.heartbeat is None:
            return None
        if oldest is not None:
            waited = now - max(oldest, self._last_received)
            if waited >= self.heartbeat_timeout:
                raise ConnectionLost("no reply from %s for %.1f s: connection presumed dead"
                                     % (self.peer, waited))
            return self.heartbeat_timeout - waited
        idle = now - self._last_received
        if idle < self.heartbeat:
            return self.heartbeat - idle
        # Idle: ask for a PONG.  If a writer holds the send lock, a command is
        # going out right now and its reply will prove the connection as well.
        if self._send([(b"ping\n", Reply("ping", b"PONG"))], blocking=False) is None:
            return self.heartbeat / 10
        return self.heartbeat_timeout

    def _dispatch(self, line):
        if isinstance(line, protocol.LineTooLong):
            raise ConnectionLost("the broker sent a line over %d bytes" % line.limit)
        if line == _PLAINTEXT_REFUSAL:      # not an answer: about the whole connection
            raise ConnectionLost(line[len(b"Error: "):].decode("ascii"))
        with self._mutex:
            head = self._pending[0] if self._pending else None
            is_push = line.startswith(b"Message: ") and (head is None or head.expect is not FETCH)
            if not is_push and head is not None:
                self._pending.popleft()
        if is_push:
            self.deliveries.put(_parse_message_line(line))
            return
        if head is None:
            raise ConnectionLost("unexpected line from %s: %s"
                                 % (self.peer, protocol.quote(line)))
        if not head._accepts(line):
            reason = ("reply %s does not answer %s: connection out of step"
                      % (protocol.quote(line), head.command))
            head._set(error=reason)
            raise ConnectionLost(reason)
        head._set(line)

    def _fail(self, reason, quiet=False):
        """End the connection once: wake the reader and every waiter.  Any thread."""
        with self._mutex:
            if self._error is not None:
                return
            self._error = reason
            pending, self._pending = self._pending, collections.deque()
        self._transport.shutdown()
        for reply in pending:
            reply._set(error=reason)
        self.deliveries.put(None)
        if not quiet:
            log.info("Connection to %s ended: %s", self.peer, reason)


def connect(host="127.0.0.1", port=5672, *, attempts=None, retry_interval=1.0, stop=None,
            on_retry=None, **options):
    """Open a :class:`Client`, retrying while the broker cannot be reached.

    Tries up to ``attempts`` times (None: until ``stop``, a threading.Event,
    is set), waiting ``retry_interval`` seconds on ``stop`` between tries;
    ``on_retry(tries, error)`` is called before each wait.  ``options`` go to
    :class:`Client`.  Blocks; raises ConnectionLost when it gives up or is
    stopped, and ServerError at once if authentication is refused.
    """
    stop = stop if stop is not None else threading.Event()
    tries = 0
    while True:
        tries += 1
        try:
            return Client(host, port, **options)
        except ConnectionLost as exc:
            if attempts is not None and tries >= attempts:
                raise
            if on_retry is not None:
                on_retry(tries, exc)
        if stop.wait(retry_interval):
            raise ConnectionLost("stopped while connecting to %s:%s" % (host, port))


# -- helpers -----------------------------------------------------------------------

def check_auth(name, token):
    for what, value in (("name", name), ("token", token)):
        if not isinstance(value, str) or not value or any(ch.isspace() for ch in value):
            raise ValueError("the auth %s must be a non-empty string without spaces" % what)


def _name(text, what):
    """A queue, exchange or id name as bytes; ProtocolError if the broker would refuse it."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    protocol.parse_name(raw, what)
    return raw


def _routing_key(text):
    raw = text.encode("utf-8") if isinstance(text, str) else text
    protocol.parse_routing_key(raw)
    return raw


def envelope_bytes(envelope):
    """``(message_id, JSON bytes)`` for an envelope given as a dict or as JSON text."""
    if isinstance(envelope, dict):
        body = json.dumps(envelope, separators=(",", ":")).encode("utf-8")
    else:
        body = envelope.encode("utf-8") if isinstance(envelope, str) else bytes(envelope)
        envelope = json.loads(body)
    message_id = envelope.get("message_id") if isinstance(envelope, dict) else None
    if not isinstance(message_id, str) or not message_id:
        raise ValueError("an envelope must be a JSON object with a string message_id")
    _name(message_id, "message id")
    if b"\n" in body:
        raise ValueError("an envelope's JSON must fit on one line")
    return message_id, body


def _parse_message_line(line):
    try:
        _, message_id, body = line.split(b" ", 2)
        return Delivery(message_id.decode("ascii"), body)
    except ValueError:                  # too few parts, or a non-ASCII id
        raise ConnectionLost("malformed line from the broker: %s"
                             % protocol.quote(line)) from None


def _describe(exc):
    if isinstance(exc, socket.timeout):
        return "timed out (the other end stopped reading)"
    return str(exc) or type(exc).__name__
