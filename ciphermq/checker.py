"""Count what a run of the scripts did, and whether every message arrived exactly once.

    python -m ciphermq.checker          # the files of `make send` and `make receive`
    python -m ciphermq.checker --record sender_record.json [--record another.json] \\
        --output received_messages.json [--rejects PATH] [--outbox pending_messages.json]

The checker reads only what the scripts leave behind, never the broker:

* the Sender's ``--record`` file(s) (:class:`ciphermq.sender.Record`: one JSON
  line per event, whatever ``-v`` says; runs may share one file or have one
  each): ``attempted``, ``acked`` and ``rejected`` (refused for good: in the
  Sender's rejects file, so not dropped) lines count, ``refused`` and
  ``failed`` are noted by the Sender but need no count here;
* the Receiver's output file (stored) and its rejects file (refused, with a reason);
* the Sender's outbox, which holds what a sender that gave up will send next run.

and counts:

===============  ===========================================================
attempted        ids a Sender tried to publish, or accepted and still holds
ACKed            ids the broker acknowledged to a Sender: the promise made
stored           distinct ids in the output file
rejected         ids in the rejects file (accounted for: refused on purpose)
lost             ACKed, yet neither stored nor rejected            -- must be 0
duplicated       ids stored more than once                         -- must be 0
never ACKed      attempted but never ACKed: allowed while an outbox holds them
dropped          never ACKed, in no outbox, and not stored          -- must be 0
===============  ===========================================================

A line counts only when it is whole (ends with a newline): a process killed
mid-write leaves at most a torn last line, and it is ignored.  Without an
outbox the checker cannot tell "never ACKed" from "dropped", and says so.
With no arguments it reads the default files in the current directory:
``sender_record.json`` (what ``make send`` passes as ``--record``),
``received_messages.json`` and, if it exists, ``pending_messages.json``.

Exit status: 0 when nothing is lost, duplicated or dropped; 1 otherwise; 2
when an input cannot be used (unreadable, or a line that is not a record).
"""
import argparse
import collections
import json
import sys
from pathlib import Path

from .errors import CheckError
from .sender import Record

#: Ids shown in a verdict line, at most.
SHOW = 5
#: The files of a `make send` / `make receive` run, read when no argument is given.
DEFAULT_RECORD = "sender_record.json"
DEFAULT_OUTPUT = "received_messages.json"
DEFAULT_OUTBOX = "pending_messages.json"


class Tally:
    """What the files say, and the verdict drawn from it.  Build it with :func:`check`."""

    def __init__(self):
        self.attempted = set()
        self.acked = set()
        self.stored = collections.Counter()     # id -> lines in the output
        self.rejected = set()
        self.refused = set()                    # refused for good by the broker (Sender)
        self.held = set()                       # pending in an outbox
        self.outbox_checked = False
        self.torn = []                          # files whose torn last line was ignored

    # -- the verdict ---------------------------------------------------------

    @property
    def lost(self):
        """ACKed ids in neither the output nor the rejects file, sorted."""
        return sorted(self.acked - set(self.stored) - self.rejected)

    @property
    def duplicated(self):
        """``{id: copies}`` for every id stored more than once."""
        return {message_id: n for message_id, n in self.stored.items() if n > 1}

    @property
    def never_acked(self):
        return sorted(self.attempted - self.acked)

    @property
    def dropped(self):
        """Never ACKed, not in an outbox and not delivered anyway (empty without an outbox)."""
        if not self.outbox_checked:
            return []
        delivered = set(self.stored) | self.rejected
        return sorted(set(self.never_acked) - self.held - delivered - self.refused)

    @property
    def unexpected(self):
        """Stored or rejected ids that no Sender record or outbox mentions."""
        return sorted((set(self.stored) | self.rejected) - self.attempted)

    @property
    def ok(self):
        return not (self.lost or self.duplicated or self.dropped)

    def counts(self):
        """The figures as a dict (for tables)."""
        return {"attempted": len(self.attempted), "acked": len(self.acked),
                "stored": len(self.stored), "rejected": len(self.rejected),
                "lost": len(self.lost), "duplicated": len(self.duplicated),
                "never_acked": len(self.never_acked),
                "held": len(self.held & set(self.never_acked)), "dropped": len(self.dropped)}

    def report(self):
        """The verdict as status lines, in the scripts' style."""
        c = self.counts()
        lines = ["📋 [CHECKER] attempted %d, ACKed %d, stored %d, rejected %d"
                 % (c["attempted"], c["acked"], c["stored"], c["rejected"])]
        if not self.outbox_checked:
            lines.append("📋 [CHECKER] never ACKed %d (no outbox given: not checked)"
                         % c["never_acked"])
        else:
            lines.append("📋 [CHECKER] never ACKed %d (%d still held in an outbox)"
                         % (c["never_acked"], c["held"]))
        if self.refused:
            lines.append("🚫 [CHECKER] refused for good by the broker %d (in the Sender's "
                         "rejects file, not dropped): %s"
                         % (len(self.refused), _some(sorted(self.refused))))
        for path in self.torn:
            lines.append("✂️ [CHECKER] Ignored a torn last line in %s" % path)
        if self.unexpected:
            lines.append("ℹ️ [CHECKER] %d stored id(s) no sender record mentions: %s"
                         % (len(self.unexpected), _some(self.unexpected)))
        lines.extend(self._verdict())
        return lines

    def _verdict(self):
        lines = []
        if self.lost:
            lines.append("❌ [CHECKER] %d lost: ACKed to a sender, yet in neither the output "
                         "nor the rejects file: %s" % (len(self.lost), _some(self.lost)))
        if self.duplicated:
            shown = ["%s (%d times)" % item for item in sorted(self.duplicated.items())]
            lines.append("❌ [CHECKER] %d duplicated: stored more than once: %s"
                         % (len(shown), _some(shown)))
        if self.dropped:
            lines.append("❌ [CHECKER] %d dropped: attempted, never ACKed, in no outbox and "
                         "not in the output: %s" % (len(self.dropped), _some(self.dropped)))
        if self.rejected:
            lines.append("🚫 [CHECKER] %d rejected: refused by the receiver (stale, tampered, "
                         "unsigned...), not stored; reasons in the rejects file and "
                         "<queue>.dead: %s" % (len(self.rejected), _some(sorted(self.rejected))))
        if self.ok and self.rejected:
            lines.append("⚠️ [CHECKER] 0 lost, 0 duplicated, but not all delivered: every "
                         "ACKed message is in the output exactly once, except %d rejected"
                         % len(self.rejected))
        elif self.ok:
            lines.append("✅ [CHECKER] 0 lost, 0 duplicated: every ACKed message is in the "
                         "output exactly once")
        return lines


