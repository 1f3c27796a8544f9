"""Receive, decrypt and store messages: each exactly once, even across crashes.

    python bin/Receiver.py                        # default_queue -> received_messages.json
    python bin/Receiver.py --max-messages 5 -v    # stop after 5 new messages

The output file (one JSON object per line: message_id, message, timestamp) is
also the dedup store: at start it is read back to rebuild the set of
processed ids, and a torn last line left by a crash is cut off (its message
was never acked, so the broker delivers it again).  For every message:

    dedup check -> decrypt -> append -> flush + fsync -> mark processed -> ack

so nothing is acked before its record is durable.  The messages that arrive
together (up to --ack-batch) share one fsync, then their acks go out in one
write.  A duplicate is not written again but is acked; an envelope that does
not open is recorded in the rejects file with the reason, and acked, so it
never comes back.  ``ACK_CONFIRMED`` is awaited without ever blocking the
reading of new messages; an unconfirmed ack is sent again after
--ack-timeout (5 s), 3 attempts in all, then given up with a warning (the
message is durable; a redelivery would be deduplicated).  If the broker is
unreachable or the connection drops, the receiver reconnects every second and
subscribes again.  SIGINT/SIGTERM: stop taking messages, finish and flush the
ones in hand, exit 0.  docs/CLIENTS.md explains why this yields exactly once.

Test hook: ``CIPHERMQ_CRASH_AT=<point>[:<n>]`` makes the process die
(``os._exit(70)``, as abrupt as SIGKILL) when the n-th new message (default
the first) reaches <point>: before-write, mid-write (half a line written),
after-write (written, not fsynced), after-fsync (durable, not acked) or
after-ack (acked, confirmation not awaited).  Never set it outside tests.
"""
import argparse
import collections
import concurrent.futures
import datetime
import json
import os
import queue
import sys
import time
from pathlib import Path

# Runnable as ``python bin/Receiver.py`` from a checkout, without installing the package.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from ciphermq import cli, client, crypto  # noqa: E402  (needs the path above)
from ciphermq.errors import ConnectionLost, DecryptionError, ServerError  # noqa: E402
from ciphermq.store import CorruptFile, JsonLinesFile, MessageStore, encode  # noqa: E402

ATTEMPTS = 3                # sends of one ack before giving up on its confirmation
#: Per-message lines for this many messages, then a progress line a second (-v: all lines).
EACH_LINE_UP_TO = 10
#: A signal handler runs in this very thread and must not touch the delivery
#: queue (it could deadlock on the queue's lock), so the loop looks at the
#: stop flag at least this often.
STOP_CHECK = 0.25
CRASH_POINTS = ("before-write", "mid-write", "after-write", "after-fsync", "after-ack")


class CrashHook:
    """The CIPHERMQ_CRASH_AT test hook (see the module docstring).  Inert unless set."""

    def __init__(self, spec):
        self.point, self.nth = None, 0
        if spec:
            point, _, nth = spec.partition(":")
            if point not in CRASH_POINTS:
                raise ValueError("CIPHERMQ_CRASH_AT: unknown point %r" % point)
            self.point, self.nth = point, int(nth or 1)

    def armed(self, point, stored):
        """True if the process should die at ``point`` now that ``stored`` messages are new."""
        return point == self.point and stored >= self.nth

    def check(self, point, stored):
        if self.armed(point, stored):
            sys.stdout.flush()
            os._exit(70)


