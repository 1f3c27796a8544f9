"""Encrypt messages for the receiver and publish them, losing none.

    python bin/Sender.py                              # the document's test message
    python bin/Sender.py --message "hi" --message "there"
    python bin/Sender.py --count 1000 --window 64     # generated test messages
    python bin/Sender.py --file messages.txt          # one message per line; - = stdin

The design document's sender, step by step: ``encrypt_message_hybrid`` seals
each message, ``send_message`` keeps it in ``pending_messages`` (a file here:
the outbox) until ``ACK <id>`` arrives, retrying 3 times with a 5 s timeout.
What we add -- the outbox written before the first send, a window of
publishes in flight, reconnection -- is in ciphermq/sender.py; docs/CLIENTS.md
has the details.

Exit status: 0 if every message was acknowledged; 1 if not (the failures are
named: kept in the outbox, moved to the rejects file if the broker refused
them for good, or too large to send); 2 for bad usage or unusable keys.
"""
import argparse
import sys
from pathlib import Path

# Runnable as ``python bin/Sender.py`` from a checkout, without installing the package.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from ciphermq import cli  # noqa: E402  (needs the path above)

cli.require_pycryptodome("Sender.py")   # else one line saying what to run, not a traceback
from ciphermq import crypto, protocol  # noqa: E402
from ciphermq import sender as delivery  # noqa: E402
from ciphermq.errors import CorruptFile, ProtocolError, ServerError, UsageError  # noqa: E402
from ciphermq.outbox import Outbox  # noqa: E402
from ciphermq.sender import Record, Rejects, Sender  # noqa: E402

TEST_MESSAGE = "Hello, Receiver! This is a secure test message from CipherMQ."


def encrypt_message_hybrid(sealer, message):
    """The envelope for ``message``: AES-GCM under a session key that RSA-OAEP wraps.

    ``sealer`` (a :class:`ciphermq.crypto.Sealer`) holds the receiver's public
    key; it fixes the message_id, and signs the envelope with --signing-key.
    """
    return sealer.seal(message)


def send_message(sender, texts, sealer):
    """Keep every message in pending_messages until the broker ACKs it; the exit status.

    First each new message is encrypted and written, fsynced, to the outbox;
    then the outbox -- an earlier run's leftovers first -- is published, each
    message retried up to 3 times until ``ACK <id>`` comes back.
    """
    overhead = delivery.publish_overhead(sealer, sender.exchange, sender.routing_key)
    sender.accept(texts, lambda text: encrypt_message_hybrid(sealer, text), overhead)
    return sender.deliver()


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="Sender.py", description="Encrypt messages for the receiver and publish them "
                                      "to a CipherMQ broker, keeping each until it is ACKed.")
    cli.add_connection_arguments(parser, declare=("queue",))
    parser.add_argument("--exchange", default="default_exchange",
                        help="exchange to publish to (default %(default)s)")
    parser.add_argument("--routing-key", default="default_key",
                        help="routing key (default %(default)s)")
    parser.add_argument("--public-key", default=cli.default_key("receiver_public.pem"),
                        type=Path, help="the receiver's RSA public key (default: keys/ of this "
                                        "checkout, as `make keys` writes it)")
    what = parser.add_argument_group("messages (with none of these: the document's test message)")
    what.add_argument("--message", action="append", default=[], metavar="TEXT",
                      help="a message to send (repeatable)")
    what.add_argument("--file", metavar="PATH",
                      help="send each line of PATH as one message (- for stdin)")
    what.add_argument("--count", type=int, metavar="N", help="send N generated test messages")
    delivery.add_arguments(parser)
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
        sealer = crypto.Sealer(args.public_key, version=args.envelope_version, sender=args.sender,
                               key_reuse=args.key_reuse, signing_key=args.signing_key)
        options = cli.connection_options(args)
    except (UsageError, OSError, UnicodeError) as exc:  # the last two: reading --file
        print("❌ [SENDER] %s" % cli.key_error(exc, "--public-key"), file=sys.stderr)
        return 2
    try:
        record = Record(args.record) if args.record else None     # first: it changes nothing
        outbox = Outbox(args.outbox)
        rejects = Rejects(args.rejects or args.outbox.with_name(delivery.DEFAULT_REJECTS))
    except (OSError, CorruptFile) as exc:
        print("❌ [SENDER] cannot use the outbox, rejects or record: %s" % exc, file=sys.stderr)
        return 1
    sender = Sender(outbox, exchange=args.exchange, routing_key=args.routing_key,
                    window=args.window, ack_timeout=args.ack_timeout, connect_options=options,
                    stop=cli.stop_on_signals(), record=record, verbose=args.verbose,
                    rejects=rejects, max_line_bytes=args.max_line_bytes)
    with outbox, rejects:
        try:
            return send_message(sender, texts, sealer)
        except ServerError as exc:              # authentication refused
            print("❌ [SENDER] %s" % exc, file=sys.stderr)
            return 1
        finally:
            if record is not None:
                record.close()


if __name__ == "__main__":
    sys.exit(main())
