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

Record format, one per line (unchanged since the first journal: every
record has always carried its checksum, so every journal ever written is
read as it is)::

    <crc32 of payload, 8 hex digits> <payload>\\n

    Q <queue>                          queue declared
    X <exchange> <type>                exchange declared
    B <exchange> <queue> <key>         binding
    P <id> <queue>[,<queue>...] <json> message stored in these queues
    A <id> <queue>|* <wall ms>         copy acked (``*``: an id kept for dedup only)
    D <id> <from queue> <to queue>     copy dead-lettered
    U <queue> <id>[,<id>...] <wall ms> ready copies purged (settled like acks)
    R <dead queue> <queue> <id>[,...]  copies moved back from a dead-letter queue

Names never contain spaces or commas and the envelope JSON never contains a
newline (the protocol guarantees both), so a record is one line.

Damage.  A crash can leave the end of the file torn: damaged bytes with no
intact record after them.  Recovery cuts them off by itself (they were never
acknowledged) and keeps them in a new ``journal.torn-tail.<time>`` file.
Damaged bytes *followed by intact records* are not a crash artefact (a bad
disk, a stray edit): the broker refuses to start (:class:`JournalDamaged`,
exit status 4) and changes nothing, until it is started with ``--repair``,
which keeps every intact record, before and after the damage, and moves the
damaged bytes into a new ``journal.damaged.<time>`` file.  Saved files are
created exclusively: none is ever overwritten.

Failed writes.  A write or fsync that fails (a full disk, an I/O error) is
not the end: the batch goes back to the front of the buffer, the file is cut
back to its last good byte, and the writer tries again every
``retry_interval`` seconds.  Meanwhile :meth:`Journal.sync` raises
:class:`JournalWriteFailed` for every record a failed attempt covered (so
nothing is ACKed that is not fsynced), and :meth:`Journal.check_writable`
lets the broker refuse new publishes up front.  Once a write succeeds,
everything carries on.

Compaction.  When most of the file is dead (acked messages), the writer
thread asks the broker for a snapshot of what is live -- taken under the
broker mutex together with a *cut* of the buffer, so every record is either
in the snapshot or after it -- writes it to ``journal.log.tmp``, fsyncs,
renames it over ``journal.log`` and fsyncs the directory.  A crash at any
point leaves either the old file or the new one, each complete.  The next
compaction waits until the file is twice what the last one wrote (see
:meth:`Journal.wants_compaction`), so compactions are geometric even when
the snapshot is mostly remembered ids that no compaction can drop.
"""
import errno
import fcntl
import logging
import os
import re
import threading
import zlib
from pathlib import Path

from . import files
from .errors import JournalDamaged, JournalError, JournalWriteFailed, describe_os_error

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.log"
LOCK_NAME = "LOCK"
TORN_TAIL_PREFIX = "journal.torn-tail"
DAMAGED_PREFIX = "journal.damaged"

#: Exit status of ``python -m ciphermq.server`` when it refuses a damaged journal.
EXIT_DAMAGED = 4

_FULL_DISK = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def encode(payload):
    """One record line for ``payload`` (bytes without newline)."""
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _intact(line):
    """True if ``line`` (with its newline) is one whole record whose checksum matches."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return False
    try:
        return int(line[:8], 16) == zlib.crc32(line[9:-1])
    except ValueError:
        return False


_RECORD_START = re.compile(rb"[0-9a-f]{8} ")


def _record_inside(line):
    """Offset > 0 of an intact record that ends ``line``, if damage swallowed its start.

    A flipped newline joins a damaged record to the next one; that next
    record is still intact, from its own checksum to the line's end.
    """
    if not line.endswith(b"\n"):
        return None
    for match in _RECORD_START.finditer(line, 1):
        if _intact(line[match.start():]):
            return match.start()
    return None


class Scan:
    """What a journal file holds: intact records and damaged stretches, in file order."""

    def __init__(self, size):
        self.size = size
        self.records = []           # (start, end, payload) of each intact record
        self.damaged = []           # [start, end] of each damaged stretch

    @property
    def payloads(self):
        return [payload for _, _, payload in self.records]

    @property
    def torn_tail(self):
        """True if the only damage is at the very end (what a crash leaves)."""
        return (len(self.damaged) == 1 and self.damaged[0][1] == self.size
                and (not self.records or self.records[-1][1] <= self.damaged[0][0]))

    def intact_after(self, offset):
        return sum(1 for start, _, _ in self.records if start >= offset)