class Outstanding:
    """An ack waiting for its ACK_CONFIRMED."""

    __slots__ = ("message_id", "reply", "attempts", "deadline")

    def __init__(self, message_id, reply, attempts, deadline):
        self.message_id = message_id
        self.reply = reply
        self.attempts = attempts
        self.deadline = deadline


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
        self.say("🚫 [RECEIVER] Message %s rejected (reason in %s), sending ACK"
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
        counts = (self.saved, self.duplicates, self.rejected)
        if only_if_changed and counts in (self._last_progress, (0, 0, 0)):
            return
        self._last_progress = counts
        self.say("📊 [RECEIVER] %d message(s) saved, %d duplicate(s), %d rejected" % counts)


class Receiver:
    """The receive loop.  Runs in the main thread; owns the store and the connection."""

    def __init__(self, args, opener, store, connect_options, stop, hook):
        self.args = args
        self.opener = opener
        self.store = store
        self.rejects_path = args.rejects
        self.rejects = None                 # opened on the first reject
        self.connect_options = connect_options
        self.stop = stop
        self.hook = hook
        self.report = Report(args.verbose)
        self.connection = None
        self.decryptors = None                  # a thread pool with --decrypt-threads > 1
        if args.decrypt_threads > 1:
            self.decryptors = concurrent.futures.ThreadPoolExecutor(
                args.decrypt_threads, thread_name_prefix="ciphermq-decrypt")
        self.outstanding = collections.deque()  # Outstanding acks, oldest first
        self.new = 0                            # new messages stored by this run
        self.last_new = time.monotonic()

    # -- the loop ---------------------------------------------------------------

    def run(self):
        """Receive until stopped, --max-messages or --idle-exit; return the exit status."""
        try:
            while not self.stop.is_set() and not self._finished():
                if self.connection is None and not self._connect():
                    break
                try:
                    first = self.connection.deliveries.get(timeout=self._wait())
                except queue.Empty:
                    pass
                else:
                    if first is None:           # the connection has ended
                        self._connection_lost()
                    else:
                        self._take_batch(first)
                self._tend_acks()
                self.report.tick()
        finally:
            self._finish()
        return 0

    def _finished(self):
        idle = self.args.idle_exit
        return self._enough() or (idle is not None and time.monotonic() - self.last_new >= idle)

    def _enough(self):
        return self.args.max_messages is not None and self.new >= self.args.max_messages

    def _wait(self):
        wait = STOP_CHECK
        if self.outstanding:
            wait = min(wait, max(0.0, self.outstanding[0].deadline - time.monotonic()))
        return wait

    def _connect(self):
        """Connect and subscribe, retrying every second; False if stopped or finished first."""
        announced = False
        while not self.stop.is_set() and not self._finished():
            connection = None
            try:
                connection = client.Client(timeout=self.args.ack_timeout, **self.connect_options)
                connection.consume(self.args.queue, self.args.prefetch)
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
            self.connection = connection
            self.report.say("🔗 [RECEIVER] Subscribed to %s on %s"
                            % (self.args.queue, connection.peer))
            return True
        return False

    def _connection_lost(self):
        self.report.say("🔌 [RECEIVER] Connection to the broker lost; reconnecting")
        self.connection.close()
        self.connection = None
        # The broker took back every unacked delivery of that connection.  An
        # ack it never confirmed either arrived, or its message will be
        # delivered again -- and the store will recognise it as a duplicate.
        self.outstanding.clear()

    def _take_batch(self, first):
        """Process ``first`` and whatever else has already arrived (up to --ack-batch)."""
        batch, lost = [first], False
        while len(batch) < self.args.ack_batch:
            try:
                delivery = self.connection.deliveries.get_nowait()
            except queue.Empty:
                break
            if delivery is None:
                lost = True
                break
            batch.append(delivery)
        self._process(batch)
        if lost:
            self._connection_lost()

    # -- one batch: the exactly-once order ---------------------------------------

    def _process(self, batch):
        """Store a batch the exactly-once way (the order is in the module docstring)."""
        # Decrypt every new message of the batch first, several at once (step 2 for all).
        fresh = {}
        for delivery in batch:
            if delivery.message_id not in self.store and delivery.message_id not in fresh:
                fresh[delivery.message_id] = delivery
        opened = dict(zip(fresh, self._open_all(list(fresh.values()))))
        to_ack, saved, rejected = [], [], False
        in_batch = set()                    # ids appended by this batch, not yet durable
        timestamp = _now()                  # one batch, one fsync: one time of storing
        for delivery in batch:
            if self._enough():
                break                       # the rest stay unacked: the broker keeps them
            message_id = delivery.message_id
            self.report.received(delivery)
            to_ack.append(message_id)
            if message_id in self.store or message_id in in_batch:       # 1. dedup check
                self.report.duplicate(message_id)
                continue
            in_batch.add(message_id)
            message, reason = opened[message_id]                         # 2. decrypted
            if message is None:
                self._reject(message_id, reason, timestamp)
                rejected = True
                continue
            self.new += 1
            self._append(message_id, message, timestamp)                  # 3. append
            saved.append(message_id)
        if rejected:
            self.rejects.sync()
        if saved:
            self.store.sync()                   # 4. flush + fsync, 5. mark processed
            self.last_new = time.monotonic()
        self.hook.check("after-fsync", self.new)
        for message_id in saved:
            self.report.stored(message_id)
        self._send_acks(to_ack, attempt=1)                                # 6. ack
        self.hook.check("after-ack", self.new)

    def _open_all(self, deliveries):
        """Decrypt a batch, in order; on several threads when there are several messages.

        RSA and AES run in pycryptodome's C code with the interpreter lock
        released, so two decryptions really do run at once on two cores.
        """
        if self.decryptors is None or len(deliveries) < 2:
            return [self._open(delivery) for delivery in deliveries]
        return list(self.decryptors.map(self._open, deliveries))

    def _open(self, delivery):
        """Decrypt one delivery: ``(message, None)``, or ``(None, why it was refused)``."""
        try:
            envelope = json.loads(delivery.body)
        except ValueError:
            return None, "envelope is not valid JSON"
        try:
            return self.opener.open(envelope, expected_id=delivery.message_id), None
        except DecryptionError as exc:
            return None, exc.reason

    def _append(self, message_id, message, timestamp):
        self.hook.check("before-write", self.new)
        if self.hook.armed("mid-write", self.new):
            line = encode({"message_id": message_id, "message": message, "timestamp": timestamp})
            self.store.write(line[:len(line) // 2])
            self.store.flush()
            self.hook.check("mid-write", self.new)
        self.store.add(message_id, message, timestamp)
        if self.hook.armed("after-write", self.new):
            self.store.flush()
            self.hook.check("after-write", self.new)

    def _reject(self, message_id, reason, timestamp):
        if self.rejects is None:
            self.rejects = JsonLinesFile(self.rejects_path)
        self.rejects.append({"message_id": message_id, "reason": reason, "timestamp": timestamp})
        self.report.refused(message_id, self.rejects_path)

    # -- acks and their confirmations ----------------------------------------------

    def _send_acks(self, message_ids, attempt):
        if not message_ids or self.connection is None:
            return
        for message_id in message_ids:
            self.report.sending_ack(message_id, attempt)
        try:
            replies = self.connection.ack_many(message_ids)
        except ConnectionLost:
            return              # the reader has queued the end-of-connection marker
        deadline = time.monotonic() + self.args.ack_timeout
        self.outstanding.extend(Outstanding(message_id, reply, attempt, deadline)
                                for message_id, reply in zip(message_ids, replies))

    def _tend_acks(self):
        """Report the confirmations that have arrived; re-send acks overdue.  Never blocks."""
        while self.outstanding and self.outstanding[0].reply.done():
            ack = self.outstanding.popleft()
            try:
                ack.reply.result(0)
            except ServerError as exc:
                self.report.say("⚠️ [RECEIVER] Broker refused the ACK for message %s: %s"
                                % (ack.message_id, exc))
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
            self._send_acks([ack.message_id], ack.attempts + 1)

    def _finish(self):
        """Wait (bounded) for the confirmations of acks already sent, then close everything."""
        deadline = time.monotonic() + self.args.ack_timeout
        while self.outstanding and self.connection is not None and not self.connection.lost:
            try:
                self.outstanding[0].reply.result(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            except (ServerError, ConnectionLost):
                pass
            self._tend_acks()
        if self.connection is not None:
            self.connection.close()
        if self.decryptors is not None:
            self.decryptors.shutdown()
        self.store.close()
        if self.rejects is not None:
            self.rejects.close()
        self.report.progress()


def _now():
    """The local time as ISO 8601 with its UTC offset, to the millisecond."""
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")



def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="Receiver.py", description="Receive, decrypt and store CipherMQ messages, "
                                        "each exactly once.")
    cli.add_connection_arguments(parser)
    parser.add_argument("--queue", default="default_queue",
                        help="queue to consume (default %(default)s)")
    parser.add_argument("--private-key", default="keys/receiver_private.pem", type=Path,
                        help="the receiver's RSA private key (default %(default)s)")
    parser.add_argument("--output", default="received_messages.json", type=Path,
                        help="where messages are appended, one JSON object per line; also "
                             "the dedup store (default %(default)s)")
    parser.add_argument("--rejects", type=Path,
                        help="where envelopes that do not open are recorded "
                             "(default: <output stem>.rejects.json)")
    parser.add_argument("--prefetch", type=int, default=200,
                        help="unacked messages the broker may push ahead; twice --ack-batch "
                             "keeps the next batch arriving while one is stored "
                             "(default %(default)s)")
    parser.add_argument("--ack-batch", type=cli.positive_int, default=100, metavar="N",
                        help="store at most N messages per fsync before acking them "
                             "(default %(default)s)")
    parser.add_argument("--decrypt-threads", type=cli.positive_int, default=2, metavar="N",
                        help="decrypt up to N messages of a batch at once; RSA runs without "
                             "the interpreter lock, so this uses more cores (default %(default)s)")
    parser.add_argument("--ack-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="re-send an ack not confirmed within this (default 5)")
    parser.add_argument("--max-messages", type=cli.positive_int, metavar="N",
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
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="a status line for every message, and the client's log")
    args = parser.parse_args(argv)
    if args.rejects is None:
        args.rejects = args.output.with_name(args.output.stem + ".rejects.json")
    if args.prefetch < 0:
        parser.error("--prefetch must not be negative")
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.configure_logging(args.verbose)
    try:
        hook = CrashHook(os.environ.get("CIPHERMQ_CRASH_AT"))
        opener = crypto.Opener(args.private_key, strict=args.strict,
                               trusted_senders=args.trusted_senders,
                               require_signature=args.require_signature,
                               max_age_seconds=args.max_age)
        options = cli.connection_options(args)
    except (OSError, ValueError) as exc:
        print("❌ [RECEIVER] %s" % exc, file=sys.stderr)
        return 2
    try:
        store = MessageStore(args.output)
    except (OSError, CorruptFile) as exc:
        print("❌ [RECEIVER] cannot use the output file: %s" % exc, file=sys.stderr)
        return 1
    if store.torn_bytes:
        print("✂️ [RECEIVER] Cut a torn last line (%d bytes) off %s; its message will be "
              "delivered again" % (store.torn_bytes, args.output), flush=True)
    stop = cli.stop_on_signals()
    print("📂 [RECEIVER] %d message(s) already in %s" % (len(store), args.output), flush=True)
    try:
        return Receiver(args, opener, store, options, stop, hook).run()
    except ServerError as exc:          # authentication refused, or an unknown queue
        print("❌ [RECEIVER] %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
