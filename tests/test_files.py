"""Private files: 0600 files and 0700 directories whatever the umask, never through a symlink."""
import contextlib
import os
import stat
import subprocess
import sys

import pytest

from ciphermq import files
from ciphermq.access import add_user
from ciphermq.journal import Journal, encode
from ciphermq.outbox import Outbox
from ciphermq.store import JsonLinesFile, MessageStore


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_everything_created_is_private_under_umask_022(tmp_path):
    """Under umask 022 the journal, its directory, its lock and saved tail, the receiver's
    output and rejects files, the outbox and the users file are created 0600 (0700)."""
    data = tmp_path / "data"
    with umask(0o022):
        data.mkdir()                    # a journal with a torn tail to save
        (data / "journal.log").write_bytes(encode(b"Q q1") + b"0badc0de Q torn")
        journal = Journal(tmp_path / "fresh" / "data")
        journal.recover()
        journal.start(snapshot=lambda: None)
        journal.append(b"Q q1")
        assert journal.sync(5.0)
        journal.close()
        torn = Journal(data)
        torn.recover()
        torn.close()
        with MessageStore(tmp_path / "received.json") as store:
            store.add("m-1", "plaintext", "2026-01-01T00:00:00")
            store.sync()
        with JsonLinesFile(tmp_path / "received.rejects.json") as rejects:
            rejects.append({"message_id": "m-2", "reason": "stale"})
            rejects.sync()
        with Outbox(tmp_path / "pending_messages.json") as outbox:
            outbox.add([{"message_id": "m-3", "exchange": "e", "routing_key": "k",
                         "envelope": {"message_id": "m-3"}}])
        add_user(str(tmp_path / "users.json"), "alice", [], [], False)
    fresh = tmp_path / "fresh"
    assert mode(fresh / "data") == 0o700
    for path in [fresh / "data" / "journal.log", fresh / "data" / "LOCK",
                 *data.glob("journal.torn-tail.*"), tmp_path / "received.json",
                 tmp_path / "received.rejects.json", tmp_path / "pending_messages.json",
                 tmp_path / "users.json"]:
        assert mode(path) == 0o600, path
    assert list(data.glob("journal.torn-tail.*")), "the saved tail was checked"


def test_compacted_journal_and_rewritten_outbox_stay_private(tmp_path):
    """A file replaced by compaction or rewrite is 0600 too, whatever the umask."""
    with umask(0o022):
        journal = Journal(tmp_path / "data", compact_min_bytes=0, fsync=False)
        journal.recover()
        journal.start(snapshot=lambda: journal.cut([b"Q kept"]))
        journal.append(b"Q q1")
        journal.request_compaction()
        journal.append(b"Q q2")
        assert journal.sync(5.0)
        journal.close()
        with Outbox(tmp_path / "pending_messages.json") as outbox:
            outbox.add([{"message_id": "m-1", "exchange": "e", "routing_key": "k",
                         "envelope": {"message_id": "m-1"}}])
            outbox.remove("m-1")
    assert journal.compactions == 1
    assert mode(tmp_path / "data" / "journal.log") == 0o600
    assert mode(tmp_path / "pending_messages.json") == 0o600


def test_planted_symlink_at_the_temp_path_is_refused_and_its_target_untouched(tmp_path):
    """`python -m ciphermq.access add` refuses a symlink planted at <file>.tmp: an Error
    line, exit 1, and the symlink's target keeps its content."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    users = tmp_path / "users.json"
    (tmp_path / "users.json.tmp").symlink_to(victim)
    done = subprocess.run([sys.executable, "-m", "ciphermq.access", "add", str(users), "bob"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.startswith("Error: ") and "users.json.tmp already exists" in done.stderr
    assert "Traceback" not in done.stderr
    assert victim.read_text() == "precious\n"
    assert not users.exists()


def test_symlink_at_a_private_files_name_is_not_followed(tmp_path):
    """A symlink planted where the receiver's output will be is refused, never written
    through."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "received.json").symlink_to(victim)
    with pytest.raises(OSError):
        MessageStore(tmp_path / "received.json")
    with pytest.raises(OSError):
        files.open_append(tmp_path / "received.json")
    assert victim.read_text() == "precious\n"


def test_unique_files_never_overwrite_each_other(tmp_path):
    """Two saved files made in the same second get different names; neither is replaced."""
    first, fd1 = files.create_unique(tmp_path, "journal.damaged")
    second, fd2 = files.create_unique(tmp_path, "journal.damaged")
    for fd in (fd1, fd2):
        os.close(fd)
    assert first != second and len(list(tmp_path.iterdir())) == 2