def scan(path):
    """Read ``path`` into a :class:`Scan`: every intact record, every damaged stretch."""
    offset = 0
    with open(path, "rb") as file:
        result = Scan(os.fstat(file.fileno()).st_size)
        for line in file:
            start, offset = offset, offset + len(line)
            if _intact(line):
                result.records.append((start, offset, line[9:-1]))
                continue
            inside = _record_inside(line)
            bad_end = offset if inside is None else start + inside
            if result.damaged and result.damaged[-1][1] == start:
                result.damaged[-1][1] = bad_end
            else:
                result.damaged.append([start, bad_end])
            if inside is not None:
                result.records.append((start + inside, offset, line[inside + 9:-1]))
    return result


def read_records(path):
    """Yield ``(payload, end_offset)`` for each intact record before any damage in ``path``."""
    result = scan(path)
    first_damage = result.damaged[0][0] if result.damaged else result.size
    for start, end, payload in result.records:
        if start >= first_damage:
            return
        yield payload, end


class Journal:
    """The append side: buffer, group-committed writes, retries, compaction.

    Lock order: the broker mutex may be held while calling :meth:`append`,
    :meth:`check_writable` or :meth:`cut` (which take ``_lock``); ``_lock``
    is never held while taking the broker mutex, writing or fsyncing.
    """

    def __init__(self, directory, *, compact_min_bytes=64 * 1024 * 1024, fsync=True,
                 retry_interval=1.0, repair=False):
        self.directory = Path(directory)
        self.path = self.directory / JOURNAL_NAME
        self.compact_min_bytes = compact_min_bytes
        self.retry_interval = retry_interval
        self.repair = repair
        self._fsync = fsync
        #: Guards everything below up to ``file_bytes``.  Conditions:
        #: ``has_work`` (notified when the buffer stops being empty, a
        #: compaction is asked for, or close() starts) and ``advanced``
        #: (notified when _durable moves on, a write attempt fails, or the
        #: journal fails for good).
        self._lock = threading.Lock()
        self.has_work = threading.Condition(self._lock)
        self.advanced = threading.Condition(self._lock)
        self._buffer = []           # record payloads appended, not yet written
        self._appended = 0          # sequence number of the last appended record
        self._durable = 0           # ... of the last record known to be on disk
        self._failed_upto = 0       # ... of the last record a failed write attempt covered
        self._cut_at = None         # set by cut(): (upto, snapshot records, buffer it replaced)
        self._compact_wanted = False
        self._closing = False
        self._write_error = None    # the OSError of the last attempt, None once one succeeds
        self._failed = None         # an unexpected error that stopped the writer for good
        #: Owned by the writer thread (read elsewhere without the lock: a
        #: stale value only moves one compaction a little).
        self.file_bytes = 0         # bytes in journal.log
        self.compactions = 0        # compactions done, for tests and the log
        self._compact_at = compact_min_bytes     # file size the next compaction waits for
        self._directory_unsynced = False         # a rename whose directory fsync failed
        self._fd = None
        self._lock_fd = None
        self._snapshot = None       # broker callback: writes a snapshot via cut()
        self._thread = None
        self.on_failure = None      # called (once, from the writer thread) if the writer dies

    # -- opening and recovery -------------------------------------------------

    def recover(self):
        """Lock the directory, cut a torn tail, and return the intact record payloads.

        Raises :class:`JournalDamaged` (changing nothing) when damage is
        followed by intact records, unless ``repair`` was asked for; raises
        JournalError when the directory cannot be used (saying so when the
        disk is full).
        """
        try:
            return self._recover()
        except OSError as exc:
            raise JournalError(_cannot("open the journal in %s" % self.directory, exc)) from None

    def _recover(self):
        files.make_private_directory(self.directory)
        self._take_directory_lock()
        leftover = self.path.with_suffix(".log.tmp")
        if os.path.lexists(leftover):   # a compaction that did not finish: the old file stands
            os.unlink(leftover)
        if not self.path.exists():
            return []
        result = scan(self.path)
        if result.damaged and not result.torn_tail:
            if not self.repair:
                raise JournalDamaged(self.path, result.damaged,
                                     result.intact_after(result.damaged[0][0]))
            self._repair(result)
        elif result.damaged:
            start, _ = result.damaged[0]
            saved = self._save_bytes(TORN_TAIL_PREFIX, [result.damaged[0]])
            log.warning("Journal %s: cut %d byte(s) of torn tail at offset %d (a write the "
                        "crash interrupted, never acknowledged); kept in %s",
                        self.path, result.size - start, start, saved)
            with open(self.path, "r+b") as file:
                file.truncate(start)
                os.fsync(file.fileno())
        self.file_bytes = self.path.stat().st_size
        return result.payloads

    def _repair(self, result):
        """Keep every intact record; move every damaged stretch into a new saved file."""
        saved = self._save_bytes(DAMAGED_PREFIX, result.damaged)
        temporary = self.path.with_suffix(".log.tmp")
        fd = files.create_exclusive(temporary)
        try:
            files.write_all(fd, b"".join(encode(payload) for payload in result.payloads))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        files.fsync_directory(self.directory)
        log.warning("Journal %s repaired: kept %d intact record(s); moved %d damaged byte(s) "
                    "from %d stretch(es) (first at offset %d) to %s",
                    self.path, len(result.records),
                    sum(end - start for start, end in result.damaged),
                    len(result.damaged), result.damaged[0][0], saved)

    def _save_bytes(self, prefix, stretches):
        """Copy the damaged ``stretches`` of journal.log into a new, unique file; its path."""
        path, fd = files.create_unique(self.directory, prefix)
        try:
            try:
                with open(self.path, "rb") as source:
                    for start, end in stretches:
                        source.seek(start)
                        files.write_all(fd, source.read(end - start))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            _remove_quietly(path)           # no half-saved file: the journal still has the bytes
            raise
        files.fsync_directory(self.directory)
        return path

    def start(self, snapshot):
        """Open for appending and start the writer thread.

        ``snapshot()`` is the broker's callback for compaction: it must call
        :meth:`cut` with the live state, under the broker mutex.
        """
        self._snapshot = snapshot
        try:
            self._fd = files.open_private(self.path, os.O_WRONLY | os.O_APPEND)
            files.fsync_directory(self.directory)
        except OSError as exc:
            raise JournalError(_cannot("open %s for writing" % self.path, exc)) from None
        free = _free_bytes(self.directory)
        if free is not None and free < 64 * 1024:
            log.warning("The disk of %s is full (%d bytes free): publishes will be refused "
                        "('Error: journal write failed: ...') until space is freed",
                        self.directory, free)
        self._thread = threading.Thread(target=self._write_forever, name="ciphermq-journal")
        self._thread.start()

    def _take_directory_lock(self):
        self._lock_fd = files.open_private(self.directory / LOCK_NAME, os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise JournalError("data directory %s is in use by another broker"
                               % self.directory) from None

    # -- appending (called with the broker mutex held) ---------------------------

    def check_writable(self):
        """Raise JournalWriteFailed while the disk refuses writes (call before a publish).

        Reads one attribute without the lock: a publish racing the first
        failure is caught by :meth:`sync` instead.
        """
        error = self._write_error
        if error is not None:
            raise JournalWriteFailed(error)

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
            self._cut_at = (self._appended, snapshot_records, self._buffer)
            self._buffer = []

    def wants_compaction(self, live_bytes):
        """True when the file is big enough and at least half of it is dead.

        "Big enough": at least ``compact_min_bytes`` and twice what the last
        compaction wrote.  The last compaction's output counts what no
        compaction can drop (the remembered acked ids of the dedup window),
        which ``live_bytes`` does not: without this rule a journal full of
        remembered ids would be rewritten on every ack.  With it, each
        compaction is paid for by at least as many bytes appended since.
        """
        return self.file_bytes >= self._compact_at and live_bytes * 2 < self.file_bytes

    def request_compaction(self):
        with self._lock:
            if not self._compact_wanted:
                self._compact_wanted = True
                self.has_work.notify()

    # -- waiting ------------------------------------------------------------

    def sync(self, timeout=None):
        """Block until every record appended before this call is on disk.

        Returns False if ``timeout`` passed first.  Raises JournalWriteFailed
        if a write attempt that covered those records failed (the writer
        keeps trying; nothing of theirs may be acknowledged now), and
        JournalError if the journal has failed for good.
        """
        with self._lock:
            target = self._appended
            ok = self.advanced.wait_for(
                lambda: (self._durable >= target or self._failed_upto >= target
                         or self._failed is not None), timeout)
            if self._durable >= target:
                return True
            if self._failed is not None:
                raise JournalError("journal failed: %s" % self._failed)
            if self._failed_upto >= target:
                raise JournalWriteFailed(self._write_error)
            return ok

    @property
    def write_error(self):
        """The OSError of the last failed write attempt, or None once a write succeeds."""
        return self._write_error

    def wait_until_writable(self, timeout=None):
        """Block until no write is failing (for tests and monitoring); False on timeout."""
        with self._lock:
            return self.advanced.wait_for(lambda: self._write_error is None, timeout)

    # -- the writer thread ----------------------------------------------------

    def _write_forever(self):
        try:
            self._write_until_closed()
        except Exception as exc:        # a bug, not a disk error: stop for good, loudly
            log.exception("Journal writer stopped")
            self._fail(exc)

    def _write_until_closed(self):
        while True:
            with self._lock:
                if self._write_error is not None:   # back off before trying the disk again
                    self.has_work.wait_for(lambda: self._closing, self.retry_interval)
                self.has_work.wait_for(
                    lambda: self._buffer or self._compact_wanted or self._closing)
                compact = self._compact_wanted and self._write_error is None
                self._compact_wanted = False
                batch = upto = None
                if self._buffer and not compact:
                    batch, self._buffer = self._buffer, []
                    upto = self._appended
                elif not compact:
                    if self._closing:
                        return              # closing, and everything is written
                    continue
            try:
                if compact:
                    self._compact()
                else:
                    self._write_batch(batch, upto)
            except OSError as exc:
                self._write_failed(exc, batch or [], upto)
                if self._closing:
                    log.error("Journal %s: %d record(s) not written at close: %s",
                              self.path, len(self._buffer), describe_os_error(exc))
                    return

    def _write_batch(self, batch, upto):
        self._back_to_last_good_byte()
        data = b"".join([encode(payload) for payload in batch])
        files.write_all(self._fd, data)
        if self._fsync:
            os.fdatasync(self._fd)
        self.file_bytes += len(data)
        self._advance(upto)

    def _back_to_last_good_byte(self):
        """Before writing: undo what a failed attempt left (a partial write, a rename unsynced)."""
        if self._fd is None:
            self._fd = files.open_private(self.path, os.O_WRONLY | os.O_APPEND)
        if self._directory_unsynced:
            files.fsync_directory(self.directory)
            self._directory_unsynced = False
        if self._write_error is not None and os.fstat(self._fd).st_size != self.file_bytes:
            os.ftruncate(self._fd, self.file_bytes)

    def _compact(self):
        before = self.file_bytes
        self._snapshot()                    # calls cut() under the broker mutex
        with self._lock:
            upto, records, replaced = self._cut_at
            self._cut_at = None
        temporary = self.path.with_suffix(".log.tmp")
        written = 0
        try:
            fd = files.create_exclusive(temporary)
            try:
                for payload in records:
                    line = encode(payload)
                    files.write_all(fd, line)
                    written += len(line)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except OSError as exc:
            _remove_quietly(temporary)
            with self._lock:                # the old file stands: write the cut records to it
                self._buffer[:0] = replaced
            self._compact_at = max(self._compact_at, 2 * self.file_bytes)
            log.warning("Journal compaction failed, the journal stays as it is (next try at "
                        "%d bytes): %s", self._compact_at, describe_os_error(exc))
            return
        # From here on the new file is journal.log: nothing may be written to the old one.
        old_fd, self._fd = self._fd, None
        _close_quietly(old_fd)
        self.file_bytes = written
        self._compact_at = max(self.compact_min_bytes, 2 * written)
        self.compactions += 1
        self._directory_unsynced = True     # until the directory fsync, the rename may not last
        try:
            self._back_to_last_good_byte()
        except OSError as exc:
            self._write_failed(exc, [], upto)
            return
        self._advance(upto)
        log.info("Journal compacted: %d -> %d bytes", before, written)

    def _advance(self, upto):
        with self._lock:
            if upto > self._durable:
                self._durable = upto
            recovered, self._write_error = self._write_error, None
            self.advanced.notify_all()
        if recovered is not None:
            log.warning("Journal %s: writes succeed again; publishing resumes", self.path)

    def _write_failed(self, exc, batch, upto):
        """A write, fsync or rename failed: keep the records, tell the waiters, retry later."""
        with self._lock:
            first = self._write_error is None
            self._write_error = exc
            self._buffer[:0] = batch
            if upto is not None and upto > self._failed_upto:
                self._failed_upto = upto
            self.advanced.notify_all()
        if first:
            log.error("Journal write failed (%s): publishes are refused and retried every "
                      "%.1f s until a write succeeds", describe_os_error(exc), self.retry_interval)

    def _fail(self, exc):
        log.critical("Journal stopped, nothing more will be acknowledged: %s", exc)
        with self._lock:
            self._failed = exc
            self.advanced.notify_all()
        if self.on_failure is not None:
            self.on_failure()

    # -- closing ------------------------------------------------------------

    def close(self, timeout=10.0):
        """Write what is buffered (one last try if the disk is failing), stop, release."""
        if self._thread is not None:
            with self._lock:
                self._closing = True
                self.has_work.notify()
            self._thread.join(timeout)
            self._thread = None
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name)
            setattr(self, name, None)
            _close_quietly(fd)


def _cannot(what, exc):
    """A start-up failure as one sentence that says when the disk is full."""
    if exc.errno in _FULL_DISK:
        return "cannot %s: the disk is full (%s)" % (what, describe_os_error(exc))
    return "cannot %s: %s" % (what, describe_os_error(exc))


def _free_bytes(directory):
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _close_quietly(fd):
    """Close a descriptor; a failure (EIO on some filesystems) is logged, never raised."""
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError as exc:
        log.error("Closing a journal file failed: %s", describe_os_error(exc))


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