def check(records, output, rejects=None, outboxes=()):
    """Read a run's files and return its :class:`Tally`.

    ``records``: paths of the Sender's ``--record`` files.
    ``output``: the Receiver's output file; ``rejects`` defaults to the
    Receiver's default, ``<output stem>.rejects.json``.  ``outboxes``: the
    Sender's outbox files, to tell "held for the next run" from "dropped".
    A missing record, output, rejects or outbox file counts as empty.
    Raises CheckError if an input cannot be used.
    """
    tally = Tally()
    for path in records:
        _read_record(Path(path), tally)
    output = Path(output)
    if rejects is None:
        rejects = output.with_name(output.stem + ".rejects.json")
    for record in _records(output, tally):
        tally.stored[_message_id(record, output)] += 1
    for record in _records(Path(rejects), tally):
        tally.rejected.add(_message_id(record, rejects))
    for path in outboxes:
        tally.outbox_checked = True
        tally.held |= _outbox_pending(Path(path), tally)
    tally.attempted |= tally.held
    return tally


# -- reading ------------------------------------------------------------------

def _whole_lines(path, tally):
    """The whole lines of ``path`` as str (a torn last one is noted in the tally)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CheckError("cannot read %s: %s" % (path, exc)) from None
    lines = data.split(b"\n")
    if lines.pop():                 # bytes after the last newline: a torn line
        tally.torn.append(str(path))
    try:
        return [line.decode("utf-8").rstrip("\r") for line in lines]
    except UnicodeDecodeError:
        raise CheckError("%s is not UTF-8 text" % path) from None


def _read_record(path, tally):
    for record in _records(path, tally):
        event = record.get("event")
        if event not in Record.EVENTS:
            raise CheckError("%s: not a Sender record (event %r): %r" % (path, event, record))
        message_id = _message_id(record, path)
        if event == "attempted":
            tally.attempted.add(message_id)
        elif event == "acked":
            tally.acked.add(message_id)
        elif event == "rejected":
            tally.refused.add(message_id)


def _records(path, tally):
    """The JSON objects of a JSON-lines file (missing file: none)."""
    records = []
    for number, line in enumerate(_whole_lines(path, tally), 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise CheckError("%s: line %d is not a JSON object" % (path, number))
        records.append(record)
    return records


def _message_id(record, path):
    message_id = record.get("message_id")
    if not isinstance(message_id, str):
        raise CheckError("%s: a record without a message_id: %r" % (path, record))
    return message_id


def _outbox_pending(path, tally):
    """The ids an outbox still holds, read without changing the file (unlike Outbox)."""
    pending = set()
    for record in _records(path, tally):
        if "acked" in record:
            pending.discard(record["acked"])
        else:
            pending.add(_message_id(record, path))
    return pending


def _some(items):
    shown = ", ".join(items[:SHOW])
    return shown + (", ..." if len(items) > SHOW else "")


# -- the command line -------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m ciphermq.checker",
        description="Count attempted, ACKed, stored and rejected messages of a run, and "
                    "report any lost (ACKed, not stored) or duplicated (stored twice).")
    parser.add_argument("--record", action="append", metavar="PATH",
                        help="a `Sender.py --record` file (repeatable; default %s)"
                             % DEFAULT_RECORD)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="PATH",
                        help="the Receiver's output file (default %(default)s)")
    parser.add_argument("--rejects", metavar="PATH",
                        help="the Receiver's rejects file (default: <output stem>.rejects.json)")
    parser.add_argument("--outbox", action="append", metavar="PATH",
                        help="the Sender's outbox, to tell held messages from dropped ones "
                             "(repeatable; default %s if it exists)" % DEFAULT_OUTBOX)
    args = parser.parse_args(argv)
    if args.outbox is None:
        args.outbox = [DEFAULT_OUTBOX] if Path(DEFAULT_OUTBOX).exists() else []
    try:
        tally = check(args.record or [DEFAULT_RECORD], args.output, args.rejects, args.outbox)
    except CheckError as exc:
        print("❌ [CHECKER] %s" % exc, file=sys.stderr)
        return 2
    for line in tally.report():
        print(line)
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
