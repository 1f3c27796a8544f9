"""Encrypt messages for the receiver and publish them, losing none.

    python bin/Sender.py                              # the document's test message
    python bin/Sender.py --message "hi" --message "there"
    python bin/Sender.py --count 1000 --window 64     # generated test messages
    python bin/Sender.py --file messages.txt          # one message per line; - = stdin

First every new message is sealed once -- its message_id fixed -- and written
to the outbox (``pending_messages.json``) and fsynced: from then on it cannot
be lost.  Then the outbox is sent, oldest first, with up to ``--window``
publishes in flight on one connection; a message leaves the outbox when
``ACK <id>`` arrives.  A message has 3 attempts: one fails when its ACK does not
come within ``--ack-timeout`` (5 s), when the broker refuses it, or when the
connection ends while it is the oldest message in flight (the others in
flight are sent again at no cost).  A retry sends the identical envelope (the
broker re-ACKs an id it already has, so a retry never makes a second copy).  A lost connection
is reopened: 3 tries, one second apart.  Whatever is not acknowledged stays in
the outbox, and the next run sends it first.  docs/CLIENTS.md has the details.

Exit status: 0 if every message was acknowledged; 1 if not (the failures are
named, and kept in the outbox); 2 for bad usage or unusable keys.
"""
import argparse
import collections
import itertools
import sys
import time
from pathlib import Path

# Runnable as ``python bin/Sender.py`` from a checkout, without installing the package.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from ciphermq import cli, client, crypto, protocol  # noqa: E402  (needs the path above)
from ciphermq.errors import ConnectionLost, ProtocolError, ServerError  # noqa: E402
from ciphermq.outbox import Outbox, record  # noqa: E402
from ciphermq.store import CorruptFile  # noqa: E402

ATTEMPTS = 3                # per message, and per reconnection, as the document says
TEST_MESSAGE = "Hello, Receiver! This is a secure test message from CipherMQ."
#: With more messages than this, one progress line replaces the per-message lines (-v: all).
EACH_LINE_UP_TO = 10
ACCEPT_CHUNK = 1000         # new messages sealed and made durable per outbox fsync


class Pending:
    """One message on its way: its outbox record, its sends, and its failed attempts."""

    __slots__ = ("record", "sends", "failures")

    def __init__(self, outbox_record):
        self.record = outbox_record
        self.sends = 0
        self.failures = 0

    @property
    def id(self):
        return self.record["message_id"]


class Report:
    """The status lines, in the document's words; a progress line for many messages."""

    def __init__(self, total, verbose):
        self.total = total
        self.each = verbose or total <= EACH_LINE_UP_TO
        self.acked = 0
        self._started = time.monotonic()
        self._next_progress = self._started + 1.0

    def say(self, text):
        print(text, flush=True)

    def sending(self, pending):
        if self.each:
            attempt = ""
            if pending.failures:
                attempt = " (attempt %d of %d)" % (pending.failures + 1, ATTEMPTS)
            elif pending.sends > 1:
                attempt = " (again: the connection was lost)"
            self.say("🚀 [SENDER] Sending message %s%s..." % (pending.id, attempt))

    def acknowledged(self, pending):
        self.acked += 1
        if self.each:
            self.say("✅ [SENDER] Server ACK received for message %s" % pending.id)
        elif time.monotonic() >= self._next_progress:
            self._next_progress += 1.0
            self.progress()

    def removed(self, pending):
        if self.each:
            self.say("🗑️ [SENDER] Message %s removed from pending messages" % pending.id)

    def refused(self, pending, error):
        self.say("⚠️ [SENDER] Broker refused message %s: %s" % (pending.id, error))

    def failed(self, pending):
        self.say("❌ [SENDER] Failed to send message %s after %d attempts"
                 % (pending.id, ATTEMPTS))

    def progress(self):
        elapsed = time.monotonic() - self._started
        self.say("📊 [SENDER] %d of %d messages acknowledged (%.1f s, %.0f msg/s)"
                 % (self.acked, self.total, elapsed, self.acked / max(elapsed, 1e-9)))


