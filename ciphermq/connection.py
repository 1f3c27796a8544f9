"""One client connection: read commands, answer them, push deliveries.

Each connection has two threads at most:

* the **reader** (the socketserver handler thread) frames lines, runs each
  command against the broker and writes the replies for everything it read
  in one ``sendall``;
* the **delivery thread** ``ciphermq-deliver-<peer>``, started by the first
  ``consume``, waits for the broker to put messages in this session's
  ``pushes`` and writes them.

Pushes usually do not need the delivery thread at all.  The connection gives
the broker a callback, :meth:`Connection.write_pushes`, when it opens its
session; the broker hands the callbacks of the sessions a publish (or an ack
that made room) gave pushes back to the reader that caused them, and that
reader calls them after sending its own replies: a non-blocking send straight
to each consumer's socket, which saves waking a thread per message.  If the
connection is busy writing (its own reader is sending a reply), the callback
leaves a flag, ``_pushes_due``, and whoever holds ``send_lock`` writes the
pushes the same way right after releasing it -- every release of
``send_lock`` in this class is followed by :meth:`_write_due_pushes`, so a
flag left while the lock is held is always seen.  Only a socket too full to
take them (or TLS, whose reads may take ``send_lock`` inside the transport)
calls the delivery thread, which writes with blocking sends.

Every write to a socket happens with its connection's ``send_lock`` held, so
bytes never interleave, and pushes are taken from the session only under that
lock, so they go out in order.  No broker lock is ever held while writing: a
client that stops reading stalls only its own connection, until
``write_timeout`` drops it and the broker requeues whatever it held.

The reader also enforces the connection's deadlines: authenticate within
``auth_timeout`` (with ``--users``), finish a started line within
``line_timeout`` (slowloris), and, if set, send something within
``idle_timeout``.  They are checked against the clock whenever bytes arrive
and at every read tick (a read that waits at most ``read_tick`` seconds), so
however a client paces its bytes it is dropped within its deadline plus one
tick.  Between two commands of one read, a reader whose turn is over while
another connection's reader is busy with a short read (an interactive client's
few commands) steps aside for it (``--fair-turn``, see :mod:`ciphermq.turns`).
A reader with no deadline pending -- authenticated,
between lines, no ``idle_timeout`` -- has nothing to check: after every read
the reader picks its next wait, ``idle_read_tick`` when nothing is pending, so
a thousand idle connections do not wake a thousand threads a second (nor all
at once, one tick after they last spoke); the first bytes that start a line
bring the
short tick back before the next read.
"""
import logging
import socket
import socketserver
import threading

from . import protocol, turns
from .access import ANONYMOUS
from .errors import CipherMQError, ProtocolError
from .journal import JournalError, JournalWriteFailed
from .transport import PlainTransport, TlsTransport, TransportError, set_timeouts

log = logging.getLogger(__name__)

#: Replies that promise a record is on disk (see Connection._sync).
_NEEDS_THE_DISK = (b"ACK ", protocol.QUEUE_DECLARED, protocol.EXCHANGE_DECLARED,
                   protocol.QUEUE_BOUND, b"Purged ", b"Requeued ")


