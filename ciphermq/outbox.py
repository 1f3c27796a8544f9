"""The sender's outbox: every message on disk from before its first send until its ACK.

The document keeps ``pending_messages`` in the sender's memory, so a sender
that dies -- or gives up while the broker is down -- loses them.  Here they
live in a JSON-lines file (``pending_messages.json`` by default), with two
kinds of line::

    {"message_id": "...", "exchange": "...", "routing_key": "...", "envelope": {...}}
    {"acked": "..."}

The first kind is written and fsynced **before** the message is first sent;
the second is appended once ``ACK <id>`` has arrived.  Whatever is left when
the file is opened again is sent again, with the same id and the very same
envelope: the broker re-ACKs an id it already holds, and the receiver's dedup
absorbs a copy the broker no longer remembers, so a resend never makes a
duplicate.

An ``acked`` line is only flushed, not fsynced: losing one to a power cut
costs a harmless resend.  The file is compacted -- rewritten atomically with
only the pending records -- when it is opened, when most of it is dead, and
when the sender closes it with nothing pending (leaving an empty file).
"""
from .store import CorruptFile, JsonLinesFile

#: Compact during a run once this many ``acked`` lines outnumber the pending records 4:1.
COMPACT_AFTER = 10_000


class Outbox(JsonLinesFile):
    """Pending messages, durable, in the order they were accepted.  One owner thread.

    Raises CorruptFile if the file holds something other than the two kinds
    of record (a torn last line excepted: it is cut off -- and since the
    write of a record precedes the first send of its message, a torn record
    is one that was never sent).
    """

    def __init__(self, path):
        self._pending = {}          # message_id -> record, in insertion order
        self._dead = 0              # lines in the file that no longer count
        super().__init__(path)
        if self._dead:
            self._compact()

    def loaded(self, record):
        if "acked" in record:
            self._dead += 1 + (self._pending.pop(record["acked"], None) is not None)
            return
        fields = ("message_id", "exchange", "routing_key")
        if not (all(isinstance(record.get(field), str) for field in fields)
                and isinstance(record.get("envelope"), dict)
                and record["envelope"].get("message_id") == record["message_id"]):
            raise CorruptFile("%s: record %d is not a pending message"
                              % (self.path, self.records_loaded + 1))
        if record["message_id"] in self._pending:
            self._dead += 1
        self._pending[record["message_id"]] = record

    def __len__(self):
        return len(self._pending)

    def __contains__(self, message_id):
        return message_id in self._pending

    def pending(self):
        """The records still waiting for their ACK, oldest first (a new list)."""
        return list(self._pending.values())

    def add(self, records):
        """Make new records durable (one fsync for all of them).  Blocks for the fsync.

        Call it before the first send of any of these messages.
        """
        for record in records:
            self.append(record)
        self.sync()
        for record in records:
            self._pending[record["message_id"]] = record

    def remove(self, message_id):
        """Forget a message whose ACK has arrived (flushed, not fsynced; see the module doc)."""
        if self._pending.pop(message_id, None) is None:
            return
        self.append({"acked": message_id})
        self.flush()
        self._dead += 2
        if self._dead >= COMPACT_AFTER and self._dead > 4 * len(self._pending):
            self._compact()

    def close(self):
        """Compact if nothing is pending (leaving an empty file), then close.  Safe twice."""
        if not self._file.closed and not self._pending and self._dead:
            self._compact()
        super().close()

    def _compact(self):
        self.rewrite(self._pending.values())
        self._dead = 0


def record(envelope, exchange, routing_key):
    """The outbox record of one sealed envelope bound for ``exchange`` / ``routing_key``."""
    return {"message_id": envelope["message_id"], "exchange": exchange,
            "routing_key": routing_key, "envelope": envelope}
