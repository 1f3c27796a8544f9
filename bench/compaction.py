"""How often the journal compacts when acked ids pile up in the dedup window (issue 11).

    .venv/bin/python bench/compaction.py [--messages N] [--min-bytes B] [--body-bytes S]

In-process, no sockets: a :class:`~ciphermq.broker.Broker` with a
:class:`~ciphermq.journal.Journal` (fsync off, to measure the rewriting, not
the disk) publishes, fetches and acks N messages one at a time, waiting for
the journal after each ack.  Every acked id stays in the dedup window, so
every compaction must rewrite all of them.  Prints the number of
compactions, the time and the time per publish+ack cycle.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ciphermq.broker import Broker  # noqa: E402
from ciphermq.journal import Journal  # noqa: E402


def run(messages, min_bytes, body_bytes):
    compactions = []
    real_compact = Journal._compact

    def counting(journal):
        compactions.append(journal.file_bytes)
        real_compact(journal)
    Journal._compact = counting
    try:
        with tempfile.TemporaryDirectory() as directory:
            journal = Journal(directory, compact_min_bytes=min_bytes, fsync=False)
            broker = Broker(journal=journal)
            journal.recover()
            journal.start(snapshot=broker.snapshot_to_journal)
            try:
                broker.declare_defaults()
                session = broker.open_session("bench")
                body = b'{"ciphertext": "%s"}' % (b"x" * body_bytes)
                started = time.perf_counter()
                for i in range(messages):
                    message_id = "id-%08d" % i
                    broker.publish("default_exchange", "default_key", message_id, body)
                    broker.consume(session, "default_queue")
                    broker.acknowledge(session, message_id)
                    broker.sync(60)
                elapsed = time.perf_counter() - started
            finally:
                journal.close()
    finally:
        Journal._compact = real_compact
    return len(compactions), elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--min-bytes", type=int, default=64 * 1024)
    parser.add_argument("--body-bytes", type=int, default=100)
    args = parser.parse_args(argv)
    count, elapsed = run(args.messages, args.min_bytes, args.body_bytes)
    print("%d publish+ack cycles, --compact-min-bytes %d: %d compactions, %.2f s, %.0f us per "
          "cycle" % (args.messages, args.min_bytes, count, elapsed, elapsed / args.messages * 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
