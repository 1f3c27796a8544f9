"""The receiver's machinery: exactly once, by storing and fsyncing before acking.

``bin/Receiver.py`` reads like the design document; what it calls lives here.
The output file (one JSON object per line: message_id, message, timestamp,
envelope_digest) is also the dedup store -- the document's
``processed_messages`` -- rebuilt from the file at start
(:class:`ciphermq.store.MessageStore`).  For every message,
:meth:`Receiver.store_then_ack` does, in this order::

    dedup check -> decrypt -> append -> flush + fsync -> ack

so nothing is acked before its record is durable.  The messages that arrive
together (up to ``ack_batch``) share one fsync, then their acks go out in one
write.  A duplicate is not written again but is acked.  An envelope the
receiver refuses (it does not open, is tampered, unsigned when a signature is
required, older than ``--max-age``) is recorded in the rejects file with the
reason, fsynced, and then *rejected* -- ``reject <id> <reason>``, which moves
it to ``<queue>.dead`` with that reason -- never acked away.
``ACK_CONFIRMED`` (or ``REJECT_CONFIRMED``) is awaited without ever blocking
the reading of new messages (:meth:`Receiver.tend_acks`); an unconfirmed ack
is sent again after ``ack_timeout``, :data:`ATTEMPTS` sends in all, then given
up with a warning (the message is durable; a redelivery would be
deduplicated).  docs/CLIENTS.md explains why this yields exactly once.

Everything here runs in the script's main thread, except the decryptions of
a batch, which a thread pool may run side by side (``decrypt_threads``).

Test hook: ``CIPHERMQ_CRASH_AT=<point>[:<n>]`` in the environment makes the
process die (``os._exit(70)``, as abrupt as SIGKILL) when the n-th new
message (default the first) reaches <point>: before-write, mid-write (half a
line written), after-write (written, not fsynced), after-fsync (durable, not
acked) or after-ack (acked, confirmation not awaited).  Never set it outside
tests.
"""
import collections
import concurrent.futures
import datetime
import hashlib
import json
import os
import queue
import sys
import time
from pathlib import Path

from .brokers import connect_any
from .cli import non_negative_int, positive_int
from .errors import ConnectionLost, OutputWriteFailed, ServerError, UsageError
from .store import JsonLinesFile, MessageStore, encode

ATTEMPTS = 3                # sends of one ack before giving up on its confirmation
#: Per-message lines for this many messages, then a progress line a second (-v: all lines).
EACH_LINE_UP_TO = 10
#: A signal handler runs in the main thread and must not touch the delivery
#: queue (it could deadlock on the queue's lock), so the loop looks at the
#: stop flag at least this often.
STOP_CHECK = 0.25
CRASH_ENV = "CIPHERMQ_CRASH_AT"
CRASH_POINTS = ("before-write", "mid-write", "after-write", "after-fsync", "after-ack")
CRASHED = 70                # the exit status of a crash at a CRASH_POINT
WRITE_FAILED = 74           # the output or rejects file could not be written (EX_IOERR)
#: The reject reason for a known id that arrives with another envelope.
REUSED_ID = "message_id already used for different content"
#: Fields the broker adds to an envelope on delivery: not part of what the id binds.
_DELIVERY_FIELDS = ("delivery_count", "dead_reason")


class CrashHook:
    """The ``CIPHERMQ_CRASH_AT`` test hook (see the module docstring).  Inert unless set."""

    def __init__(self, spec):
        self.point, self.nth = None, 0
        if spec:
            point, _, nth = spec.partition(":")
            if point not in CRASH_POINTS:
                raise UsageError("%s: unknown point %r" % (CRASH_ENV, point))
            self.point, self.nth = point, int(nth or 1)

    @classmethod
    def from_environment(cls):
        return cls(os.environ.get(CRASH_ENV))

    def armed(self, point, stored):
        """True if the process should die at ``point`` now that ``stored`` messages are new."""
        return point == self.point and stored >= self.nth

    def check(self, point, stored):
        if self.armed(point, stored):
            sys.stdout.flush()
            os._exit(CRASHED)


class Outstanding:
    """An ack waiting for its ACK_CONFIRMED."""

    __slots__ = ("message_id", "reply", "attempts", "deadline", "reason")

    def __init__(self, message_id, reply, attempts, deadline, reason=None):
        self.message_id = message_id
        self.reply = reply
        self.attempts = attempts
        self.deadline = deadline
        self.reason = reason        # not None: a reject (REJECT_CONFIRMED), not an ack


