"""The sender's machinery: the outbox first, then a window of publishes, retries and ACKs.

``bin/Sender.py`` reads like the design document; what it calls lives here.

* :meth:`Sender.accept` seals every new message once -- its ``message_id``
  fixed -- and writes it to the outbox (``pending_messages.json``), fsynced,
  before anything is sent: from then on it cannot be lost.
* :meth:`Sender.deliver` sends the outbox, oldest first, with up to
  ``window`` publishes in flight on one connection.  A message leaves the
  outbox when ``ACK <id>`` arrives, or when the broker refuses it for good
  (any ``Error:`` but the temporary ones in :data:`TEMPORARY_REFUSALS`): it
  then moves to the rejects file (:class:`Rejects`) with the broker's reason
  and the run goes on, to exit 1 at the end.  It has :data:`ATTEMPTS`
  attempts: one fails when its ACK does not come within ``ack_timeout``, when
  the broker refuses it for the moment, or when the connection ends while it
  is the oldest in flight (the others in flight are sent again at no cost).  A retry sends the
  identical envelope, so it never makes a second copy.  A lost connection is
  reopened: :data:`ATTEMPTS` tries, one second apart, each once round the
  failover list of ``--url`` (:func:`ciphermq.brokers.connect_any`).  A
  RabbitMQ nack costs no attempt: the sender waits :data:`NACK_BACKOFF` and
  sends again (every :data:`NACKS_PER_ATTEMPT`-th nack of a message counts).
* :class:`Report` prints the status lines, in the document's words, and
  writes the optional ``--record`` file the checker reads (:class:`Record`).

A message too large for the broker's line limit (``max_line_bytes``, the
broker's ``--max-line-bytes``) is refused before it is sealed: it is named
by its position, never written anywhere, and the exit status is 1.

Everything here runs in the script's main thread; ``stop`` (an Event set by
SIGINT/SIGTERM) stops new sends and lets the in-flight ones finish.
"""
import collections
import itertools
import json
import math
import time
from pathlib import Path

from .brokers import connect_any
from .cli import positive_int
from .errors import ConnectionLost, Nacked, ServerError
from .outbox import record
from .protocol import DEFAULT_MAX_LINE_BYTES  # the broker's --max-line-bytes default
from .store import JsonLinesFile

#: The broker's refusal of a known message_id with a different envelope (never worth a retry).
REUSED_ID = "already used for different content"

ATTEMPTS = 3                # per message, and per reconnection, as the document says
#: After RabbitMQ nacks a publish, wait this long before reconnecting to send it again.
#: A nack is not the message's fault (a quorum queue electing a leader nacks a burst of
#: publishes), so it costs no attempt -- but NACKS_PER_ATTEMPT nacks of one message do
#: (a queue that stays full nacks for ever).
NACK_BACKOFF = 1.0
NACKS_PER_ATTEMPT = 10
#: With more messages than this, one progress line replaces the per-message lines (-v: all).
EACH_LINE_UP_TO = 10
ACCEPT_CHUNK = 1000         # new messages sealed and made durable per outbox fsync
#: Refusals the broker lifts by itself (a queue drains, a disk is freed): retried, kept.
TEMPORARY_REFUSALS = ("is full", "journal write failed")
DEFAULT_REJECTS = "rejected_messages.json"


