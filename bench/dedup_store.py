"""What the receiver's dedup store costs: bytes per remembered id, start-up time per million lines.

    .venv/bin/python bench/dedup_store.py [--lines N]

Writes N output lines like bin/Receiver.py's (a uuid4 id, a 40-byte message,
a timestamp, an envelope digest) to a temporary file, then opens it as a
:class:`~ciphermq.store.MessageStore` -- what the receiver does at start --
and prints the time that took (also per million lines) and the memory the
loaded store holds per id (tracemalloc, in a second load).  docs/CLIENTS.md
quotes the figures.
"""
import argparse
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ciphermq.store import MessageStore  # noqa: E402


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as file:
        for number in range(lines):
            file.write(json.dumps({
                "message_id": str(uuid.uuid4()), "message": "message %032d" % number,
                "timestamp": "2026-11-28T05:52:00.000+00:00",
                "envelope_digest": os.urandom(16).hex()}) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "received_messages.json"
        write_lines(path, args.lines)
        size = path.stat().st_size
        gc.collect()
        started = time.perf_counter()
        store = MessageStore(path)
        seconds = time.perf_counter() - started
        assert len(store) == args.lines
        store.close()
        del store
        gc.collect()
        tracemalloc.start()
        store = MessageStore(path)
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        store.close()
    print("lines                  %d (%.1f MB file, %d bytes a line)"
          % (args.lines, size / 1e6, size // args.lines))
    print("start-up               %.2f s, %.1f s per million lines"
          % (seconds, seconds * 1e6 / args.lines))
    print("memory held            %.1f MB, %d bytes per remembered id (id + digest + dict slot)"
          % (held / 1e6, held // args.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