class Report:
    """The status lines, in the document's words.

    Every message gets its lines with -v; otherwise only the first few of a
    run do, and a progress line (at most one a second, when something
    changed) keeps stdout affordable for thousands of messages.
    """

    def __init__(self, verbose):
        self.verbose = verbose
        self.seen = self.saved = self.duplicates = self.rejected = 0
        self._shown = set()             # ids of the first few messages, which get every line
        self._next_progress = 0.0
        self._last_progress = None

    def say(self, text):
        print(text, flush=True)

    def _each(self, message_id):
        return self.verbose or message_id in self._shown

    def received(self, delivery):
        self.seen += 1
        if len(self._shown) < EACH_LINE_UP_TO:
            self._shown.add(delivery.message_id)
        if self._each(delivery.message_id):
            self.say("📩 [RECEIVER] Received message %s" % delivery.message_id)

    def duplicate(self, message_id):
        self.duplicates += 1
        if self._each(message_id):
            self.say("⚠️ [RECEIVER] Duplicate message %s, sending ACK" % message_id)

    def refused(self, message_id, rejects_path):
        self.rejected += 1
        self.say("🚫 [RECEIVER] Message %s rejected (reason in %s), sending REJECT"
                 % (message_id, rejects_path))

    def stored(self, message_id):
        self.saved += 1
        if self._each(message_id):
            self.say("💾 [RECEIVER] Message %s saved to file" % message_id)

    def sending_ack(self, message_id, attempt):
        if self._each(message_id):
            again = "" if attempt == 1 else " (attempt %d of %d)" % (attempt, ATTEMPTS)
            self.say("📤 [RECEIVER] Sending ACK for message %s%s" % (message_id, again))

    def confirmed(self, message_id):
        if self._each(message_id):
            self.say("✅ [RECEIVER] Server confirmed ACK for message %s" % message_id)

    def tick(self):
        now = time.monotonic()
        if not self.verbose and now >= self._next_progress:
            self._next_progress = now + 1.0
            self.progress(only_if_changed=True)

    def progress(self, only_if_changed=False):
        """The once-a-second 📊 line, "so far"; ``only_if_changed``: not a repeat, not all 0."""
        counts = (self.saved, self.duplicates, self.rejected)
        if only_if_changed and counts in (self._last_progress, (0, 0, 0)):
            return
        self._last_progress = counts
        self.say("📊 [RECEIVER] so far: %d message(s) saved, %d duplicate(s), %d rejected"
                 % counts)

    def summary(self):
        """The 📊 summary, printed once, as the run's last line."""
        self.say("📊 [RECEIVER] %d message(s) saved, %d duplicate(s), %d rejected"
                 % (self.saved, self.duplicates, self.rejected))


