"""Append-only JSON-lines files that survive a crash at any byte.

The receiver's output file (which is also its dedup store), its rejects file
and the sender's outbox (:mod:`ciphermq.outbox`) are files of one JSON object
per line, only ever appended to.  A record counts once its whole line,
newline included, is in the file: the newline is a line's last byte, so a
process killed mid-write leaves at most one torn line, at the end, without
its newline.  :class:`JsonLinesFile` finds such a tail when the file is
opened and cuts it off.

Durability has two levels, and the callers choose:

* :meth:`JsonLinesFile.flush` hands the bytes to the operating system: they
  survive the process being killed, not the machine losing power;
* :meth:`JsonLinesFile.sync` also fsyncs: they survive both.  The receiver
  acks a message only after the sync that covers its record.

None of these classes is thread-safe: each file has one owner thread.
"""
import json
import os
import tempfile
from pathlib import Path

from . import files
from .errors import CorruptFile


def encode(record):
    """One record as its line: compact, readable JSON (non-ASCII kept), then a newline."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


class JsonLinesFile:
    """An append-only file of JSON objects, one per line.

    Opening reads every intact record and passes it to the :meth:`loaded`
    hook (subclasses rebuild their state there); a torn last line is cut off
    and its length kept in ``torn_bytes``.  Raises CorruptFile if a line
    before the last is not a JSON object, OSError if the file cannot be
    read or created.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.torn_bytes = 0
        self.records_loaded = 0
        if self.path.exists():
            self._load()
            self._file = files.open_append(self.path)
        else:                       # created 0600: it may hold plaintext (see files.py)
            self._file = files.open_append(self.path)
            files.fsync_directory(self.path.parent)     # the new name must survive too

    def loaded(self, record):
        """Hook: called with each intact record (a dict) when the file is opened."""

    def _load(self):
        intact_end = 0              # offset just past the last intact line
        bad_line = None             # (number, reason) of an invalid line, if one was seen
        with files.open_existing(self.path) as file:
            for number, line in enumerate(file, 1):
                if bad_line is not None:
                    raise CorruptFile("%s: line %d %s; it is not the last line, so it is "
                                      "not a torn write" % (self.path, *bad_line))
                reason = None
                if not line.endswith(b"\n"):
                    reason = "has no newline"
                else:
                    try:
                        record = json.loads(line)
                    except ValueError:      # also UnicodeDecodeError
                        record = None
                    if isinstance(record, dict):
                        self.loaded(record)
                        self.records_loaded += 1
                        intact_end += len(line)
                        continue
                    reason = "is not a JSON object"
                bad_line = (number, reason)
            size = file.tell()
            if intact_end < size:
                # A crash mid-write (or a power loss) left a torn tail: cut it off.
                file.truncate(intact_end)
                file.flush()
                os.fsync(file.fileno())
                self.torn_bytes = size - intact_end

    def append(self, record):
        """Buffer one record (a dict) for writing.  Not durable until flush/sync."""
        self._file.write(encode(record))

    def write(self, data):
        """Buffer raw bytes (for a test hook that simulates a torn write)."""
        self._file.write(data)

    def flush(self):
        """Hand buffered records to the OS: they survive a process crash."""
        self._file.flush()

    def sync(self):
        """Flush and fsync: the records survive a crash of the process or the machine."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def rewrite(self, records):
        """Atomically replace the whole file with ``records``.

        Written to a temporary file in the same directory, fsynced, renamed
        over the old one and the directory fsynced: a crash at any point
        leaves either the old file or the new one, never a mixture.
        """
        self._file.close()
        # mkstemp: a new random name, O_EXCL|O_NOFOLLOW, mode 0600 -- what files.py asks for.
        fd, temp_path = tempfile.mkstemp(dir=str(self.path.parent),
                                         prefix=self.path.name + ".", suffix=".tmp")
        try:
            with open(fd, "wb") as temp:
                for record in records:
                    temp.write(encode(record))
                temp.flush()
                os.fsync(temp.fileno())
            os.replace(temp_path, self.path)
        except BaseException:
            _remove_quietly(temp_path)
            raise
        finally:
            self._file = files.open_append(self.path)
        files.fsync_directory(self.path.parent)

    def close(self):
        """Flush and close; safe to call twice."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class MessageStore(JsonLinesFile):
    """The receiver's output file, which is also its dedup store.

    Each line is ``{"message_id", "message", "timestamp", "envelope_digest"}``
    (the digest -- 32 hex digits, see :func:`ciphermq.receiver.envelope_digest`
    -- binds the id to the envelope it came in; older files lack it).  Opening
    the file rebuilds the processed ids, with their digests, from it.  An id
    counts as processed only after :meth:`sync` has made its record durable:
    if the sync fails, the ids it covered stay unprocessed, so a redelivery is
    stored again rather than acknowledged as a duplicate of nothing.
    """

    def __init__(self, path):
        self.processed = {}         # id -> envelope digest (bytes), or None if not recorded
        self._unsynced = []         # (id, digest) appended since the last sync
        super().__init__(path)

    def loaded(self, record):
        message_id = record.get("message_id")
        if isinstance(message_id, str):
            digest = record.get("envelope_digest")
            try:
                digest = bytes.fromhex(digest) if isinstance(digest, str) else None
            except ValueError:
                digest = None
            self.processed[message_id] = digest

    def __contains__(self, message_id):
        return message_id in self.processed

    def __len__(self):
        return len(self.processed)

    def digest(self, message_id):
        """The envelope digest stored with a processed id (None if unknown or not recorded)."""
        return self.processed.get(message_id)

    def add(self, message_id, message, timestamp, digest=None):
        """Buffer one message's record; it is not yet processed (see :meth:`sync`)."""
        record = {"message_id": message_id, "message": message, "timestamp": timestamp}
        if digest is not None:
            record["envelope_digest"] = digest.hex()
        self.append(record)
        self._unsynced.append((message_id, digest))

    def sync(self):
        super().sync()
        self.processed.update(self._unsynced)
        self._unsynced.clear()


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
