"""The broker's journal: an append-only file that makes ``ACK <id>`` mean "on disk".

With ``--data-dir DIR`` every change that must survive a crash is appended to
``DIR/journal.log`` -- declarations, bindings, each accepted publish, each ack
and each dead-lettering -- and a publisher hears ``ACK <id>`` only after the
record of its publish has been written and fsynced.

Group commit.  Records are appended to an in-memory buffer (cheap, under the
broker mutex); one writer thread, ``ciphermq-journal``, takes everything
buffered, writes it and fsyncs once.  While it waits for the disk, new
records pile up and share the next fsync, so many concurrent publishers pay
for one fsync between them.

Record format, one per line::

    <crc32 of payload, 8 hex digits> <payload>\\n

    Q <queue>                          queue declared
    X <exchange> <type>                exchange declared
    B <exchange> <queue> <key>         binding
    P <id> <queue>[,<queue>...] <json> message stored in these queues
    A <id> <queue>|* <wall ms>         copy acked (``*``: an id kept for dedup only)
    D <id> <from queue> <to queue>     copy dead-lettered

Names never contain spaces or commas and the envelope JSON never contains a
newline (the protocol guarantees both), so a record is one line.  A crash can
leave the last line torn; its checksum (or missing newline) gives it away and
recovery cuts the file back to the last whole record.  Nothing before it is
lost, and the torn record was never acknowledged.

Compaction.  When most of the file is dead (acked messages), the writer
thread asks the broker for a snapshot of what is live -- taken under the
broker mutex together with a *cut* of the buffer, so every record is either
in the snapshot or after it -- writes it to ``journal.log.tmp``, fsyncs,
renames it over ``journal.log`` and fsyncs the directory.  A crash at any
point leaves either the old file or the new one, each complete.
"""
import fcntl
import logging
import os
import threading
import zlib
from pathlib import Path

from .errors import JournalError

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.log"
LOCK_NAME = "LOCK"


def encode(payload):
    """One record line for ``payload`` (bytes without newline)."""
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def read_records(path):
    """Yield ``(payload, end_offset)`` for each whole, intact record in ``path``.

    Stops at the first torn or corrupt line; the caller cuts the file there.
    """
    offset = 0
    with open(path, "rb") as file:
        for line in file:
            if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
                return
            payload = line[9:-1]
            try:
                intact = int(line[:8], 16) == zlib.crc32(payload)
            except ValueError:
                intact = False
            if not intact:
                return
            offset += len(line)
            yield payload, offset