class Receiver:
    """One consumer: its connection, its store, its acks.  Main thread only.

    ``decrypt(delivery)`` returns ``(message, None)`` or ``(None, reason)``;
    ``store`` is the :class:`~ciphermq.store.MessageStore` (also the dedup
    set); ``stop`` an Event set by the signal handler; ``rejects_path``
    defaults to ``<store stem>.rejects.json``.  The remaining keyword
    arguments are the script's options of the same names.
    """

    def __init__(self, decrypt, store, *, queue_name, connect_options, stop, rejects_path=None,
                 prefetch=200, ack_batch=100, decrypt_threads=1, ack_timeout=5.0,
                 max_messages=None, idle_exit=None, verbose=False, hook=None):
        self.decrypt = decrypt
        self.store = store
        self.queue_name = queue_name
        self.rejects_path = rejects_path or default_rejects_path(store.path)
        self.rejects = None                     # opened on the first reject
        self.connect_options = connect_options
        self.stop = stop
        self.prefetch, self.ack_batch, self.ack_timeout = prefetch, ack_batch, ack_timeout
        self.max_messages, self.idle_exit = max_messages, idle_exit
        self.hook = hook or CrashHook(None)
        self.report = Report(verbose)
        self.connection = None
        self.decryptors = None                  # a thread pool with decrypt_threads > 1
        if decrypt_threads > 1:
            self.decryptors = concurrent.futures.ThreadPoolExecutor(
                decrypt_threads, thread_name_prefix="ciphermq-decrypt")
        self.outstanding = collections.deque()  # Outstanding acks, oldest first
        self.new = 0                            # new messages stored by this run
        self.last_new = time.monotonic()
        self._ended = False                     # the connection's end marker has been read

    # -- the loop's questions and steps -------------------------------------------

    def finished(self):
        """True once stopped, max_messages are stored, or idle_exit has passed."""
        idle = self.idle_exit is not None and time.monotonic() - self.last_new >= self.idle_exit
        return self.stop.is_set() or self._enough() or idle

    def _enough(self):
        return self.max_messages is not None and self.new >= self.max_messages

    def connect(self):
        """Connect and subscribe, retrying every second; False if stopped or finished first.

        Raises ServerError if the broker refuses (no such queue, not allowed).
        """
        announced = False
        while not self.finished():
            connection = None
            try:
                connection = connect_any(attempts=1, timeout=self.ack_timeout,
                                         **self.connect_options)
                connection.consume(self.queue_name, self.prefetch)
            except (ConnectionLost, TimeoutError) as exc:
                if connection is not None:
                    connection.close()
                if not announced:
                    self.report.say("🔌 [RECEIVER] %s; retrying every second" % exc)
                    announced = True
                self.stop.wait(1.0)
                continue
            except BaseException:       # e.g. ServerError: no such queue, not allowed
                if connection is not None:
                    connection.close()
                raise
            self.connection, self._ended = connection, False
            self.report.say("🔗 [RECEIVER] Subscribed to %s on %s"
                            % (self.queue_name, connection.peer))
            return True
        return False

    def next_batch(self):
        """The deliveries that have arrived (at most ack_batch); [] after a short wait.

        Waits at most until the next ack is due, or STOP_CHECK.  When the
        connection has ended, forgets it, so the caller connects again.
        """
        if self._ended:
            self._connection_lost()
            return []
        wait = STOP_CHECK
        if self.outstanding:
            wait = min(wait, max(0.0, self.outstanding[0].deadline - time.monotonic()))
        batch = []
        try:
            delivery = self.connection.deliveries.get(timeout=wait)
            while delivery is not None:
                batch.append(delivery)
                if len(batch) == self.ack_batch:
                    return batch
                delivery = self.connection.deliveries.get_nowait()
            self._ended = True                  # None: the reader's end-of-connection marker
        except queue.Empty:
            pass
        return batch

    def _connection_lost(self):
        self.report.say("🔌 [RECEIVER] Connection to the broker lost; reconnecting")
        self.connection.close()
        self.connection = None
        # The broker took back every unacked delivery of that connection.  An
        # ack it never confirmed either arrived, or its message will be
        # delivered again -- and the store will recognise it as a duplicate.
        self.outstanding.clear()

    # -- one batch: the exactly-once order ------------------------------------------

    def store_then_ack(self, batch):
        """Store a batch exactly once, then ack it: the order that makes exactly once.

        1. dedup check  2. decrypt  3. append  4. flush + fsync  5. ack.
        A crash before 5 leaves the message unacked (the broker delivers it
        again, and 1 recognises it); a crash after 4 cannot lose it.  A write
        or fsync that fails (full disk, I/O error) raises OutputWriteFailed
        before anything of the batch is acked or rejected.
        """
        opened = self._decrypt_new(batch)       # 2. decrypt, all at once: ids not in the store
        to_ack, saved, to_reject = [], [], []
        in_batch = {}                               # id -> digest: appended, not yet durable
        timestamp = _now()                          # one batch, one fsync: one time of storing
        for delivery in batch:
            if self._enough():
                break                       # the rest stay unacked: the broker keeps them
            message_id = delivery.message_id
            self.report.received(delivery)
            digest = envelope_digest(delivery.body)
            if message_id in self.store or message_id in in_batch:       # 1. dedup check
                known = in_batch[message_id] if message_id in in_batch \
                    else self.store.digest(message_id)
                if None not in (known, digest) and known != digest:
                    self._reject(message_id, REUSED_ID, timestamp)      # another envelope
                    to_reject.append((message_id, REUSED_ID))
                    continue
                self.report.duplicate(message_id)
                to_ack.append(message_id)
                continue
            in_batch[message_id] = digest
            message, reason = opened[message_id]
            if message is None:
                self._reject(message_id, reason, timestamp)
                to_reject.append((message_id, reason))
                continue
            to_ack.append(message_id)
            self.new += 1
            self._written(self.store, self._append, message_id, message, timestamp,
                          digest)                                         # 3. append
            saved.append(message_id)
        if to_reject:
            self._written(self.rejects, self.rejects.sync)  # recorded before the broker is told
        if saved:
            self._written(self.store, self.store.sync)                    # 4. flush + fsync
            self.last_new = time.monotonic()
        self.hook.check("after-fsync", self.new)
        for message_id in saved:
            self.report.stored(message_id)
        self._send_acks(to_ack, attempt=1)                                # 5. ack
        self._send_rejects(to_reject, attempt=1)                          # ... or reject
        self.hook.check("after-ack", self.new)

    def _decrypt_new(self, batch):
        """``{id: (message, reason)}`` for the batch's messages not yet stored.

        With a thread pool, several at once: RSA and AES run in pycryptodome's
        C code with the interpreter lock released, so two decryptions really
        do run at once on two cores.
        """
        fresh = {}
        for delivery in batch:
            if delivery.message_id not in self.store and delivery.message_id not in fresh:
                fresh[delivery.message_id] = delivery
        deliveries = list(fresh.values())
        if self.decryptors is None or len(deliveries) < 2:
            return dict(zip(fresh, map(self.decrypt, deliveries)))
        return dict(zip(fresh, self.decryptors.map(self.decrypt, deliveries)))

    def _append(self, message_id, message, timestamp, digest=None):
        self.hook.check("before-write", self.new)
        if self.hook.armed("mid-write", self.new):
            line = encode({"message_id": message_id, "message": message, "timestamp": timestamp})
            self.store.write(line[:len(line) // 2])
            self.store.flush()
            self.hook.check("mid-write", self.new)
        self.store.add(message_id, message, timestamp, digest)
        if self.hook.armed("after-write", self.new):
            self.store.flush()
            self.hook.check("after-write", self.new)

    def _reject(self, message_id, reason, timestamp):
        if self.rejects is None:
            self.rejects = self._written(self.rejects_path, JsonLinesFile, self.rejects_path)
        self._written(self.rejects, self.rejects.append,
                      {"message_id": message_id, "reason": reason, "timestamp": timestamp})
        self.report.refused(message_id, self.rejects_path)

    def _written(self, file, write, *args):
        """``write(*args)``; an OSError becomes OutputWriteFailed naming ``file``'s path."""
        try:
            return write(*args)
        except OSError as exc:
            raise OutputWriteFailed(getattr(file, "path", file), exc) from None

    # -- acks and their confirmations ---------------------------------------------------

    def _send_acks(self, message_ids, attempt):
        if not message_ids or self.connection is None:
            return
        for message_id in message_ids:
            self.report.sending_ack(message_id, attempt)
        try:
            replies = self.connection.ack_many(message_ids)
        except ConnectionLost:
            return              # the reader has queued the end-of-connection marker
        deadline = time.monotonic() + self.ack_timeout
        self.outstanding.extend(Outstanding(message_id, reply, attempt, deadline)
                                for message_id, reply in zip(message_ids, replies))

    def _send_rejects(self, refusals, attempt):
        if not refusals or self.connection is None:
            return
        try:
            replies = self.connection.reject_many(refusals)
        except ConnectionLost:
            return
        deadline = time.monotonic() + self.ack_timeout
        self.outstanding.extend(Outstanding(message_id, reply, attempt, deadline, reason)
                                for (message_id, reason), reply in zip(refusals, replies))

    def tend_acks(self):
        """Report the confirmations that have arrived; re-send acks overdue.  Never blocks."""
        while self.outstanding and self.outstanding[0].reply.done():
            ack = self.outstanding.popleft()
            try:
                ack.reply.result(0)
            except ServerError as exc:
                self.report.say("⚠️ [RECEIVER] Broker refused the %s for message %s: %s"
                                % ("ACK" if ack.reason is None else "REJECT",
                                   ack.message_id, exc))
                continue
            except ConnectionLost:
                continue        # handled when the end-of-connection marker is read
            self.report.confirmed(ack.message_id)
        now = time.monotonic()
        again = []
        while self.outstanding and self.outstanding[0].deadline <= now:
            ack = self.outstanding.popleft()
            if ack.reply.done():
                self.outstanding.appendleft(ack)
                break
            if ack.attempts >= ATTEMPTS:
                self.report.say("⚠️ [RECEIVER] No confirmation of the ACK for message %s after "
                                "%d attempts; it is saved, and a redelivery would be "
                                "deduplicated" % (ack.message_id, ATTEMPTS))
                continue
            again.append(ack)
        for ack in again:
            if ack.reason is None:
                self._send_acks([ack.message_id], ack.attempts + 1)
            else:
                self._send_rejects([(ack.message_id, ack.reason)], ack.attempts + 1)
        self.report.tick()

    def finish(self):
        """Wait (bounded) for the confirmations of acks already sent, then close everything."""
        deadline = time.monotonic() + self.ack_timeout
        while self.outstanding and self.connection is not None and not self.connection.lost:
            try:
                self.outstanding[0].reply.result(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            except (ServerError, ConnectionLost):
                pass
            self.tend_acks()
        if self.connection is not None:
            self.connection.close()
        if self.decryptors is not None:
            self.decryptors.shutdown()
        for file in (self.store, self.rejects):
            try:
                if file is not None:
                    file.close()
            except OSError:
                pass            # a failed write was reported already; nothing unwritten was acked
        self.report.summary()


def envelope_digest(body):
    """16 bytes of BLAKE2b over the envelope as its sender sealed it; None if it is not JSON.

    The fields the broker adds on delivery are left out, and the rest is
    serialised canonically (sorted keys), so every delivery of one envelope
    has one digest.  Called for every delivery, duplicates included.
    """
    try:
        envelope = json.loads(body)
    except ValueError:
        return None
    if not isinstance(envelope, dict):
        return None
    for field in _DELIVERY_FIELDS:
        envelope.pop(field, None)
    canonical = json.dumps(envelope, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).digest()


def default_rejects_path(output):
    """Where envelopes that do not open are recorded: ``<output stem>.rejects.json``."""
    output = Path(output)
    return output.with_name(output.stem + ".rejects.json")


def open_store(path):
    """The output file as a MessageStore, its torn last line (if any) cut off and announced.

    Raises OSError or CorruptFile if it cannot be used.
    """
    store = MessageStore(path)
    if store.torn_bytes:
        print("✂️ [RECEIVER] Cut a torn last line (%d bytes) off %s; its message will be "
              "delivered again" % (store.torn_bytes, path), flush=True)
    return store


def _now():
    """The local time as ISO 8601 with its UTC offset, to the millisecond."""
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


def add_arguments(parser):
    """The Receiver's delivery and envelope options (bin/Receiver.py adds the rest)."""
    parser.add_argument("--rejects", type=Path,
                        help="where envelopes that do not open are recorded "
                             "(default: <output stem>.rejects.json)")
    parser.add_argument("--prefetch", type=non_negative_int, default=200,
                        help="unacked messages the broker may push ahead; twice --ack-batch "
                             "keeps the next batch coming while one is stored (default 200)")
    parser.add_argument("--ack-batch", type=positive_int, default=100, metavar="N",
                        help="store at most N messages per fsync before acking them "
                             "(default %(default)s)")
    parser.add_argument("--decrypt-threads", type=positive_int, default=2, metavar="N",
                        help="decrypt up to N messages of a batch at once; RSA runs without "
                             "the interpreter lock, so this uses more cores (default %(default)s)")
    parser.add_argument("--ack-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="re-send an ack not confirmed within this (default 5)")
    parser.add_argument("--max-messages", type=positive_int, metavar="N",
                        help="exit after storing N new messages")
    parser.add_argument("--idle-exit", type=float, metavar="SECONDS",
                        help="exit after this long without a new message")
    security = parser.add_argument_group("envelope checks")
    security.add_argument("--strict", action="store_true",
                          help="refuse v1 envelopes (the document's original format)")
    security.add_argument("--trusted-senders", type=Path, metavar="DIR",
                          help="verify signatures against the NAME.pub files in DIR")
    security.add_argument("--require-signature", action="store_true",
                          help="refuse envelopes not signed by a trusted sender")
    security.add_argument("--max-age", type=float, metavar="SECONDS",
                          help="refuse envelopes sent longer ago than this (replay window)")
