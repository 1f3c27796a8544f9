"""Receive, decrypt and store messages: each exactly once, even across crashes.

    python bin/Receiver.py                        # default_queue -> received_messages.json
    python bin/Receiver.py --max-messages 5 -v    # stop after 5 new messages

The design document's receiver: ``receive_messages`` takes what the broker
pushes, ``decrypt_message_hybrid`` opens it, ``process_messages`` stores it in
``received_messages.json`` -- fsynced *before* its ack, so nothing acked is
lost -- and that file is ``processed_messages`` too (read back at start).
``signal_handler``: SIGINT/SIGTERM finish the messages in hand, exit 0; a full
disk stops it with one ❌ line and exit status 74, nothing unwritten acked.  The
machinery (batches, ack re-sending, decrypt threads, reconnecting) is in
ciphermq/receiver.py; docs/CLIENTS.md explains why this is exactly once.
"""
import argparse
import functools
import json
import signal
import sys
import threading
from pathlib import Path

# Runnable as ``python bin/Receiver.py`` from a checkout, without installing the package.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from ciphermq import cli  # noqa: E402  (needs the path above)

cli.require_pycryptodome("Receiver.py")     # else one line saying what to run, no traceback
from ciphermq import crypto  # noqa: E402
from ciphermq import receiver as receiving  # noqa: E402
from ciphermq.errors import CorruptFile, DecryptionError, OutputWriteFailed, ServerError, UsageError  # noqa: E402
from ciphermq.receiver import WRITE_FAILED, CrashHook, Receiver, open_store  # noqa: E402

#: Set by signal_handler; the receive loop looks at it at least every 0.25 s.
STOP = threading.Event()


def signal_handler(signum, frame):
    """SIGINT or SIGTERM: stop taking messages; the ones in hand are stored and acked."""
    STOP.set()


def decrypt_message_hybrid(opener, delivery):
    """``(message, None)``, or ``(None, reason)``: RSA-OAEP unwraps the session key, AES-GCM
    checks the tag and decrypts (``opener`` holds the private key and the --strict rules)."""
    try:
        envelope = json.loads(delivery.body)
    except ValueError:
        return None, "envelope is not valid JSON"
    try:
        return opener.open(envelope, expected_id=delivery.message_id), None
    except DecryptionError as exc:
        return None, exc.reason


def process_messages(receiver, batch):
    """Store the batch's new messages durably, then ack them all: dedup check, decrypt,
    append, flush + fsync, ack, in that order (:meth:`Receiver.store_then_ack`)."""
    receiver.store_then_ack(batch)


def receive_messages(receiver):
    """Take messages until stopped, --max-messages or --idle-exit; the exit status.
    Between batches, ack confirmations are collected and overdue acks sent again."""
    try:
        while not receiver.finished():
            if receiver.connection is None and not receiver.connect():
                break
            batch = receiver.next_batch()
            if batch:
                process_messages(receiver, batch)
            receiver.tend_acks()
    finally:
        receiver.finish()
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="Receiver.py", description="Receive, decrypt and store CipherMQ messages, "
                                        "each exactly once.")
    cli.add_connection_arguments(parser, declare=("exchange", "routing_key"))
    parser.add_argument("--queue", default="default_queue",
                        help="queue to consume (default %(default)s)")
    parser.add_argument("--private-key", default=cli.default_key("receiver_private.pem"),
                        type=Path, help="the receiver's RSA private key (default: keys/ of "
                                        "this checkout, as `make keys` writes it)")
    parser.add_argument("--output", default="received_messages.json", type=Path,
                        help="messages, one JSON line each; the dedup store (default %(default)s)")
    receiving.add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="a status line for every message, and the client's log")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cli.configure_logging(args.verbose)
    try:
        hook = CrashHook.from_environment()
        opener = crypto.Opener(args.private_key, strict=args.strict,
                               trusted_senders=args.trusted_senders,
                               require_signature=args.require_signature,
                               max_age_seconds=args.max_age)
        options = cli.connection_options(args)
    except UsageError as exc:                   # KeyFileError too
        print("❌ [RECEIVER] %s" % cli.key_error(exc, "--private-key"), file=sys.stderr)
        return 2
    try:
        store = open_store(args.output)
    except (OSError, CorruptFile) as exc:
        print("❌ [RECEIVER] cannot use the output file: %s" % exc, file=sys.stderr)
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal_handler)
    print("📂 [RECEIVER] %d message(s) already in %s" % (len(store), args.output), flush=True)
    receiver = Receiver(functools.partial(decrypt_message_hybrid, opener), store, hook=hook,
                        queue_name=args.queue, rejects_path=args.rejects, connect_options=options,
                        stop=STOP, prefetch=args.prefetch, ack_batch=args.ack_batch,
                        decrypt_threads=args.decrypt_threads, ack_timeout=args.ack_timeout,
                        max_messages=args.max_messages, idle_exit=args.idle_exit,
                        verbose=args.verbose)
    try:
        return receive_messages(receiver)
    except ServerError as exc:          # authentication refused, or an unknown queue
        print("❌ [RECEIVER] %s" % exc, file=sys.stderr)
        return 1
    except OutputWriteFailed as exc:    # full disk, I/O error: nothing unwritten was acked
        print("❌ [RECEIVER] %s; stopped without acking what it could not store"
              % exc, file=sys.stderr)
        return WRITE_FAILED


if __name__ == "__main__":
    sys.exit(main())