class Journal:
    """The append side: buffer, group-committed writes, compaction.

    Lock order: the broker mutex may be held while calling :meth:`append` or
    :meth:`cut` (which take ``_lock``); ``_lock`` is never held while taking
    the broker mutex, writing or fsyncing.
    """

    def __init__(self, directory, *, compact_min_bytes=64 * 1024 * 1024, fsync=True):
        self.directory = Path(directory)
        self.path = self.directory / JOURNAL_NAME
        self.compact_min_bytes = compact_min_bytes
        self._fsync = fsync
        #: Guards everything below.  Conditions: ``has_work`` (notified when
        #: the buffer stops being empty, a compaction is asked for, or close()
        #: starts) and ``advanced`` (notified when _durable moves on or the
        #: journal fails).
        self._lock = threading.Lock()
        self.has_work = threading.Condition(self._lock)
        self.advanced = threading.Condition(self._lock)
        self._buffer = []           # record payloads appended, not yet written
        self._appended = 0          # sequence number of the last appended record
        self._durable = 0           # ... of the last record known to be on disk
        self._cut_at = None         # set by cut(): the snapshot replaces records up to here
        self._compact_wanted = False
        self._closing = False
        self._failed = None         # the OSError that stopped the journal
        self.file_bytes = 0         # bytes in journal.log (for the compaction rule)
        self._file = None
        self._lock_file = None
        self._snapshot = None       # broker callback: writes a snapshot via cut()
        self._thread = None
        self.on_failure = None      # called (once, from the writer thread) if writing fails

    # -- opening and recovery -------------------------------------------------

    def recover(self):
        """Lock the directory, cut a torn tail, and return the intact record payloads."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._take_directory_lock()
        leftover = self.path.with_suffix(".log.tmp")
        if leftover.exists():           # a compaction that did not finish: the old file stands
            leftover.unlink()
        payloads, good_bytes = [], 0
        if self.path.exists():
            for payload, end in read_records(self.path):
                payloads.append(payload)
                good_bytes = end
            size = self.path.stat().st_size
            if size > good_bytes:
                log.warning("Journal %s: cutting %d bytes of torn or corrupt tail at offset %d",
                            self.path, size - good_bytes, good_bytes)
                self._keep_corrupt_tail(good_bytes)
                with open(self.path, "r+b") as file:
                    file.truncate(good_bytes)
                    os.fsync(file.fileno())
        self.file_bytes = good_bytes
        return payloads

    def start(self, snapshot):
        """Open for appending and start the writer thread.

        ``snapshot()`` is the broker's callback for compaction: it must call
        :meth:`cut` with the live state, under the broker mutex.
        """
        self._snapshot = snapshot
        self._file = open(self.path, "ab")
        _fsync_directory(self.directory)
        self._thread = threading.Thread(target=self._write_forever, name="ciphermq-journal")
        self._thread.start()

    def _take_directory_lock(self):
        self._lock_file = open(self.directory / LOCK_NAME, "a+b")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise JournalError("data directory %s is in use by another broker"
                               % self.directory) from None

    def _keep_corrupt_tail(self, good_bytes):
        """Keep the bytes recovery cuts off, for a student (or an operator) to look at."""
        with open(self.path, "rb") as source:
            source.seek(good_bytes)
            tail = source.read()
        (self.directory / "journal.corrupt-tail").write_bytes(tail)

    # -- appending (called with the broker mutex held) ---------------------------

    def append(self, payload):
        """Buffer one record; return its sequence number.  Never blocks on I/O."""
        with self._lock:
            if self._failed is not None:
                raise JournalError("journal failed: %s" % self._failed)
            if not self._buffer:
                self.has_work.notify()
            self._buffer.append(payload)
            self._appended += 1
            return self._appended

    def cut(self, snapshot_records):
        """Replace everything appended so far by ``snapshot_records`` (an iterable of payloads).

        Only called by the broker's snapshot callback, under the broker mutex,
        so the snapshot and the cut describe the same instant.
        """
        with self._lock:
            self._buffer = []
            self._cut_at = (self._appended, snapshot_records)

    def wants_compaction(self, live_bytes):
        """True when the file is big and at least three quarters of it is dead."""
        return self.file_bytes >= self.compact_min_bytes and live_bytes * 4 < self.file_bytes

    def request_compaction(self):
        with self._lock:
            if not self._compact_wanted:
                self._compact_wanted = True
                self.has_work.notify()

    # -- waiting ------------------------------------------------------------

    def sync(self, timeout=None):
        """Block until every record appended before this call is on disk.

        Returns False if ``timeout`` passed first; raises JournalError if the
        journal has failed (then nothing may be acknowledged).
        """
        with self._lock:
            target = self._appended
            ok = self.advanced.wait_for(
                lambda: self._durable >= target or self._failed is not None, timeout)
            if self._failed is not None:
                raise JournalError("journal failed: %s" % self._failed)
            return ok

    # -- the writer thread ----------------------------------------------------

    def _write_forever(self):
        try:
            while True:
                with self._lock:
                    self.has_work.wait_for(
                        lambda: self._buffer or self._compact_wanted or self._closing)
                    if self._compact_wanted:
                        self._compact_wanted = False
                        batch = None
                    elif self._buffer:
                        batch, self._buffer = self._buffer, []
                        upto = self._appended
                    else:
                        return              # closing, and everything is written
                if batch is None:
                    self._compact()
                else:
                    self._write_batch(batch, upto)
        except OSError as exc:
            self._fail(exc)

    def _write_batch(self, batch, upto):
        data = b"".join([encode(payload) for payload in batch])
        self._file.write(data)
        self._file.flush()
        if self._fsync:
            os.fdatasync(self._file.fileno())
        self.file_bytes += len(data)
        self._advance(upto)

    def _compact(self):
        before = self.file_bytes
        self._snapshot()                    # calls cut() under the broker mutex
        with self._lock:
            upto, records = self._cut_at
            self._cut_at = None
        temporary = self.path.with_suffix(".log.tmp")
        written = 0
        with open(temporary, "wb") as file:
            for payload in records:
                line = encode(payload)
                file.write(line)
                written += len(line)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
        _fsync_directory(self.directory)
        self._file.close()
        self._file = open(self.path, "ab")
        self.file_bytes = written
        self._advance(upto)
        log.info("Journal compacted: %d -> %d bytes", before, written)

    def _advance(self, upto):
        with self._lock:
            if upto > self._durable:
                self._durable = upto
            self.advanced.notify_all()

    def _fail(self, exc):
        log.critical("Journal write failed, nothing more will be acknowledged: %s", exc)
        with self._lock:
            self._failed = exc
            self.advanced.notify_all()
        if self.on_failure is not None:
            self.on_failure()

    # -- closing ------------------------------------------------------------

    def close(self, timeout=10.0):
        """Write what is buffered, stop the writer thread, release the directory."""
        if self._thread is not None:
            with self._lock:
                self._closing = True
                self.has_work.notify()
            self._thread.join(timeout)
            self._thread = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def _fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
