"""The broker: queues, exchanges, bindings and the life of every message.

All of this state is guarded by one lock, ``Broker.mutex``.  Nothing here
touches a socket: the server asks the broker what to send and sends it after
the lock is released.  Time comes from an injectable ``clock`` so the
redelivery rules can be tested without waiting.

A message copy in a queue is in one of two states::

    ready --push/consume--> in flight (held by one Session) --acknowledge--> gone
      ^                          |
      +---- nack, timeout, ------+----(given back max_deliveries times)----> <queue>.dead
            disconnect           |
                                 +----reject <id> [reason]----------------> <queue>.dead

A message is never dropped: it leaves the broker only by an ack.

Whatever is given back at once (a disconnect, a consumer timeout, many
overdue fetches) goes back REQUEUE_CHUNK messages per hold of the mutex,
newest first, each chunk at the front of its queue, so other threads' calls
run in between and the queue ends in the order one step would leave
(:class:`GiveBack`, :meth:`Broker._put_back_pending`).

An overdue delivery counts as given back only if its consumer has acked (or
nacked, rejected) a message delivered *after* it: it read past it.  A
consumer still busy with earlier messages is slow, and its overdue ones wait
for it.  One that has said nothing since the push (hung, stopped) is
*stalled*: its overdue messages move to another consumer with room, or
(pushed to it once more) wait for it, and it gets no new pushes.  A session
that holds messages and has said nothing for ``consumer_timeout`` is
disconnected through its ``hang_up`` callback, and what it held is requeued
-- that counts.  ``Message.returns`` counts only these real give-backs (nack,
disconnect, consumer timeout, the timeout of a pulled or skipped message);
``max_deliveries`` of them dead-letter a message.

Every message id is bound to its envelope for as long as the broker knows the
id: the same id with the same bytes is a duplicate, re-ACKed; with different
bytes it is refused.  An id is live while a copy is queued or in flight, then
acked within the dedup window, then forgotten: :mod:`ciphermq.ids` owns that
life (:class:`~ciphermq.ids.MessageIds`, ``Broker._ids``).

With a :class:`~ciphermq.journal.Journal` attached, every change that must
survive a crash is appended to it under the mutex (a memory append; the disk
write happens in the journal's own thread) and :meth:`Broker.sync` waits
until it is on disk.  In-flight state is not journaled: after a restart,
whatever was in flight is simply ready again.
"""
import collections
import itertools
import json
import logging
import threading
import time

from . import recovery
from .errors import BrokerError
from .ids import MessageIds
from .queues import DEAD_SUFFIX, Consumer, Delivery, GiveBack, Message, Queue, Session
from .routing import Exchange

log = logging.getLogger(__name__)

DEFAULT_EXCHANGE = "default_exchange"
DEFAULT_QUEUE = "default_queue"
DEFAULT_KEY = "default_key"
#: ``stats`` without a queue name lists at most this many queues (the totals cover all).
STATS_MAX_QUEUES = 100
#: What ``max_memory`` charges a queued copy besides its envelope bytes: the broker's own
#: objects for it (its Message, the id, its ``MessageIds.live`` entry and queue slot: about
#: 230 bytes for a published message, 90 for each further fanout copy, by tracemalloc).
#: Without it a flood of small envelopes held twice ``max_memory``
#: (tests/test_bounds.py::test_memory_bound_charges_what_a_queued_copy_really_costs).
COPY_OVERHEAD = 256
#: A mass give-back (a disconnect, a consumer timeout, many deliveries overdue at once)
#: puts back at most this many messages per hold of the mutex: a neighbour's command waits
#: for one chunk (about 0.1 ms), not for all of a connection's 10,000 (about 5 ms).
REQUEUE_CHUNK = 256


