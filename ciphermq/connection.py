"""One client connection: read commands, answer them, push deliveries.

Each connection has two threads at most:

* the **reader** (the socketserver handler thread) frames lines, runs each
  command against the broker and writes the replies for everything it read
  in one ``sendall``;
* the **delivery thread** ``ciphermq-deliver-<peer>``, started by the first
  ``consume``, waits for the broker to put messages in this session's outbox
  and writes them.

Both write the same socket, so ``send_lock`` guards every ``sendall``.  No
broker lock is ever held while writing: a client that stops reading stalls
only its own connection, until ``write_timeout`` drops it and the broker
requeues whatever it held.
"""
import logging
import socket
import socketserver
import threading

from . import protocol
from .errors import CipherMQError, ProtocolError
from .journal import JournalError

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024


class Connection(socketserver.BaseRequestHandler):
    """The handler ``BrokerServer`` runs in a thread for every accepted socket."""

    def setup(self):
        self.broker = self.server.broker
        self.config = self.server.config
        self.sock = self.request
        self.peer = "%s:%s" % self.client_address[:2]
        #: Guards sendall on this socket: the reader's replies and the delivery
        #: thread's pushes.  May be held while taking broker.mutex, never the reverse.
        self.send_lock = threading.Lock()
        self.thread = threading.current_thread()
        self.chaos = self.server.chaos  # None unless --chaos: see ciphermq/chaos.py
        self.session = self.broker.open_session(self.peer)
        self._replies = []          # replies to the commands of the current read
        self._must_sync = False     # a reply in _replies promises something is on disk
        self._writer = None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # One timeout for both directions: for sends it is the write deadline;
        # for recv it is just a tick to check the idle deadline.
        self.sock.settimeout(self.config.write_timeout)
        log.info("Client connected: %s", self.peer)

    def handle(self):
        if not self.server.register(self):
            return                  # the server is stopping
        framer = protocol.LineFramer(self.config.max_line_bytes)
        while True:
            data = self._receive()
            if not data:
                return
            for line in framer.feed(data):
                self._execute(line)
            if self._replies:
                if not self._sync():
                    return
                self._chaos_pause()
                with self.send_lock:
                    if not self._flush_locked():
                        return

    def finish(self):
        requeued = self.broker.close_session(self.session)
        self.close()
        if self._writer is not None:
            self._writer.join(self.config.write_timeout + 1.0)
        self.server.forget(self)
        log.info("Client disconnected: %s%s", self.peer,
                 " (%d unacked message(s) requeued)" % requeued if requeued else "")

    def close(self):
        """Shut the socket down so both threads stop; safe to call twice, from any thread."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass                    # already closed or never connected

    # -- reading ------------------------------------------------------------

    def _receive(self):
        """The next bytes from the client; b"" when the connection is over."""
        idle_limit = self.config.idle_timeout
        waited = 0.0
        while True:
            try:
                return self.sock.recv(RECV_BYTES)
            except socket.timeout:
                waited += self.sock.gettimeout()
                if idle_limit is not None and waited >= idle_limit:
                    log.info("Dropping %s: idle for %.0f s", self.peer, waited)
                    return b""
            except OSError as exc:
                log.info("Connection from %s lost: %s", self.peer, exc)
                return b""

    def _execute(self, line):
        """Run one command line; its reply (or ``Error: ...``) joins ``_replies``."""
        if isinstance(line, protocol.LineTooLong):
            self._replies.append(protocol.error_reply(
                "line too long (max %d bytes)" % line.limit))
            return
        try:
            verb, args = protocol.split_command(line)
            if verb is None:
                return              # blank line
            command = self.COMMANDS.get(verb)
            if command is None:
                raise ProtocolError("unknown command %s" % protocol.quote(verb.encode()))
            command(self, args)
        except CipherMQError as exc:
            self._replies.append(protocol.error_reply(exc))
        if self.chaos and self.chaos.strikes("disconnect", "dropping connection %s" % self.peer):
            self.close()

    # -- writing ------------------------------------------------------------

    def _sync(self):
        """Before replies that promise durability go out, wait for the journal.

        Returns False (and closes the connection, sending nothing) if the
        journal failed: an ACK must never be sent for a publish not on disk.
        """
        if not self._must_sync:
            return True
        self._must_sync = False
        try:
            self.broker.sync()
            return True
        except JournalError as exc:
            log.error("Closing %s without replies: %s", self.peer, exc)
            self._replies = []
            self.close()
            return False

    def _flush_locked(self):
        """Send the pending replies.  Only called with ``send_lock`` held."""
        data = b"".join(self._replies)
        self._replies = []
        return self._send_locked(data)

    def _send_locked(self, data):
        try:
            self.sock.sendall(data)
            return True
        except socket.timeout:
            log.info("Dropping %s: not reading (write timeout %.1f s)",
                     self.peer, self.config.write_timeout)
        except OSError as exc:
            log.info("Connection from %s lost: %s", self.peer, exc)
        self.close()
        return False

    def _chaos_pause(self):
        """Chaos mode's injected delay (a fault, not synchronisation); ends early on shutdown."""
        if self.chaos:
            delay = self.chaos.delay()
            if delay:
                self.server.stop_requested.wait(delay)

    def _start_delivery_thread(self):
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._deliver, name="ciphermq-deliver-%s" % self.peer, daemon=True)
            self._writer.start()

    def _deliver(self):
        """Delivery thread: write what the broker hands this session until it closes."""
        message_line = protocol.message_line
        while True:
            batch = self.broker.take_outbox(self.session, timeout=self.config.write_timeout)
            if batch is None:
                return
            if self.chaos:
                batch = [delivery for delivery in batch if not self.chaos.strikes(
                    "drop-delivery", "losing the push of message %s" % delivery[0])]
                self._chaos_pause()
            if batch:
                data = b"".join([message_line(*delivery) for delivery in batch])
                with self.send_lock:
                    if not self._send_locked(data):
                        return

    # -- commands: each appends its reply to self._replies ------------------

    def do_declare_queue(self, args):
        (name,) = protocol.split_args(args, "declare_queue <queue>", 1)
        self.broker.declare_queue(protocol.parse_name(name, "queue"))
        self._must_sync = True
        self._replies.append(protocol.QUEUE_DECLARED)

    def do_declare_exchange(self, args):
        words = protocol.split_args(
            args, "declare_exchange <exchange> [direct|fanout|topic]", 1, 2)
        name = protocol.parse_name(words[0], "exchange")
        kind = protocol.parse_exchange_type(words[1]) if len(words) > 1 else "direct"
        self.broker.declare_exchange(name, kind)
        self._must_sync = True
        self._replies.append(protocol.EXCHANGE_DECLARED)

    def do_bind(self, args):
        exchange, queue, key = protocol.split_args(
            args, "bind <exchange> <queue> <routing_key>", 3)
        self.broker.bind(protocol.parse_name(exchange, "exchange"),
                         protocol.parse_name(queue, "queue"),
                         protocol.parse_routing_key(key, binding=True))
        self._must_sync = True
        self._replies.append(protocol.QUEUE_BOUND)

    def do_publish(self, args):
        exchange, routing_key, message_id, body = protocol.parse_publish(args)
        self.broker.publish(exchange, routing_key, message_id, body)
        self._must_sync = True      # also for a duplicate: its first copy may not be on disk yet
        if self.chaos and self.chaos.strikes(
                "drop-ack", "withholding ACK for message %s" % message_id):
            return
        self._replies.append(protocol.ack_reply(message_id))

    def do_consume(self, args):
        words = protocol.split_args(args, "consume <queue> [prefetch]", 1, 2)
        queue = protocol.parse_name(words[0], "queue")
        prefetch = (protocol.parse_prefetch(words[1]) if len(words) > 1
                    else self.config.default_prefetch)
        self._start_delivery_thread()
        if not self._sync():        # earlier replies in this read may be ACKs
            return
        # The reply must reach the client before the first pushed message:
        # holding send_lock keeps the delivery thread from writing until then.
        with self.send_lock:
            self.broker.subscribe(self.session, queue, prefetch)
            self._replies.append(protocol.SUBSCRIBED)
            self._flush_locked()

    def do_fetch(self, args):
        (queue,) = protocol.split_args(args, "fetch <queue>", 1)
        delivery = self.broker.fetch(self.session, protocol.parse_name(queue, "queue"))
        self._replies.append(protocol.NO_MESSAGES if delivery is None
                             else protocol.message_line(*delivery))

    def do_ack(self, args):
        (raw_id,) = protocol.split_args(args, "ack <message_id>", 1)
        message_id = protocol.parse_name(raw_id, "message id")
        if self.broker.ack(self.session, message_id):
            log.debug("Message %s acknowledged", message_id)
        if self.chaos and self.chaos.strikes(
                "drop-confirm", "withholding ACK_CONFIRMED for message %s" % message_id):
            return
        self._replies.append(protocol.ack_confirmed_reply(message_id))

    def do_nack(self, args):
        (raw_id,) = protocol.split_args(args, "nack <message_id>", 1)
        message_id = protocol.parse_name(raw_id, "message id")
        self.broker.nack(self.session, message_id)
        self._replies.append(protocol.nack_confirmed_reply(message_id))

    def do_stats(self, args):
        protocol.split_args(args, "stats", 0)
        self._replies.append(protocol.stats_reply(self.broker.stats()))

    def do_ping(self, args):
        protocol.split_args(args, "ping", 0)
        self._replies.append(protocol.PONG)

    COMMANDS = {
        "declare_queue": do_declare_queue,
        "declare_exchange": do_declare_exchange,
        "bind": do_bind,
        "publish": do_publish,
        "consume": do_consume,
        "fetch": do_fetch,
        "ack": do_ack,
        "nack": do_nack,
        "stats": do_stats,
        "ping": do_ping,
    }