def add_arguments(parser):
    """The Sender's delivery options (bin/Sender.py adds the rest)."""
    parser.add_argument("--window", type=positive_int, default=32,
                        help="publishes in flight before waiting for ACKs; 1 = one at a time, "
                             "as in the document (default %(default)s)")
    parser.add_argument("--ack-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="wait this long for each ACK before retrying (default 5)")
    parser.add_argument("--outbox", default="pending_messages.json", type=Path,
                        help="durable file of messages not yet ACKed (default %(default)s)")
    parser.add_argument("--rejects", type=Path,
                        help="where messages the broker refuses for good go, with its reason "
                             "(default: %s beside --outbox)" % DEFAULT_REJECTS)
    parser.add_argument("--max-line-bytes", type=positive_int, default=DEFAULT_MAX_LINE_BYTES,
                        metavar="N", help="the broker's line limit: a message whose publish "
                        "would be longer is refused before it is sealed (default %(default)s, "
                        "the broker's default)")
    parser.add_argument("--envelope-version", type=int, choices=(1, 2), default=2,
                        help="1: the design document's format, which its original Receiver "
                             "opens (no timestamp, no signature); 2: ours (default)")
    parser.add_argument("--record", type=Path, metavar="PATH",
                        help="append one JSON line per message attempted, ACKed, refused or "
                             "given up, for `python -m ciphermq.checker` (default: none)")


class Record(JsonLinesFile):
    """The ``--record`` file: one JSON line per event of a message, for the checker.

    ``{"event": "attempted" | "acked" | "refused" | "rejected" | "failed",
    "message_id": ...}``: attempted -- a publish is about to be written; acked
    -- ``ACK <id>`` arrived (written before the outbox forgets the message);
    refused -- the broker answered ``Error:``; rejected -- for good: the
    message left the outbox for the rejects file; failed -- out of attempts,
    the message stays in the outbox.  Runs append to one file.  Each line is flushed as it is
    written, so a SIGKILL loses none; the torn last line a kill may leave is
    cut off when the next run opens the file.  Raises OSError or CorruptFile
    if the file cannot be used.
    """

    EVENTS = ("attempted", "acked", "refused", "rejected", "failed")

    def note(self, event, message_id):
        self.append({"event": event, "message_id": message_id})
        self.flush()


class Rejects(JsonLinesFile):
    """The rejects file: messages the broker refused for good, one JSON line each.

    The outbox record (id, exchange, routing key, envelope: ciphertext only)
    plus ``"reason"``, the broker's words.  Created 0600 (files.py); each
    line is fsynced before the outbox forgets the message, so a crash between
    the two leaves it in both, never in neither.  Raises OSError or
    CorruptFile if the file cannot be used.
    """

    def add(self, outbox_record, reason):
        self.append(dict(outbox_record, reason=reason))
        self.sync()


def publish_overhead(sealer, exchange, routing_key):
    """Bytes of a publish line beyond the base64 ciphertext (one empty message sealed)."""
    body = json.dumps(sealer.seal(""), separators=(",", ":"))
    return len("publish %s %s %s\n" % (exchange, routing_key, body)) + 8   # ts digits, margin


def publish_size(text, overhead):
    """The length of ``text``'s publish line, to within a few bytes of the real one."""
    return overhead + 4 * math.ceil(len(text.encode("utf-8")) / 3)


class Pending:
    """One message on its way: its outbox record, its sends, and its failed attempts."""

    __slots__ = ("record", "sends", "failures", "nacks")

    def __init__(self, outbox_record):
        self.record = outbox_record
        self.sends = 0
        self.failures = 0
        self.nacks = 0

    @property
    def id(self):
        return self.record["message_id"]


class Report:
    """The status lines, in the document's words; a progress line for many messages.

    The progress line (at most one a second, and once at the end) counts
    from the start of sealing: ``sealed / sent / ACKed of total``, the ACK
    rate over the whole run and an estimate of the time left.  ``clock`` is
    injectable for tests.  With a :class:`Record`, every event is also
    written there.
    """

    def __init__(self, verbose, record=None, clock=time.monotonic):
        self.total = 0
        self.verbose = verbose
        self.record = record
        self.clock = clock
        self.sealed = self.sent = self.acked = 0
        self._started = clock()
        self._next_progress = self._started + 1.0

    @property
    def each(self):
        return self.verbose or self.total <= EACH_LINE_UP_TO

    def say(self, text):
        print(text, flush=True)

    def _note(self, event, pending):
        if self.record is not None:
            self.record.note(event, pending.id)

    def _tick(self):
        if not self.each and self.clock() >= self._next_progress:
            self._next_progress = self.clock() + 1.0
            self.progress()

    def sealing(self, count):
        self.sealed += count
        self._tick()

    def sending(self, pending):
        self._note("attempted", pending)
        self.sent += 1
        if self.each:
            attempt = ""
            if pending.failures:
                attempt = " (attempt %d of %d)" % (pending.failures + 1, ATTEMPTS)
            elif pending.sends > 1:
                attempt = " (again: the connection was lost)"
            self.say("🚀 [SENDER] Sending message %s%s..." % (pending.id, attempt))

    def acknowledged(self, pending):
        self._note("acked", pending)
        self.acked += 1
        if self.each:
            self.say("✅ [SENDER] Server ACK received for message %s" % pending.id)
        self._tick()

    def removed(self, pending):
        if self.each:
            self.say("🗑️ [SENDER] Message %s removed from pending messages" % pending.id)

    def refused(self, pending, error):
        self._note("refused", pending)
        self.say("⚠️ [SENDER] Broker refused message %s: %s" % (pending.id, error))

    def rejected(self, pending, error, path):
        self._note("rejected", pending)
        self.say("🚫 [SENDER] Message %s refused for good (%s): moved to %s"
                 % (pending.id, error, path))

    def too_large(self, number, size, limit):
        self.say("🚫 [SENDER] Message %d not sent: its publish would be %d bytes, over the "
                 "broker's limit of %d (--max-line-bytes)" % (number, size, limit))

    def failed(self, pending):
        self._note("failed", pending)
        self.say("❌ [SENDER] Failed to send message %s after %d attempts"
                 % (pending.id, ATTEMPTS))

    def progress(self):
        elapsed = max(self.clock() - self._started, 1e-9)
        rate = self.acked / elapsed
        if self.acked >= self.total:
            eta = "done"
        elif self.acked:
            eta = "ETA %.0f s" % ((self.total - self.acked) / rate)
        else:
            eta = "ETA unknown"
        self.say("📊 [SENDER] sealed %d, sent %d, ACKed %d of %d (%.1f s, %.0f msg/s, %s)"
                 % (self.sealed, self.sent, self.acked, self.total, elapsed, rate, eta))


class Sender:
    """Delivers the outbox's messages and new ones: windowed, retried, durable.

    ``window``: publishes in flight before waiting for ACKs; ``ack_timeout``:
    seconds to wait for the oldest one's ACK; ``connect_options``: keyword
    arguments for :func:`ciphermq.brokers.connect_any`; ``record``: a
    :class:`Record` or None; ``verbose``: a status line for every message.
    """

    def __init__(self, outbox, *, exchange, routing_key, window, ack_timeout, connect_options,
                 stop, record=None, verbose=False, rejects=None,
                 max_line_bytes=DEFAULT_MAX_LINE_BYTES, clock=time.monotonic):
        self.outbox = outbox
        self.rejects = rejects
        self.exchange = exchange
        self.routing_key = routing_key
        self.window = window
        self.ack_timeout = ack_timeout
        self.connect_options = connect_options
        self.stop = stop
        self.max_line_bytes = max_line_bytes
        self.report = Report(verbose, record, clock)     # its clock starts with sealing
        self.queue = collections.deque()        # Pending, not in flight, next first
        self.in_flight = collections.deque()    # (Pending, Reply, ACK deadline), oldest first
        self.unaccepted = 0                     # new messages never accepted (stopped)
        self.too_large = 0                      # new messages refused before sealing
        self.rejected = 0                       # messages the broker refused for good

    def accept(self, texts, seal, overhead=None):
        """Seal every new message with ``seal(text)`` and make it durable in the outbox.

        Nothing is sent yet.  From here on no message of this run can be
        lost: a crash, a kill or giving up leaves it in the outbox for the
        next run.  One fsync per ACCEPT_CHUNK messages.  ``overhead``
        (:func:`publish_overhead`) lets a message too large for the broker be
        refused here, unsealed.
        """
        leftovers = len(self.outbox)
        self.report.total = leftovers + len(texts)
        if leftovers:
            print("📦 [SENDER] %d message(s) left in %s by an earlier run: sending them first"
                  % (leftovers, self.outbox.path), flush=True)
        for start in range(0, len(texts), ACCEPT_CHUNK):
            if self.stop.is_set():
                self.unaccepted = len(texts) - start
                return
            chunk = []
            for number, text in enumerate(texts[start:start + ACCEPT_CHUNK], start + 1):
                size = publish_size(text, overhead) if overhead is not None else 0
                if size > self.max_line_bytes:
                    self.too_large += 1
                    self.report.total -= 1
                    self.report.too_large(number, size, self.max_line_bytes)
                else:
                    chunk.append(record(seal(text), self.exchange, self.routing_key))
            self.outbox.add(chunk)
            self.report.sealing(len(chunk))

    def deliver(self):
        """Send all the outbox holds until each is ACKed or out of attempts; the exit status.

        Blocks until done or stopped.  Raises ServerError if the broker
        refuses the connection itself (authentication).
        """
        self.queue.extend(Pending(r) for r in self.outbox.pending())
        self.report.total = len(self.queue)
        connection = None
        try:
            while self.in_flight or (self.queue and not self.stop.is_set()):
                if connection is None:
                    connection = self._connect()
                try:
                    self._fill_window(connection)
                    self._await_oldest()
                except (ConnectionLost, TimeoutError) as exc:
                    print("🔌 [SENDER] %s; reconnecting" % exc, flush=True)
                    connection.close()
                    connection = None
                    self._take_back_in_flight(time.monotonic(), isinstance(exc, Nacked))
                    if isinstance(exc, Nacked):
                        self.stop.wait(NACK_BACKOFF)
        except ConnectionLost as exc:           # could not (re)connect: give up for now
            print("❌ [SENDER] %s" % exc, flush=True)
        finally:
            if connection is not None:
                connection.close()
        return self._summary()

    def _connect(self):
        def retrying(tries, error):
            print("🔌 [SENDER] %s (try %d of %d); retrying in 1 s" % (error, tries, ATTEMPTS),
                  flush=True)
        return connect_any(attempts=ATTEMPTS, stop=self.stop, on_retry=retrying,
                           timeout=self.ack_timeout, **self.connect_options)

    def _fill_window(self, connection):
        """Publish queued messages until ``window`` are in flight (one write)."""
        batch = []
        while (self.queue and len(self.in_flight) + len(batch) < self.window
               and not self.stop.is_set()):
            pending = self.queue.popleft()
            pending.sends += 1
            batch.append(pending)
            self.report.sending(pending)
        if not batch:
            return
        deadline = time.monotonic() + self.ack_timeout
        try:
            replies = connection.publish_many(
                [(p.record["exchange"], p.record["routing_key"], p.record["envelope"])
                 for p in batch])
        except ConnectionLost:
            # The write failed part way: in flight all the same, for the caller to take back.
            self.in_flight.extend((p, None, deadline) for p in batch)
            raise
        self.in_flight.extend((p, reply, deadline) for p, reply in zip(batch, replies))

    def _await_oldest(self):
        """Wait for the oldest publish's ACK (replies come in order).

        Raises TimeoutError if it does not come in time, ConnectionLost if
        the connection ends: the caller reconnects and retries.
        """
        pending, reply, deadline = self.in_flight[0]
        try:
            reply.result(max(0.0, deadline - time.monotonic()))
        except ServerError as exc:              # refused (unroutable, too long, queue full...)
            self.in_flight.popleft()
            if self.rejects is not None and not any(
                    words in str(exc) for words in TEMPORARY_REFUSALS):
                self._reject(pending, str(exc))
                return
            self.report.refused(pending, exc)
            if REUSED_ID in str(exc):           # final: sending it again cannot help
                pending.failures = ATTEMPTS - 1
            self._retry(pending, front=False, failed=True)  # after the others: give it time
            return
        except TimeoutError:
            raise TimeoutError("no ACK for message %s within %.1f s"
                               % (pending.id, self.ack_timeout)) from None
        self.in_flight.popleft()
        self.report.acknowledged(pending)
        self.outbox.remove(pending.id)
        self.report.removed(pending)

    def _reject(self, pending, reason):
        """Final: the rejects file gets the message (fsynced), then the outbox forgets it."""
        self.rejects.add(pending.record, reason)
        self.rejected += 1
        self.report.total -= 1
        self.report.rejected(pending, reason, self.rejects.path)
        self.outbox.remove(pending.id)

    def _take_back_in_flight(self, now, nacked=False):
        """Queue the in-flight messages again after the connection has ended.

        The oldest -- the one whose ACK was awaited -- has failed an attempt,
        and so has any whose own ACK is overdue; the others were only caught
        up in it and are sent again at no cost.  A ``nacked`` oldest fails an
        attempt only at every NACKS_PER_ATTEMPT-th nack.
        """
        oldest = self.in_flight[0][0] if self.in_flight else None
        if nacked and oldest is not None:
            oldest.nacks += 1
            if oldest.nacks % NACKS_PER_ATTEMPT:
                oldest = None
        while self.in_flight:
            pending, _, deadline = self.in_flight.pop()     # newest first: order is kept
            self._retry(pending, front=True, failed=pending is oldest or deadline <= now)

    def _retry(self, pending, front, failed):
        if failed:
            pending.failures += 1
        if pending.failures >= ATTEMPTS:
            self.report.failed(pending)         # it stays in the outbox for the next run
        elif front:
            self.queue.appendleft(pending)
        else:
            self.queue.append(pending)

    def _summary(self):
        self.report.progress()
        left = len(self.outbox)
        if not (left or self.unaccepted or self.too_large or self.rejected):
            return 0
        if self.rejected:
            print("❌ [SENDER] %d message(s) refused by the broker for good, moved to %s with "
                  "its reasons" % (self.rejected, self.rejects.path), flush=True)
        if self.too_large:
            print("❌ [SENDER] %d message(s) too large for the broker (--max-line-bytes %d): "
                  "not sent" % (self.too_large, self.max_line_bytes), flush=True)
        if left:
            names = [r["message_id"] for r in itertools.islice(self.outbox.pending(), 10)]
            print("❌ [SENDER] %d message(s) not acknowledged, kept in %s for the next run: %s%s"
                  % (left, self.outbox.path, ", ".join(names), ", ..." if left > 10 else ""),
                  flush=True)
        if self.unaccepted:
            print("❌ [SENDER] %d message(s) not accepted: stopped before they were written "
                  "to the outbox" % self.unaccepted, flush=True)
        return 1
