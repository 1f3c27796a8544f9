"""What the broker's state is made of: queues of messages, and the sessions holding them.

Plain records, no rules: :mod:`ciphermq.broker` decides every move.  A copy
of a message waits in its :class:`Queue` as a :class:`Message`; handed to a
session it is a :class:`Delivery` in that :class:`Session`'s ``held`` (pushed
through a :class:`Consumer`, or pulled); many given back at once travel
together as a :class:`GiveBack`.  Where a copy sits is its state.

None of them takes a lock: all are guarded by ``Broker.mutex`` (documented
where it is made, in ``Broker.__init__``), and a Session's ``has_pushes``
Condition shares that mutex.
"""
import collections
import logging
import threading

DEAD_SUFFIX = ".dead"


class Message:
    """One copy of a message in one queue.

    Only what a copy keeps while it waits in its queue: a broker with a long
    backlog holds one of these per queued copy (80 bytes on 64-bit CPython
    3.11).  While it is in flight, its hand-over is a :class:`Delivery`.
    """

    __slots__ = ("id", "body", "queue", "deliveries", "returns", "reason")

    def __init__(self, message_id, body, queue, reason=None):
        self.id = message_id
        self.body = body            # the envelope JSON as bytes, shared by all copies
        self.queue = queue
        self.deliveries = 0         # times pushed to a consumer or pulled by consume()
        self.returns = 0            # times given back: nack, disconnect, timeouts (see module)
        self.reason = reason        # why it is in a dead-letter queue (None elsewhere)


class Delivery:
    """One hand-over of a message to a session, from push or fetch to ack or give-back.

    ``Session.held`` maps each id it holds to one of these; a message given
    back and handed over again gets a new one.
    """

    __slots__ = ("message", "consumer", "handed_at", "deadline", "seq", "pushed_again",
                 "push_lost")

    def __init__(self, message, consumer, handed_at, deadline, seq):
        self.message = message
        self.consumer = consumer    # the Consumer it was pushed to (None when pulled)
        self.handed_at = handed_at  # clock() of the hand-over
        self.deadline = deadline    # when it is taken back if still unacked
        self.seq = seq              # the broker's hand-over count at this hand-over
        self.pushed_again = False   # already pushed once more to this stalled consumer
        self.push_lost = False      # chaos mode lost its push: a timeout is a plain redelivery


class GiveBack:
    """Deliveries given back together, not yet all back in their queues.

    ``deliveries`` is oldest first; they are put back from its end, newest first, each
    at the front of its queue, so once all are back they are at the front oldest first,
    exactly as if put back in one step (``Broker._put_back``).  One that is given
    back while others wait in ``Broker._giving_back`` is there until a chunk takes it:
    it belongs to no session (nobody can ack it), is not ready (nobody is handed it),
    still counts as unacked in its queue, and is in the journal's snapshots as in flight.
    """

    __slots__ = ("deliveries", "reason", "requeued", "dead_lettered", "first_requeued",
                 "first_dead")

    def __init__(self, deliveries, reason):
        self.deliveries = deliveries
        self.reason = reason            # for the summary line: "connection closed", ...
        self.requeued = self.dead_lettered = 0
        self.first_requeued = None      # (id, queue) of the oldest put back so far
        self.first_dead = None          # (id, dead queue, returns) likewise

    def summarise(self, events):
        """At most two log events for the whole give-back, however many messages."""
        if self.dead_lettered:
            events.append((logging.WARNING, "%d message(s) dead-lettered (first: %s to %s, "
                           "given back %d times)", (self.dead_lettered,) + self.first_dead))
        if self.requeued:
            events.append((logging.INFO, "%d message(s) requeued for redelivery (%s; "
                           "first: %s to %s)", (self.requeued, self.reason)
                           + self.first_requeued))


class Queue:
    """A FIFO of ready messages plus the consumers competing for them."""

    __slots__ = ("name", "ready", "unacked", "consumers", "next_consumer")

    def __init__(self, name):
        self.name = name
        self.ready = collections.deque()
        self.unacked = 0            # copies delivered and not yet acked (in some Session.held)
        self.consumers = []
        self.next_consumer = 0      # round-robin position

    def __len__(self):
        return len(self.ready) + self.unacked

    @property
    def is_dead_letter_queue(self):
        return self.name.endswith(DEAD_SUFFIX)


class Consumer:
    """One ``consume`` subscription: a session's claim on one queue."""

    __slots__ = ("session", "queue", "prefetch", "in_flight")

    def __init__(self, session, queue, prefetch):
        self.session = session
        self.queue = queue
        self.prefetch = prefetch    # 0 = unlimited
        self.in_flight = 0

    def has_room(self):
        return self.prefetch == 0 or self.in_flight < self.prefetch


class Session:
    """The broker's view of one client connection.

    ``pushes`` holds deliveries decided under the broker mutex but not yet
    written.  They are written after the lock is released, in one of two ways:

    * at once, by the thread that caused them, through ``write_pushes`` -- the
      callback the connection gave ``Broker.open_session`` (see
      ``Broker.publish_many``);
    * by the connection's delivery thread, which waits on ``has_pushes``: a
      Condition on the broker mutex, notified when ``pushes`` stops being
      empty, when ``Broker.call_writer`` asks for the thread, or when the
      session closes.
    """

    def __init__(self, name, mutex, write_pushes=None, hang_up=None, now=0.0):
        self.name = name
        #: The connection's callback: write ``pushes`` now, never blocking.
        #: Called without any broker lock, by whoever made pushes.
        self.write_pushes = write_pushes
        #: The connection's callback to close it (consumer timeout); called
        #: without any broker lock, by the redelivery timer's thread.
        self.hang_up = hang_up
        self.heard_at = now         # clock() of its last ack, nack, reject, fetch or consume
        self.stalled = False        # silent since a push fell due (see broker.py's docstring)
        self.progress = 0           # highest Delivery.seq it acked, nacked or rejected
        self.held = {}              # message id -> its Delivery, not acked yet, in order
        self.consumers = {}         # queue name -> Consumer
        self.pushes = []            # (message_id, body, delivery_count) to write
        self.has_pushes = threading.Condition(mutex)
        self.writer_called = False  # call_writer(): the delivery thread must look
        self.closed = False