class Sender:
    """Delivers the outbox's messages and new ones: windowed, retried, durable.

    Runs in the main thread; ``stop`` (set by SIGINT/SIGTERM) stops new
    sends, lets the in-flight ones finish, and ends the run.
    """

    def __init__(self, outbox, sealer, args, connect_options, stop):
        self.outbox = outbox
        self.sealer = sealer
        self.exchange = args.exchange
        self.routing_key = args.routing_key
        self.window = args.window
        self.ack_timeout = args.ack_timeout
        self.connect_options = connect_options
        self.stop = stop
        self.report = None
        self.queue = collections.deque()        # Pending, not in flight, next first
        self.in_flight = collections.deque()    # (Pending, Reply, ACK deadline), oldest first
        self.unaccepted = 0                     # new messages never accepted (stopped)

    def run(self, texts, verbose):
        """Accept ``texts`` into the outbox, send all it holds; return the exit status."""
        leftovers = len(self.outbox)
        if leftovers:
            print("📦 [SENDER] %d message(s) left in %s by an earlier run: sending them first"
                  % (leftovers, self.outbox.path), flush=True)
        self._accept(texts)
        self.queue.extend(Pending(r) for r in self.outbox.pending())
        self.report = Report(len(self.queue), verbose)
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
                    self._take_back_in_flight(time.monotonic())
        except ConnectionLost as exc:           # could not (re)connect: give up for now
            print("❌ [SENDER] %s" % exc, flush=True)
        finally:
            if connection is not None:
                connection.close()
        return self._summary()

    def _accept(self, texts):
        """Seal every new message and make it durable in the outbox before anything is sent.

        From here on no message of this run can be lost: a crash, a kill or
        giving up leaves it in the outbox for the next run.  One fsync per
        ACCEPT_CHUNK messages.
        """
        for start in range(0, len(texts), ACCEPT_CHUNK):
            if self.stop.is_set():
                self.unaccepted = len(texts) - start
                return
            self.outbox.add([record(self.sealer.seal(text), self.exchange, self.routing_key)
                             for text in texts[start:start + ACCEPT_CHUNK]])

    def _connect(self):
        def retrying(tries, error):
            print("🔌 [SENDER] %s (try %d of %d); retrying in 1 s" % (error, tries, ATTEMPTS),
                  flush=True)
        return client.connect(attempts=ATTEMPTS, stop=self.stop, on_retry=retrying,
                              timeout=self.ack_timeout, **self.connect_options)

    def _fill_window(self, connection):
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
        except ServerError as exc:              # refused (queue full, unroutable...)
            self.in_flight.popleft()
            self.report.refused(pending, exc)
            self._retry(pending, front=False, failed=True)  # after the others: give it time
            return
        except TimeoutError:
            raise TimeoutError("no ACK for message %s within %.1f s"
                               % (pending.id, self.ack_timeout)) from None
        self.in_flight.popleft()
        self.report.acknowledged(pending)
        self.outbox.remove(pending.id)
        self.report.removed(pending)

    def _take_back_in_flight(self, now):
        """Queue the in-flight messages again after the connection has ended.

        The oldest -- the one whose ACK was awaited -- has failed an attempt,
        and so has any whose own ACK is overdue; the others were only caught
        up in it and are sent again at no cost.
        """
        oldest = self.in_flight[0][0] if self.in_flight else None
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
        if not left and not self.unaccepted:
            return 0
        if left:
            names = [r["message_id"] for r in itertools.islice(self.outbox.pending(), 10)]
            print("❌ [SENDER] %d message(s) not acknowledged, kept in %s for the next run: %s%s"
                  % (left, self.outbox.path, ", ".join(names), ", ..." if left > 10 else ""),
                  flush=True)
        if self.unaccepted:
            print("❌ [SENDER] %d message(s) not accepted: stopped before they were written "
                  "to the outbox" % self.unaccepted, flush=True)
        return 1



def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="Sender.py", description="Encrypt messages for the receiver and publish them "
                                      "to a CipherMQ broker, keeping each until it is ACKed.")
    cli.add_connection_arguments(parser)
    parser.add_argument("--exchange", default="default_exchange",
                        help="exchange to publish to (default %(default)s)")
    parser.add_argument("--routing-key", default="default_key",
                        help="routing key (default %(default)s)")
    parser.add_argument("--public-key", default="keys/receiver_public.pem", type=Path,
                        help="the receiver's RSA public key (default %(default)s)")
    what = parser.add_argument_group("messages (with none of these: the document's test message)")
    what.add_argument("--message", action="append", default=[], metavar="TEXT",
                      help="a message to send (repeatable)")
    what.add_argument("--file", metavar="PATH",
                      help="send each line of PATH as one message (- for stdin)")
    what.add_argument("--count", type=int, metavar="N", help="send N generated test messages")
    parser.add_argument("--window", type=cli.positive_int, default=32,
                        help="publishes in flight before waiting for ACKs; 1 = one at a time, "
                             "as in the document (default %(default)s)")
    parser.add_argument("--ack-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="wait this long for each ACK before retrying (default 5)")
    parser.add_argument("--outbox", default="pending_messages.json", type=Path,
                        help="durable file of messages not yet ACKed (default %(default)s)")
    parser.add_argument("--key-reuse", type=cli.positive_int, default=1, metavar="N",
                        help="use one AES session key for up to N messages (default 1: a fresh "
                             "key, and an RSA operation, per message)")
    parser.add_argument("--signing-key", type=Path, metavar="PEM",
                        help="sign every envelope with this Ed25519 key (needs --sender)")
    parser.add_argument("--sender", metavar="NAME", help="the sender name put in envelopes")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="a status line for every message, and the client's log")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 0:
        parser.error("--count must not be negative")
    try:
        protocol.parse_name(args.exchange.encode(), "exchange")
        protocol.parse_routing_key(args.routing_key.encode())
    except ProtocolError as exc:
        parser.error(str(exc))
    return args


def read_messages(args):
    """The new messages this run should send, as a list of str."""
    texts = list(args.message)
    if args.file == "-":
        texts.extend(line.rstrip("\r\n") for line in sys.stdin)
    elif args.file is not None:
        with open(args.file, encoding="utf-8") as file:
            texts.extend(line.rstrip("\r\n") for line in file)
    if args.count is not None:
        texts.extend("Test message %d of %d" % (i, args.count) for i in range(1, args.count + 1))
    if not texts and args.file is None and args.count is None:
        texts.append(TEST_MESSAGE)
    return texts


def main(argv=None):
    args = parse_args(argv)
    cli.configure_logging(args.verbose)
    try:
        texts = read_messages(args)
        sealer = crypto.Sealer(args.public_key, key_reuse=args.key_reuse,
                               signing_key=args.signing_key, sender=args.sender)
        options = cli.connection_options(args)
    except (OSError, ValueError) as exc:
        print("❌ [SENDER] %s" % exc, file=sys.stderr)
        return 2
    try:
        outbox = Outbox(args.outbox)
    except (OSError, CorruptFile) as exc:
        print("❌ [SENDER] cannot use the outbox: %s" % exc, file=sys.stderr)
        return 1
    stop = cli.stop_on_signals()
    with outbox:
        try:
            return Sender(outbox, sealer, args, options, stop).run(texts, args.verbose)
        except ServerError as exc:              # authentication refused
            print("❌ [SENDER] %s" % exc, file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