class Connection(socketserver.BaseRequestHandler):
    """The handler ``BrokerServer`` runs in a thread for every accepted socket.

    socketserver calls ``setup``, ``handle`` and ``finish`` in that thread.
    """

    def setup(self):
        """Per-connection state; opens the broker session with this connection's write_pushes."""
        self.broker = self.server.broker
        self.config = self.server.config
        self.sock = self.request
        self.peer = "%s:%s" % self.client_address[:2]
        #: Guards writing the socket: the reader's replies, the delivery thread's
        #: pushes, other readers' write_pushes.  It is the transport's (set when
        #: that is made); may be held while taking broker.mutex, never the reverse.
        self.send_lock = None
        self.thread = threading.current_thread()
        self.chaos = self.server.connection_chaos(self.request)   # None unless --chaos
        self.transport = None
        #: Who this is; None until authenticated when the broker has --users.
        self.principal = ANONYMOUS if self.server.users is None else None
        self.session = self.broker.open_session(self.peer, write_pushes=self.write_pushes,
                                                hang_up=self.close)
        self._replies = []          # replies to the commands of the current read
        self._group_kind = None     # "publish" or "ack": the kind waiting in _group
        self._group = []            # (parsed command, its slot in _replies)
        self._push_writers = []     # write_pushes callbacks due after this read's replies
        #: Set by write_pushes when send_lock was taken: its holder writes the
        #: pushes after releasing it (see the module docstring).  A plain flag:
        #: set before trying the lock, read after releasing it.
        self._pushes_due = False
        self._must_sync = False     # a reply in _replies promises something is on disk
        self._hang_up = False       # close once the pending replies are out
        self._writer = None
        #: The deadlines' clock (the server's: time.monotonic, or a test's fake one).
        self.clock = self.server.clock
        self._connected_at = self._line_started = self._heard_at = self.clock()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_timeouts(self.sock, self.config.read_tick, self.config.write_timeout)
        self._long_tick = False     # reads wait idle_read_tick: no deadline is pending
        log.info("Client connected: %s", self.peer)

    def handle(self):
        """The reader: frame lines, run them, answer each read at once; until EOF or a deadline."""
        if not self.server.register(self) or not self._open_transport():
            return
        framer = protocol.LineFramer(self.config.max_line_bytes)
        turn = self.server.turns.turn()
        while True:
            data = self._receive(framer)
            if not data:
                return
            if b"\n" in data or not framer.in_line:    # the unfinished line began in data
                self._line_started = self._heard_at     # when data arrived
            lines = framer.feed(data)
            turn.begin(len(lines))
            try:
                for line in lines:
                    self._execute(line)
                    if turn.due():      # a short read is busy and this turn is over
                        self._step_aside(turn)
                if self._long_tick == self._deadline_pending(framer):
                    self._set_read_tick(long_tick=not self._long_tick)   # before replying
                if self._group:
                    self._run_group()
                if self._replies and not self._answer():
                    return
            finally:
                if self._push_writers:  # after our replies: the publisher waits for its ACK
                    self._run_push_writers()
                turn.end()
            if self._hang_up:
                self.close()
                return

    def _step_aside(self, turn):
        """Let a short read's reader run (ciphermq/turns.py): first run the commands grouped so
        far, so no group outlasts a turn under the broker lock, then wait for its turn."""
        self._run_group()
        turn.step_aside()

    def _answer(self):
        """Send this read's replies, once the journal has them; False if the connection is over."""
        if self._must_sync and not self._sync():
            return False
        if self.chaos:
            self._chaos_pause()
        with self.send_lock:
            sent = self._flush_locked()
        self._write_due_pushes()
        return sent

    def finish(self):
        """Give back what the session held, stop the delivery thread (bounded), log the end."""
        requeued = self._give_back_held()
        self.close()
        if self._writer is not None:
            self._writer.join(self.config.write_timeout + 1.0)
        self.server.forget(self)
        log.info("Client disconnected: %s%s", self.peer,
                 " (%d unacked message(s) requeued)" % requeued if requeued else "")

    def _give_back_held(self):
        """close_session(), taking turns as a read does: a requeue of many messages runs in
        chunks (REQUEUE_CHUNK), and between two of them this thread steps aside for a short
        read (an interactive neighbour) once its turn is over, as between two commands."""
        return self.broker.close_session(self.session, turns.between_chunks(self.server.turns))

    def close(self):
        """Shut the socket down so both threads stop; safe to call twice, from any thread."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass                    # already closed or never connected

    def _open_transport(self):
        """Plain TCP, or the TLS handshake; a TLS client certificate may name the principal."""
        if self.server.tls_context is None:
            self.transport = PlainTransport(self.sock)
            self.send_lock = self.transport.send_lock
            return True
        try:
            self.transport = TlsTransport(self.sock, self.server.tls_context, server_side=True,
                                          handshake_timeout=self.config.auth_timeout,
                                          clock=self.clock)
        except (TransportError, OSError) as exc:
            log.info("Dropping %s: %s", self.peer, exc)
            return False
        self.send_lock = self.transport.send_lock
        if self.transport.tls_name and self.server.users is not None:
            self.principal = self.server.users.by_certificate(self.transport.tls_name)
            if self.principal is not None:
                log.info("%s authenticated as %s by its TLS certificate",
                         self.peer, self.principal.name)
        return True

    # -- reading ------------------------------------------------------------

    def _receive(self, framer):
        """The next bytes from the client; b"" when the connection is over or a deadline passed.

        The deadlines are checked against the clock on every pass -- when
        bytes arrive as well as at every read tick -- so a client cannot hold
        them off by pacing its bytes.
        """
        while True:
            try:
                data = self.transport.recv(whole_records=False)
            except BlockingIOError:     # a read tick, or TLS bytes that finish no record yet
                data = None
                if not self._long_tick and not self._deadline_pending(framer):
                    self._set_read_tick(long_tick=True)
            except OSError as exc:
                log.info("Connection from %s lost: %s", self.peer, exc)
                return b""
            if data == b"":
                return b""
            overdue = self._overdue(framer, bool(data))
            if overdue:
                log.info("Dropping %s: %s", self.peer, overdue)
                return b""
            if data:
                return data

    def _deadline_pending(self, framer):
        """True while a deadline may pass: not authenticated, mid-line, or an idle timeout."""
        return (self.principal is None or framer.in_line
                or self.config.idle_timeout is not None)

    def _set_read_tick(self, long_tick):
        """Make reads wait ``idle_read_tick`` (long) or ``read_tick``; the reader only."""
        self._long_tick = long_tick
        set_timeouts(self.sock, self.config.idle_read_tick if long_tick else self.config.read_tick,
                     self.config.write_timeout)

    def _overdue(self, framer, heard):
        """Which deadline has passed, if any (a reason for the log), else None.

        ``heard``: bytes have just arrived (so the client is not idle; they
        are checked against the login and line deadlines before they count).
        """
        now = self.clock()
        config = self.config
        if self.principal is None and now - self._connected_at > config.auth_timeout:
            return "not authenticated within %.0f s" % config.auth_timeout
        if framer.in_line and now - self._line_started > config.line_timeout:
            return "a line not finished within %.0f s" % config.line_timeout
        if heard:
            self._heard_at = now
        elif config.idle_timeout is not None and now - self._heard_at > config.idle_timeout:
            return "idle for %.0f s" % config.idle_timeout
        return None

    def _execute(self, line):
        """Run one command line; its reply (or ``Error: ...``) joins ``_replies``."""
        if self._hang_up:
            return                  # a refused client gets no further commands run
        if isinstance(line, protocol.LineTooLong):
            self._replies.append(protocol.error_reply(
                "line too long (max %d bytes)" % line.limit))
            return
        try:
            verb, args = protocol.split_command(line)
            if verb is None:
                return              # blank line
            if self.principal is None and verb != "auth":
                self._hang_up = True
                raise ProtocolError("authentication required: send 'auth <name> <token>' first")
            command = self.COMMANDS.get(verb)
            if command is None:
                raise ProtocolError("unknown command %s" % protocol.quote(verb.encode()))
            if command not in self.GROUPED:
                self._run_group()   # commands run, and are answered, in the order received
            command(self, args)
        except CipherMQError as exc:
            self._replies.append(protocol.error_reply(exc))
        if self.chaos and self.chaos.strikes("disconnect", "dropping connection %s" % self.peer):
            self.close()

    # -- grouping: publishes and acks of one read take the broker lock once ----

    def _add_to_group(self, kind, item):
        """Queue a parsed publish or ack; its reply slot is filled by _run_group."""
        if self._group_kind != kind:
            if self._group:
                self._run_group()
            self._group_kind = kind
        self._group.append((item, len(self._replies)))
        self._replies.append(b"")

    def _run_group(self):
        if not self._group:
            return
        kind, group = self._group_kind, self._group
        self._group_kind, self._group = None, []
        if kind == "publish":
            results, writers = self.broker.publish_many([item for item, _ in group])
            self._must_sync = True  # even a duplicate's first copy may not be on disk yet
            ids = [item[2] for item, _ in group]
        else:
            self._run_acks([item for item, _ in group], group)
            return
        self._fill_group_replies(kind, ids, group, results, writers)

    def _run_acks(self, ids, group):
        """Acknowledge a group, and write its replies before any push the acks made room for.

        ``ACK_CONFIRMED <id>`` precedes the next ``Message:`` on the wire: the
        delivery thread needs ``send_lock`` to write the new pushes, and this
        thread holds it from the acknowledgement until the replies are out.
        A client reading one line per ``recv`` relies on it (docs/PROTOCOL.md,
        "The document's original clients").  As in do_consume, earlier replies
        that need the disk wait for it first.
        """
        if not self._sync():
            return
        with self.send_lock:
            results, writers = self.broker.acknowledge_many(self.session, ids)
            self._fill_group_replies("ack", ids, group, results, writers)
            self._flush_locked()
        self._write_due_pushes()

    def _fill_group_replies(self, kind, ids, group, results, writers):
        if kind == "publish":
            reply, fault, what = protocol.ack_reply, "drop-ack", "ACK"
        else:
            reply, fault, what = protocol.ack_confirmed_reply, "drop-confirm", "ACK_CONFIRMED"
        self._push_writers.extend(writers)
        log_acks = kind == "ack" and log.isEnabledFor(logging.DEBUG)
        for message_id, (_, slot), result in zip(ids, group, results):
            if log_acks and result is True:
                log.debug("Message %s acknowledged", message_id)
            if isinstance(result, CipherMQError):
                self._replies[slot] = protocol.error_reply(result)
            elif not (self.chaos and self.chaos.strikes(
                    fault, "withholding %s for message %s" % (what, message_id))):
                self._replies[slot] = reply(message_id)

    # -- writing ------------------------------------------------------------

    def _sync(self):
        """Before replies that promise durability go out, wait for the journal.

        Returns False (and closes the connection, sending nothing) if the
        journal failed for good: an ACK must never be sent for a publish not
        on disk.  If a write failed (full disk, I/O error) every reply that
        promises the disk -- ``ACK``, declarations, bindings -- becomes
        ``Error: journal write failed: <reason>``; fetched messages and
        ``ACK_CONFIRMED`` still go out (see docs/RELIABILITY.md).
        """
        if not self._must_sync:
            return True
        self._must_sync = False
        try:
            self.broker.sync()
            return True
        except JournalWriteFailed as exc:   # the disk refused: what needed it becomes an Error
            refusal = protocol.error_reply(exc)
            self._replies = [refusal if reply.startswith(_NEEDS_THE_DISK) else reply
                             for reply in self._replies]
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
            self.transport.sendall(data)
            return True
        except BlockingIOError:
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
        while self.broker.wait_pushes(self.session, timeout=self.config.write_timeout):
            self._chaos_pause()
            with self.send_lock:
                batch = self.broker.take_pushes(self.session)
                if batch is None:
                    return
                if (batch or self.transport.backlog) and \
                        not self._send_locked(self._push_lines(batch)):
                    return
            self._write_due_pushes()

    def _push_lines(self, batch):
        """The ``Message:`` lines for a batch of deliveries (chaos may lose some)."""
        if self.chaos:
            kept = [delivery for delivery in batch if not self.chaos.strikes(
                "drop-delivery", "losing the push of message %s" % delivery[0])]
            if len(kept) < len(batch):      # send_lock -> broker.mutex: the documented order
                lost = {delivery[0] for delivery in batch} - {d[0] for d in kept}
                self.broker.lose_pushes(self.session, lost)
            batch = kept
        message_line = protocol.message_line
        return b"".join([message_line(*delivery) for delivery in batch])

    def _run_push_writers(self):
        writers, self._push_writers = self._push_writers, []
        for write_pushes in writers:
            write_pushes()

    def write_pushes(self):
        """Write this session's waiting pushes from the calling thread, never blocking.

        The callback this connection gave the broker (see the module
        docstring): called by the reader that just routed messages here,
        often another connection's.  If this connection is busy writing, the
        thread writing writes them after it (see the module docstring); if its
        socket cannot take everything at once, the delivery thread is called
        to finish the job.  (Chaos mode always leaves pushes to that thread.)
        """
        if self.chaos:
            self.broker.call_writer(self.session)
            return
        self._pushes_due = True
        self._write_due_pushes()
        if self._pushes_due and self.transport.reads_take_send_lock:
            # TLS: the holder may be the reader inside the transport, which
            # does not come back here; the delivery thread takes over.
            self.broker.call_writer(self.session)

    def _write_due_pushes(self):
        """Write the pushes write_pushes left, unless another thread holds ``send_lock``.

        Called by write_pushes and after every release of ``send_lock``: if the
        lock is taken, its holder calls this again once it has released it.
        Never blocks.  A socket that cannot take everything at once is left to
        the delivery thread.
        """
        while self._pushes_due and self.send_lock.acquire(blocking=False):
            try:
                self._pushes_due = False
                batch = self.broker.take_pushes(self.session)
                if batch and not self.transport.send_nowait(self._push_lines(batch)):
                    self.broker.call_writer(self.session)   # the socket is full: a blocking write
            except OSError as exc:
                log.info("Connection from %s lost: %s", self.peer, exc)
                self.close()
            finally:
                self.send_lock.release()

    # -- commands: each appends its reply to self._replies ------------------

    def do_auth(self, args):
        users = self.server.users
        if users is None:
            raise ProtocolError("authentication is not enabled on this broker")
        if self.principal is not None:
            raise ProtocolError("already authenticated as %s" % self.principal.name)
        self._hang_up = True        # one attempt per connection: any failure disconnects
        name, token = protocol.split_args(args, "auth <name> <token>", 2)
        guard, address = self.server.login_guard, self.client_address[0]
        if not guard.allowed(address):
            guard.failed(address, self.peer, refused=True)
            raise ProtocolError("too many failed logins from this address; try again later")
        principal = users.authenticate(name.decode("utf-8", "replace"),
                                       token.decode("utf-8", "replace"))
        if principal is None:
            guard.failed(address, self.peer)
            raise ProtocolError("authentication failed")
        self._hang_up = False
        self.principal = principal
        log.info("%s authenticated as %s", self.peer, principal.name)
        self._replies.append(protocol.AUTH_OK)

    def do_declare_queue(self, args):
        (name,) = protocol.split_args(args, "declare_queue <queue>", 1)
        self.principal.check_configure()
        self.broker.declare_queue(protocol.parse_name(name, "queue"))
        self._must_sync = True
        self._replies.append(protocol.QUEUE_DECLARED)

    def do_declare_exchange(self, args):
        words = protocol.split_args(
            args, "declare_exchange <exchange> [direct|fanout|topic]", 1, 2)
        name = protocol.parse_name(words[0], "exchange")
        kind = protocol.parse_exchange_type(words[1]) if len(words) > 1 else "direct"
        self.principal.check_configure()
        self.broker.declare_exchange(name, kind)
        self._must_sync = True
        self._replies.append(protocol.EXCHANGE_DECLARED)

    def do_bind(self, args):
        exchange, queue, key = protocol.split_args(
            args, "bind <exchange> <queue> <routing_key>", 3)
        self.principal.check_configure()
        self.broker.bind_queue(protocol.parse_name(exchange, "exchange"),
                         protocol.parse_name(queue, "queue"),
                         protocol.parse_routing_key(key, binding=True))
        self._must_sync = True
        self._replies.append(protocol.QUEUE_BOUND)

    def do_publish(self, args):
        publish = protocol.parse_publish(args, self.server.envelope_limits)
        # publish is (exchange, routing key, message id, body)
        self.principal.check_publish(publish[0])
        self._add_to_group("publish", publish)

    def do_consume(self, args):
        words = protocol.split_args(args, "consume <queue> [prefetch]", 1, 2)
        queue = protocol.parse_name(words[0], "queue")
        prefetch = (protocol.parse_prefetch(words[1]) if len(words) > 1
                    else self.config.default_prefetch)
        self.principal.check_consume(queue)
        self._start_delivery_thread()
        if not self._sync():        # earlier replies in this read may be ACKs
            return
        # The reply must reach the client before the first pushed message:
        # holding send_lock keeps the delivery thread from writing until then.
        with self.send_lock:
            self.broker.register_consumer(self.session, queue, prefetch)
            self._replies.append(protocol.SUBSCRIBED)
            self._flush_locked()
        self._write_due_pushes()

    def do_fetch(self, args):
        (raw_queue,) = protocol.split_args(args, "fetch <queue>", 1)
        queue = protocol.parse_name(raw_queue, "queue")
        self.principal.check_consume(queue)
        delivery = self.broker.consume(self.session, queue)
        self._replies.append(protocol.NO_MESSAGES if delivery is None
                             else protocol.message_line(*delivery))

    def do_ack(self, args):
        (raw_id,) = protocol.split_args(args, "ack <message_id>", 1)
        self._add_to_group("ack", protocol.parse_name(raw_id, "message id"))

    def do_nack(self, args):
        (raw_id,) = protocol.split_args(args, "nack <message_id>", 1)
        message_id = protocol.parse_name(raw_id, "message id")
        self.broker.nack(self.session, message_id)
        self._replies.append(protocol.nack_confirmed_reply(message_id))

    def do_reject(self, args):
        message_id, reason = protocol.parse_reject(args)
        self.broker.reject(self.session, message_id, reason)
        self._must_sync = True      # the move to <queue>.dead is journaled
        self._replies.append(protocol.reject_confirmed_reply(message_id))

    def do_stats(self, args):
        words = protocol.split_args(args, "stats [queue]", 0, 1)
        queue = protocol.parse_name(words[0], "queue") if words else None
        self.principal.check_configure()
        self._replies.append(protocol.stats_reply(self.broker.stats(queue)))

    def do_ping(self, args):
        protocol.split_args(args, "ping", 0)
        self._replies.append(protocol.PONG)

    # -- administration (ciphermq-admin); the admin right with --users ---------

    def do_purge(self, args):
        (raw_queue,) = protocol.split_args(args, "purge <queue>", 1)
        queue = protocol.parse_name(raw_queue, "queue")
        self.principal.check_admin()
        self._replies.append(protocol.purged_reply(self.broker.purge(queue)))
        self._must_sync = True

    def do_requeue_dead(self, args):
        (raw_queue,) = protocol.split_args(args, "requeue_dead <queue>", 1)
        queue = protocol.parse_name(raw_queue, "queue")
        self.principal.check_admin()
        self._replies.append(protocol.requeued_reply(self.broker.requeue_dead(queue)))
        self._must_sync = True

    def do_peek(self, args):
        words = protocol.split_args(args, "peek <queue> [n]", 1, 2)
        queue = protocol.parse_name(words[0], "queue")
        count = protocol.parse_peek_count(words[1]) if len(words) > 1 else protocol.DEFAULT_PEEK
        self.principal.check_admin()
        self._replies.append(protocol.peek_reply(queue, self.broker.peek(queue, count)))

    #: Commands queued and run as a group (see _run_group).
    GROUPED = (do_publish, do_ack)

    COMMANDS = {
        "auth": do_auth,
        "declare_queue": do_declare_queue,
        "declare_exchange": do_declare_exchange,
        "bind": do_bind,
        "publish": do_publish,
        "consume": do_consume,
        "fetch": do_fetch,
        "ack": do_ack,
        "nack": do_nack,
        "reject": do_reject,
        "stats": do_stats,
        "ping": do_ping,
        "purge": do_purge,
        "requeue_dead": do_requeue_dead,
        "peek": do_peek,
    }