class Broker:
    """All queue state, and the rules that keep every message until it is acked.

    Thread-safe: every public method takes ``mutex`` itself, and only
    :meth:`wait_pushes` blocks.  The methods named in the design document
    (``declare_queue``, ``declare_exchange``, ``bind_queue``, ``publish``,
    ``register_consumer``, ``consume``, ``acknowledge``,
    ``retry_unacknowledged``) do its jobs; docs/ARCHITECTURE.md maps each.
    Methods never log while holding the lock; events worth a log line are
    collected and logged after release.
    """

    def __init__(self, *, redelivery_interval=30.0, max_deliveries=10,
                 max_queue_length=1_000_000, max_queues=10_000, max_exchanges=1_000,
                 max_bindings=10_000, max_memory=512 * 1024 * 1024, max_unacked=10_000,
                 dedup_window=3600.0, dedup_max_ids=1_000_000, clock=time.monotonic,
                 wall_clock=time.time, journal=None, consumer_timeout=300.0):
        self.redelivery_interval = redelivery_interval
        self.consumer_timeout = consumer_timeout
        self.max_deliveries = max_deliveries
        self.max_queue_length = max_queue_length
        self.max_queues = max_queues
        self.max_exchanges = max_exchanges
        self.max_bindings = max_bindings
        self.max_memory = max_memory    # bytes queued, every copy counted (COPY_OVERHEAD)
        self.max_unacked = max_unacked  # messages one session may hold unacked
        self.clock = clock
        self.wall_clock = wall_clock
        self.journal = journal
        #: The one broker lock.  Guards every attribute below, every Queue,
        #: Exchange, Consumer and Session, and ``_ids`` (a MessageIds, which
        #: takes no lock of its own).  Conditions sharing it: each
        #: Session.has_pushes.  Lock order: a connection's send_lock may be
        #: held while taking this mutex, never the other way round.
        self.mutex = threading.Lock()
        self._bindings = 0          # over all exchanges, for max_bindings
        self._declared = 0          # queues counted by max_queues (see _declare_queue)
        self._queued_bytes = 0      # envelope bytes + COPY_OVERHEAD of every copy not acked
        self._queues = {}
        self._exchanges = {}
        self._sessions = set()
        #: Every known message id: live, then acked in the dedup window (ciphermq/ids.py).
        self._ids = MessageIds(dedup_window, dedup_max_ids, clock)
        self._handovers = 0         # hand-overs made so far: each one's Delivery.seq
        self._new_pushes = []       # sessions whose pushes stopped being empty in this call
        #: GiveBacks too large for one hold, oldest first; the head is being put back a
        #: chunk at a time by the threads that gave them back (see _put_back_pending).
        self._giving_back = collections.deque()
        self.totals = dict.fromkeys(
            ("published", "duplicates", "delivered", "redelivered", "acked", "dead_lettered"), 0)

    # -- declarations -------------------------------------------------------

    def declare_queue(self, name):
        """Create queue ``name`` if it does not exist.  Idempotent."""
        with self.mutex:
            if (name not in self._queues and self._declared >= self.max_queues
                    and not self._is_dead_letter_of_existing(name)):
                raise BrokerError("too many queues (max %d)" % self.max_queues)
            self._declare_queue(name)

    def declare_exchange(self, name, kind="direct"):
        """Create exchange ``name``; redeclaring with another type is an error."""
        with self.mutex:
            exchange = self._exchanges.get(name)
            if exchange is None:
                if len(self._exchanges) >= self.max_exchanges:
                    raise BrokerError("too many exchanges (max %d)" % self.max_exchanges)
                self._exchanges[name] = Exchange(name, kind)
                self._record(recovery.exchange_record, name, kind)
            elif exchange.kind != kind:
                raise BrokerError("exchange '%s' already exists with type %s"
                                  % (name, exchange.kind))

    def bind_queue(self, exchange_name, queue_name, binding_key):
        """Bind a queue to an exchange; both must exist."""
        with self.mutex:
            exchange = self._exchange(exchange_name)
            queue = self._queue(queue_name)
            if self._bindings >= self.max_bindings and not exchange.is_bound(binding_key, queue):
                raise BrokerError("too many bindings (max %d)" % self.max_bindings)
            if exchange.bind(binding_key, queue):
                self._bindings += 1
                self._record(recovery.binding_record, exchange_name, queue_name, binding_key)

    def declare_defaults(self):
        """What the original server did at start, so the document's clients just work."""
        self.declare_exchange(DEFAULT_EXCHANGE, "direct")
        self.declare_queue(DEFAULT_QUEUE)
        self.bind_queue(DEFAULT_EXCHANGE, DEFAULT_QUEUE, DEFAULT_KEY)

    # -- publishing ---------------------------------------------------------

    def publish(self, exchange_name, routing_key, message_id, body):
        """Store a message in every queue it routes to.

        Returns True if stored, False if ``message_id`` was already accepted
        with the same envelope (queued, in flight, or acked within the dedup
        window): the caller answers ``ACK`` either way and the message is not
        stored twice.  Raises BrokerError if the exchange is unknown, nothing
        is bound for the key, a target queue is full, or the id was already
        used for a different envelope -- and then stores nothing.
        """
        with self.mutex:
            try:
                return self._publish(exchange_name, routing_key, message_id, body)
            finally:
                self._notify_writers()

    def publish_many(self, publishes):
        """Publish ``(exchange, routing_key, message_id, body)`` tuples under one lock hold.

        Returns ``(results, writers)``.  ``results`` has one entry per
        publish, in order: True (stored), False (duplicate) or the BrokerError
        that refused it.  A connection uses this for the publishes of one
        read, so N of them cost one lock round trip instead of N.

        ``writers`` are the ``write_pushes`` callbacks of the sessions that
        now have pushes waiting, whose delivery threads were *not* notified:
        the caller must call each (without any broker lock), when it is
        ready.  Writing pushes from the thread that is already running saves
        waking another thread per message.
        """
        results = []
        pending = []                # the queue whose dispatch is put off (see _publish)
        with self.mutex:
            for publish in publishes:
                try:
                    results.append(self._publish(*publish, pending))
                except BrokerError as exc:
                    results.append(_refusal(exc))
            if pending:
                self._dispatch(pending[0])
            return results, self._take_writers()

    def _publish(self, exchange_name, routing_key, message_id, body, pending=None):
        """publish() with the mutex held.

        With ``pending`` (a list of at most one queue, from publish_many), a
        run of publishes to the same queue is dispatched once, when the run
        ends: a queue with consumers becomes ``pending`` instead of being
        dispatched, and the queue it replaces is dispatched then.  That
        makes the same hand-overs, in the same order, as a dispatch after
        every publish: between two publishes of a run only that queue's
        ready list grew (test_a_batch_is_delivered_and_acked_exactly_as_one_at_a_time).
        """
        ids = self._ids             # a known id is tested here, inline: publish's hot path
        if message_id in ids.live or message_id in ids.acked_at:
            if not ids.bound_to_same(message_id, body):
                raise BrokerError("message_id %s already used for different content"
                                  % message_id)
            self.totals["duplicates"] += 1
            return False
        queues = self._exchange(exchange_name).route(routing_key)
        if not queues:
            raise BrokerError("unroutable: exchange '%s' has no queue bound for key '%s'"
                              % (exchange_name, routing_key))
        for queue in queues:
            if len(queue.ready) + queue.unacked >= self.max_queue_length:
                raise BrokerError("queue '%s' is full" % queue.name)
        if self.journal is not None:
            self.journal.check_writable()   # a disk refusing writes refuses publishes up front
        cost = (len(body) + COPY_OVERHEAD) * len(queues)   # fanout copies share bytes: count each
        if self._queued_bytes + cost > self.max_memory:
            raise BrokerError("broker memory limit reached")
        self._queued_bytes += cost
        ids.bind(message_id, body, len(queues))
        self.totals["published"] += 1
        if self.journal is not None:
            self.journal.append(recovery.publish_record(
                message_id, [queue.name for queue in queues], body))
        for queue in queues:
            queue.ready.append(Message(message_id, body, queue))
            if queue.consumers:
                if pending is None:
                    self._dispatch(queue)
                elif not pending:
                    pending.append(queue)
                elif pending[0] is not queue:
                    self._dispatch(pending[0])
                    pending[0] = queue
        return True

    # -- consuming ----------------------------------------------------------

    def open_session(self, name, write_pushes=None, hang_up=None):
        """A new Session for a connection, with its callbacks (see Session)."""
        with self.mutex:
            session = Session(name, self.mutex, write_pushes, hang_up, self.clock())
            self._sessions.add(session)
            return session

    def register_consumer(self, session, queue_name, prefetch):
        """Make ``session`` a push consumer of a queue (again: update its prefetch).

        Ready messages are handed over at once, up to the prefetch; the
        delivery thread is notified to write them.
        """
        with self.mutex:
            queue = self._queue(queue_name)
            consumer = session.consumers.get(queue_name)
            if consumer is None:
                consumer = Consumer(session, queue, prefetch)
                session.consumers[queue_name] = consumer
                queue.consumers.append(consumer)
            consumer.prefetch = prefetch
            self._heard(session)
            self._dispatch(queue)
            self._notify_writers()

    def consume(self, session, queue_name):
        """Pull mode: take one ready message, ``(id, body, delivery_count)``, or None.

        (The wire command is ``fetch``; the wire's ``consume`` is
        :meth:`register_consumer`.)

        The message is in flight to ``session`` exactly as if it had been
        pushed: it must be acked, and comes back if it is not.  Raises
        BrokerError when the session already holds ``max_unacked`` messages.

        O(1) under the lock in the usual case (the head of the queue); a
        message whose id the session already holds (a copy from another
        queue) is skipped, so the scan is at most ``max_unacked`` long.
        """
        with self.mutex:
            queue = self._queue(queue_name)
            self._heard(session)
            held = session.held
            if len(held) >= self.max_unacked:
                raise BrokerError("too many unacked messages on this connection (max %d)"
                                  % self.max_unacked)
            ready = queue.ready
            if ready and ready[0].id not in held:
                message = ready.popleft()
            else:
                for position, message in enumerate(ready):
                    if message.id not in held:
                        del ready[position]
                        break
                else:
                    return None
            self._hand_over(message, session, None)
            return message.id, _delivered_body(message), message.deliveries

    def wait_pushes(self, session, timeout=None):
        """Block until ``session`` has pushes waiting or its writer was called; False once closed.

        Also returns (True) when ``timeout`` seconds pass, so callers re-check.
        """
        with self.mutex:
            session.has_pushes.wait_for(
                lambda: session.pushes or session.writer_called or session.closed, timeout)
            session.writer_called = False
            return not session.closed

    def take_pushes(self, session):
        """Take every waiting push: a list of ``(message_id, body, delivery_count)``.

        Does not block; None once the session is closed.
        """
        with self.mutex:
            if session.closed:
                return None
            batch, session.pushes = session.pushes, []
            return batch

    def lose_pushes(self, session, message_ids):
        """Chaos mode dropped these pushes on purpose: when they fall due they are redelivered
        as any unacked delivery is, not treated as waiting at a stalled consumer."""
        with self.mutex:
            for message_id in message_ids:
                delivery = session.held.get(message_id)
                if delivery is not None:
                    delivery.push_lost = True

    def call_writer(self, session):
        """Make the session's delivery thread look at its pushes (and its connection's backlog)."""
        with self.mutex:
            session.writer_called = True
            session.has_pushes.notify()

    def acknowledge(self, session, message_id):
        """Acknowledge a message delivered to ``session``; it is then gone for good.

        Returns True for a first ack, False for a repeated ack of a message
        already acknowledged (confirmed again, nothing changes).  Raises
        BrokerError for a message this session does not hold.
        """
        with self.mutex:
            self._heard(session)
            try:
                return self._acknowledge(session, message_id)
            finally:
                self._notify_writers()

    def acknowledge_many(self, session, message_ids):
        """Acknowledge several messages under one lock hold.

        Returns ``(results, writers)`` as :meth:`publish_many` does; each
        result is True, False or the BrokerError, as acknowledge() would give.
        """
        results = []
        with self.mutex:
            self._heard(session)
            for message_id in message_ids:
                try:
                    results.append(self._acknowledge(session, message_id))
                except BrokerError as exc:
                    results.append(_refusal(exc))
            return results, self._take_writers()

    def _acknowledge(self, session, message_id):
        """acknowledge() with the mutex held."""
        was_full = len(session.held) >= self.max_unacked
        delivery = session.held.pop(message_id, None)
        if delivery is None:
            if message_id in self._ids.acked_at:
                return False
            raise BrokerError("message '%s' is not delivered to this connection" % message_id)
        if delivery.seq > session.progress:
            session.progress = delivery.seq
        self._release(delivery)
        message = delivery.message
        self._forget_copy(message)
        self.totals["acked"] += 1
        self._dispatch(message.queue)
        if was_full:
            self._dispatch_consumers_of(session)
        if self.journal is not None and self.journal.wants_compaction(self._ids.live_bytes):
            self.journal.request_compaction()
        return True

    def nack(self, session, message_id):
        """Give a message back now, for redelivery (or the dead-letter queue)."""
        with self.mutex:
            was_full = len(session.held) >= self.max_unacked
            self._heard(session)
            delivery = session.held.pop(message_id, None)
            if delivery is None:
                raise BrokerError("message '%s' is not delivered to this connection"
                                  % message_id)
            session.progress = max(session.progress, delivery.seq)
            events = []
            self._requeue([delivery], events, "nacked")
            if was_full:
                self._dispatch_consumers_of(session)
            self._notify_writers()
        _log_events(events)

    def close_session(self, session, between_chunks=None):
        """Forget a connection: everything it held goes back to its queues; how many.

        Blocks until all of it is back.  More than REQUEUE_CHUNK messages go back a
        chunk per hold of the mutex, so other threads' calls run between two chunks;
        ``between_chunks``, if given, is called there, without the mutex (the server
        steps aside for a short read: ciphermq/turns.py).
        """
        events = []
        with self.mutex:
            held, give_back = self._close(session, events, "connection closed")
            self._notify_writers()
        _log_events(events)
        self._put_back_pending(give_back, between_chunks)
        return held

    # -- refusing (basic.reject without requeue) --------------------------------

    def reject(self, session, message_id, reason):
        """Move a message this session holds straight to ``<queue>.dead``, with ``reason``.

        The consumer refuses it for good (stale, tampered, unsigned...): it is
        not redelivered, and it is not dropped -- an operator can read
        ``<queue>.dead``.  Raises BrokerError for a message this session does
        not hold, or one already in a dead-letter queue (ack it to drop it).
        """
        events = []
        with self.mutex:
            self._heard(session)
            delivery = session.held.get(message_id)
            if delivery is None:
                raise BrokerError("message '%s' is not delivered to this connection"
                                  % message_id)
            message = delivery.message
            if message.queue.is_dead_letter_queue:
                raise BrokerError("message '%s' is already in %s: ack it to drop it"
                                  % (message_id, message.queue.name))
            del session.held[message_id]
            session.progress = max(session.progress, delivery.seq)
            self._release(delivery)
            dead = self._dead_letter(message, "rejected: %s" % reason, events)
            self._dispatch(message.queue)
            self._dispatch(dead)
            self._notify_writers()
        _log_events(events)

    # -- administration (ciphermq-admin) -------------------------------------------

    def purge(self, queue_name):
        """Drop every *ready* message of a queue; return how many were dropped.

        Messages in flight stay with their consumers (an ack still settles
        them).  A purged id is settled like an acked one: it enters the dedup
        window, so a sender's late retry does not bring it back.  One journal
        record; the lock is held for O(purged) work.
        """
        with self.mutex:
            queue = self._queue(queue_name)
            if self.journal is not None:
                self.journal.check_writable()   # a disk refusing writes refuses it up front
            purged, queue.ready = list(queue.ready), collections.deque()
            for message in purged:
                self._forget_copy(message, journal=False)
            if purged and self.journal is not None:
                self.journal.append(recovery.purge_record(
                    queue.name, [m.id for m in purged], int(self.wall_clock() * 1000)))
            return len(purged)

    def requeue_dead(self, queue_name):
        """Move the ready messages of ``<queue>.dead`` back to the end of ``<queue>``.

        Their delivery counts start again from 0, so each gets
        ``max_deliveries`` new chances.  Returns how many moved.  One journal
        record; the lock is held for O(moved) work.
        """
        with self.mutex:
            if queue_name.endswith(DEAD_SUFFIX):
                raise BrokerError("'%s' is a dead-letter queue: name the queue it belongs to"
                                  % queue_name)
            queue = self._queue(queue_name)
            dead = self._queue(queue_name + DEAD_SUFFIX)
            if self.journal is not None:
                self.journal.check_writable()
            moved, dead.ready = list(dead.ready), collections.deque()
            for message in moved:
                queue.ready.append(Message(message.id, message.body, queue))
            if moved:
                self._record(recovery.requeue_record, dead.name, queue.name,
                             [m.id for m in moved])
                self._dispatch(queue)
            self._notify_writers()
            return len(moved)

    def peek(self, queue_name, count):
        """The first ``count`` ready messages of a queue as ``(id, size, delivery_count)``.

        Sizes are envelope bytes; contents never leave the broker this way.
        Changes nothing.
        """
        with self.mutex:
            queue = self._queue(queue_name)
            return [(m.id, len(m.body), m.deliveries)
                    for m in itertools.islice(queue.ready, count)]

    # -- the timer's work ---------------------------------------------------

    def retry_unacknowledged(self, now=None, between_chunks=None):
        """Take back deliveries unacked past their deadline, for redelivery; forget old acked ids.

        Called by the redelivery thread.  Returns the clock time at which
        it should be called again.  Blocks until all it took back is back in
        its queues; a give-back of more than REQUEUE_CHUNK messages goes back
        a chunk per hold, ``between_chunks`` (if given) called between two,
        without the mutex (see close_session).

        A delivery overdue at a session that has said nothing since it was
        made is not counted as failed and not pushed again and again (see the
        module docstring: stalled consumers); a session that holds messages
        and has been silent for ``consumer_timeout`` is closed, and its
        ``hang_up`` callback called (after the lock is released).
        """
        events, hang_ups, give_backs = [], [], []
        with self.mutex:
            now = self.clock() if now is None else now
            next_due = now + self.redelivery_interval
            for session in list(self._sessions):
                if not session.held:
                    continue
                silent_since = max(session.heard_at,
                                   min(d.handed_at for d in session.held.values()))
                if self.consumer_timeout and now - silent_since >= self.consumer_timeout:
                    hang_ups.append(session.hang_up)
                    events.append((logging.WARNING, "Consumer %s acked nothing for %.0f s: "
                                   "disconnecting it, its messages requeued",
                                   (session.name, self.consumer_timeout)))
                    give_backs.append(self._close(session, events, "consumer timeout")[1])
                    continue
                if self.consumer_timeout:
                    next_due = min(next_due, silent_since + self.consumer_timeout)
                next_due = min(next_due, self._take_back_overdue(session, now, silent_since,
                                                                 events, give_backs))
            self._ids.expire(now)
            self._notify_writers()
        _log_events(events)
        for give_back in give_backs:
            self._put_back_pending(give_back, between_chunks)
        for hang_up in hang_ups:
            if hang_up is not None:
                hang_up()
        return next_due

    def _take_back_overdue(self, session, now, silent_since, events, give_backs):
        """retry_unacknowledged() for one session, with the mutex held; its next due time.

        Pulled, lost or skipped deliveries are given back (and counted); a
        slow consumer's get more time; a silent one's wait, uncounted.  A
        give-back too large for one hold is added to ``give_backs``.
        """
        next_due = now + self.redelivery_interval
        given_back, waiting = [], 0
        for delivery in list(session.held.values()):
            if delivery.deadline > now:
                next_due = min(next_due, delivery.deadline)
            elif delivery.consumer is None or delivery.push_lost or \
                    session.progress > delivery.seq:
                del session.held[delivery.message.id]   # pulled, lost, or skipped: counted
                given_back.append(delivery)
            elif session.heard_at > delivery.handed_at:
                delivery.deadline = now + self.redelivery_interval  # slow: not there yet
                next_due = min(next_due, delivery.deadline)
            else:
                session.stalled = True
                current = self._unstick(session, delivery, now, events)
                if current is delivery:
                    waiting += 1
                next_due = min(next_due, current.deadline)
        if waiting:
            events.append((logging.INFO, "Consumer %s stalled (silent for %.1f s): "
                           "%d overdue message(s) wait for it, not counted as failed "
                           "deliveries", (session.name, now - silent_since, waiting)))
        give_backs.append(self._give_back(given_back, events, "not acked in time"))
        return next_due

    # -- durability -----------------------------------------------------------

    def sync(self, timeout=None):
        """Block until every change made so far is on disk (no-op without a journal).

        Returns False on timeout; raises JournalError if the journal failed.
        Must not be called with the mutex held.
        """
        if self.journal is None:
            return True
        return self.journal.sync(timeout)

    def restore(self, state):
        """Rebuild queues, bindings, ready messages and the dedup window from a journal.

        Called once, before any client connects.  Messages that were in flight
        when the journal was written are ready again, in their original order.
        """
        with self.mutex:
            journal, self.journal = self.journal, None      # replaying is not news
            try:
                for name in state.queues:
                    self._declare_queue(name)
                for name, kind in state.exchanges.items():
                    self._exchanges.setdefault(name, Exchange(name, kind))
                for exchange, queue, key in state.bindings:
                    if exchange in self._exchanges and queue in self._queues:
                        self._bindings += self._exchanges[exchange].bind(key, self._queues[queue])
                for message_id, (body, names) in state.live.items():
                    self._ids.bind(message_id, body, len(names))
                    self._queued_bytes += (len(body) + COPY_OVERHEAD) * len(names)
                    for name in names:
                        queue = self._declare_queue(name)
                        reason = state.reasons.get(message_id) \
                            if queue.is_dead_letter_queue else None
                        queue.ready.append(Message(message_id, body, queue, reason))
                self._ids.restore_acked(state.acked, state.acked_digests,
                                        self.clock(), self.wall_clock() * 1000)
            finally:
                self.journal = journal
            return len(state.live)

    def snapshot_to_journal(self):
        """Journal compaction callback: hand the journal a snapshot and a cut, atomically."""
        with self.mutex:
            state = recovery.RecoveredState()
            for name in self._queues:
                state.queues[name] = None
            for name, exchange in self._exchanges.items():
                state.exchanges[name] = exchange.kind
                for key, queue in exchange.bindings():
                    state.bindings.append((name, queue.name, key))
            in_flight = [delivery.message for session in self._sessions
                         for delivery in session.held.values()]
            in_flight += [delivery.message for give_back in self._giving_back
                          for delivery in give_back.deliveries]
            for message in in_flight + [m for q in self._queues.values() for m in q.ready]:
                entry = state.live.setdefault(message.id, (message.body, []))
                entry[1].append(message.queue.name)
                if message.reason is not None:
                    state.reasons[message.id] = message.reason
            self._ids.snapshot_acked(state, self.clock(), int(self.wall_clock() * 1000))
            self.journal.cut(recovery.snapshot_records(state))

    # -- reading ------------------------------------------------------------

    def stats(self, queue_name=None, limit=STATS_MAX_QUEUES):
        """A snapshot: ready/unacked/consumers of some queues, running totals, memory.

        ``queues`` holds ``queue_name`` alone if given (empty if unknown),
        else the first ``limit`` queues in declaration order; ``queue_count``
        says how many exist.  The work under the lock is O(limit), not
        O(queues): a broker with many queues answers as fast as one with few.
        """
        with self.mutex:        # copy plain tuples; the dicts are built after release
            if queue_name is not None:
                queue = self._queues.get(queue_name)
                chosen = [] if queue is None else [queue]
            else:
                chosen = itertools.islice(self._queues.values(), limit)
            rows = [(q.name, len(q.ready), q.unacked, len(q.consumers)) for q in chosen]
            queue_count, totals = len(self._queues), dict(self.totals)
            queued_bytes = self._queued_bytes
        return {
            "queues": {name: {"ready": ready, "unacked": unacked, "consumers": consumers}
                       for name, ready, unacked, consumers in rows},
            "queue_count": queue_count,
            "totals": totals,
            "memory": {"queued_bytes": queued_bytes, "max_memory": self.max_memory},
        }

    # -- internals: only called with the mutex held ----------------------------

    def _declare_queue(self, name):
        """Create a queue.  Every queue counts towards ``max_queues`` except the
        dead-letter queue of a counted queue (at most one each), so the broker
        never holds more than twice ``max_queues`` queues."""
        queue = self._queues.get(name)
        if queue is None:
            if not self._is_dead_letter_of_existing(name):
                self._declared += 1
            queue = self._queues[name] = Queue(name)
            self._record(recovery.queue_record, name)
        return queue

    def _is_dead_letter_of_existing(self, name):
        parent = name[:-len(DEAD_SUFFIX)] if name.endswith(DEAD_SUFFIX) else None
        return parent in self._queues and not parent.endswith(DEAD_SUFFIX)

    def _record(self, make_record, *args):
        """Append a journal record, if there is a journal."""
        if self.journal is not None:
            self.journal.append(make_record(*args))

    def _queue(self, name):
        queue = self._queues.get(name)
        if queue is None:
            # A queue's dead-letter queue exists as soon as the queue does,
            # so a rescuer can subscribe before anything has died.
            parent = name[:-len(DEAD_SUFFIX)] if name.endswith(DEAD_SUFFIX) else None
            if parent not in self._queues or parent.endswith(DEAD_SUFFIX):
                raise BrokerError("unknown queue '%s'" % name)
            queue = self._declare_queue(name)
        return queue

    def _exchange(self, name):
        exchange = self._exchanges.get(name)
        if exchange is None:
            raise BrokerError("unknown exchange '%s'" % name)
        return exchange

    def _heard(self, session):
        """The session spoke (ack, nack, reject, fetch, consume): it is not stalled."""
        session.heard_at = self.clock()
        session.stalled = False

    def _close(self, session, events, reason):
        """close_session()'s work: ``(how many it held, a GiveBack still to put back or None)``.

        From here on the session holds nothing: an ack of one of its messages is refused,
        whether or not the message is back in its queue yet.
        """
        if session.closed:
            return 0, None
        session.closed = True
        self._sessions.discard(session)
        for consumer in session.consumers.values():
            consumer.queue.consumers.remove(consumer)
        held = list(session.held.values())
        count = len(held)
        session.held.clear()
        session.pushes = []
        give_back = self._give_back(held, events, reason)     # consumes ``held``
        session.has_pushes.notify_all()
        return count, give_back

    def _unstick(self, session, delivery, now, events):
        """An overdue push to a stalled session: to another consumer, pushed once more, or wait.

        None of these counts as a failed delivery: the consumer never said it
        could not take the message.  Returns the message's delivery after
        this: ``delivery`` itself if it waits, else the new hand-over.
        """
        message = delivery.message
        other = next((c for c in message.queue.consumers
                      if c.session is not session and not c.session.stalled and c.has_room()
                      and message.id not in c.session.held), None)
        if other is None and delivery.pushed_again:
            delivery.deadline = now + self.redelivery_interval   # wait for it
            return delivery
        del session.held[message.id]
        self._release(delivery)
        if other is not None:
            events.append((logging.INFO, "Message %s moved from stalled consumer %s to %s",
                           (message.id, session.name, other.session.name)))
            return self._hand_over(message, other.session, other)
        again = self._hand_over(message, session, delivery.consumer)
        again.pushed_again = True           # in case the push itself was lost (chaos)
        again.handed_at = delivery.handed_at    # the consumer timeout runs from the first push
        return again

    def _dispatch(self, queue):
        """Hand ready messages to consumers with room, round robin."""
        consumers = queue.consumers
        ready = queue.ready
        while ready and consumers:
            message = ready[0]
            count = len(consumers)
            for _ in range(count):
                consumer = consumers[queue.next_consumer % count]
                queue.next_consumer = (queue.next_consumer + 1) % count
                held = consumer.session.held
                if (consumer.has_room() and not consumer.session.stalled
                        and len(held) < self.max_unacked and message.id not in held):
                    break
            else:
                return              # nobody has room (or every session holds this id)
            ready.popleft()
            self._hand_over(message, consumer.session, consumer)

    def _dispatch_consumers_of(self, session):
        """The session has room again under max_unacked: serve every queue it consumes."""
        for consumer in list(session.consumers.values()):
            self._dispatch(consumer.queue)

    def _hand_over(self, message, session, consumer):
        """Put a message (out of its queue's ready) in flight to ``session``; its Delivery."""
        message.deliveries += 1
        self._handovers += 1
        handed_at = self.clock()
        delivery = Delivery(message, consumer, handed_at, handed_at + self.redelivery_interval,
                            self._handovers)
        session.held[message.id] = delivery
        message.queue.unacked += 1
        self.totals["delivered"] += 1
        if message.deliveries > 1:
            self.totals["redelivered"] += 1
        if consumer is not None:
            consumer.in_flight += 1
            if not session.pushes:
                self._new_pushes.append(session)
            session.pushes.append((message.id, _delivered_body(message), message.deliveries))
        return delivery

    def _notify_writers(self):
        """Leave the pushes made by this call to their sessions' delivery threads."""
        for session in self._new_pushes:
            session.has_pushes.notify()
        self._new_pushes = []

    def _take_writers(self):
        """The write_pushes callbacks for the pushes made by this call (see publish_many)."""
        sessions, self._new_pushes = self._new_pushes, []
        return [session.write_pushes for session in sessions]

    def _release(self, delivery):
        """End a delivery (already out of its session's held): its consumer has room again."""
        delivery.message.queue.unacked -= 1
        if delivery.consumer is not None:
            delivery.consumer.in_flight -= 1

    def _requeue(self, deliveries, events, reason):
        """Return in-flight messages to the front of their queues, oldest first, in this hold.

        A message that has used up its deliveries goes to ``<queue>.dead``
        instead (a dead-letter queue never dead-letters again).  Adds at
        most two log events however many messages there are: one summary
        line per kind, naming the first message and the count.
        """
        if not deliveries:
            return
        give_back = GiveBack(deliveries, reason)
        self._put_back(give_back, len(deliveries))
        give_back.summarise(events)

    def _give_back(self, deliveries, events, reason):
        """_requeue() now if they fit in one chunk; else a GiveBack queued in _giving_back.

        The caller must call _put_back_pending() with what this returns (None: nothing
        left to do) once it has released the mutex.  While give-backs are pending,
        messages given back later in one chunk (a nack, a small disconnect) are put at
        the front at once; the pending ones then go in front of them.
        """
        if len(deliveries) <= REQUEUE_CHUNK:
            self._requeue(deliveries, events, reason)
            return None
        give_back = GiveBack(deliveries, reason)
        self._giving_back.append(give_back)
        return give_back

    def _put_back_pending(self, give_back, between_chunks=None):
        """Put back pending give-backs, oldest first, a chunk per hold, until ``give_back``'s
        last message is back.  Called without the mutex; blocks until then.

        Every thread that queued a give-back works here, on the oldest one, so they are
        put back in the order they were given, and each caller returns only when its own
        is done.  ``between_chunks`` is called between two holds.
        """
        if give_back is None:
            return
        while True:
            events = []
            with self.mutex:
                if give_back.deliveries:
                    head = self._giving_back[0]
                    self._put_back(head, REQUEUE_CHUNK)
                    if not head.deliveries:
                        self._giving_back.popleft()
                        head.summarise(events)
                    self._notify_writers()
                done = not give_back.deliveries
            _log_events(events)
            if done:
                return
            if between_chunks is not None:
                between_chunks()

    def _put_back(self, give_back, count):
        """Put the newest ``count`` deliveries of ``give_back`` back at the front of their
        queues (or in ``<queue>.dead``) and serve those queues' consumers."""
        deliveries = give_back.deliveries
        chunk = deliveries[-count:]
        del deliveries[-count:]
        touched = []
        for delivery in reversed(chunk):
            self._release(delivery)
            message = delivery.message
            message.returns += 1
            queue = message.queue
            if message.returns >= self.max_deliveries and not queue.is_dead_letter_queue:
                dead = self._dead_letter(message, "given back %d times" % message.returns)
                give_back.dead_lettered += 1
                give_back.first_dead = (message.id, dead.name, message.returns)
                touched.append(dead)
            else:
                queue.ready.appendleft(message)
                give_back.requeued += 1
                give_back.first_requeued = (message.id, queue.name)
            if queue not in touched:
                touched.append(queue)
        for queue in touched:
            self._dispatch(queue)

    def _dead_letter(self, message, reason, events=None):
        """Put a copy (already out of any session) in ``<queue>.dead``; returns that queue.

        With ``events``, adds a log line for it; without, the caller summarises.
        """
        queue = message.queue
        dead = self._declare_queue(queue.name + DEAD_SUFFIX)
        dead.ready.append(Message(message.id, message.body, dead, reason))
        self._record(recovery.dead_letter_record, message.id, queue.name, dead.name, reason)
        self.totals["dead_lettered"] += 1
        if events is not None:
            events.append((logging.WARNING, "Message %s dead-lettered to %s (%s)",
                           (message.id, dead.name, reason)))
        return dead

    def _forget_copy(self, message, journal=True):
        """One copy acked (or purged): its id moves on (MessageIds.settle_copy), its
        ack is journaled with the digest the id stays bound to, its bytes are freed."""
        message_id = message.id
        digest = self._ids.settle_copy(message_id, message.body)
        if journal and self.journal is not None:
            self.journal.append(recovery.ack_record(message_id, message.queue.name,
                                                    int(self.wall_clock() * 1000), digest))
        self._queued_bytes -= len(message.body) + COPY_OVERHEAD


def _refusal(exc):
    """A caught BrokerError to return as a result, without its traceback.

    The traceback holds this call's frame, whose ``results`` holds the error: a
    reference cycle that kept the whole batch (every refused 32 KiB envelope
    of a pipelined write) alive until the cyclic garbage collector ran, and
    made that collector run often and long under a publisher refused at
    ``max_memory`` (docs/SECURITY.md, "Hostile neighbours").  Without it the
    batch is freed when the caller lets go of the results.
    """
    return exc.with_traceback(None)


def _delivered_body(message):
    """The envelope as delivered: a dead-lettered copy carries ``"dead_reason"``."""
    if message.reason is None:
        return message.body
    return b"%s, \"dead_reason\": %s}" % (message.body[:-1],
                                           json.dumps(message.reason).encode("ascii"))


def _log_events(events):
    for level, text, args in events:
        log.log(level, text, *args)
