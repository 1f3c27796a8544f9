"""`make mutants`: plant one bug per guarantee and check that the named tests catch each.

A test suite proves a guarantee only if it fails when the guarantee is broken.
This script breaks them on purpose, one at a time: each mutant below is a file,
an exact snippet of its source and the replacement that plants the bug, and the
tests that exist to catch it.  For each mutant the tree is copied into a
temporary directory (the real tree is never edited), the snippet is replaced in
the copy, and only that mutant's tests run there -- with ``PYTHONPATH`` pointing
at the copy, so the broker and scripts the tests start as processes run the
mutated code too.  A mutant is *caught* when its tests fail, *missed* when they
pass.  A snippet no longer found in the source is a *stale* mutant: the code it
targets moved, and the mutant must be brought up to date.  Before any mutant,
the same tests run on the unmutated copy and must pass (else "caught" would
mean nothing).

    python tests/mutants.py              # all; exit 0 only if every mutant is caught
    python tests/mutants.py -k tls -v    # the mutants whose name contains "tls", with output

It lives in tests/ rather than bench/ because it is a check on the tests, not
a measurement; it is a plain script rather than mutmut because the mutants are
curated (one per documented guarantee, each with the test that owns it) and a
run must stay within a few minutes on two cores.  docs/TESTING.md has the table.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Tuple

REPO = Path(__file__).resolve().parent.parent
#: What a mutant's test run may take at most (a hang counts as caught: the test failed).
RUN_TIMEOUT = 300


class Mutant(NamedTuple):
    name: str
    guarantee: str
    edits: Tuple[Tuple[str, str, str], ...]     # (file, exact snippet, replacement)
    tests: Tuple[str, ...]                      # pytest node ids that must catch it


MUTANTS = [
    Mutant("receiver-acks-before-storing",
           "the receiver acks a message only after its record is fsynced",
           (("ciphermq/receiver.py",
             "        opened = self._decrypt_new(batch)",
             "        self._send_acks([d.message_id for d in batch], attempt=1)\n"
             "        opened = self._decrypt_new(batch)"),),
           ("tests/test_client_fsync.py::test_the_receivers_store_is_fsynced_before_the_ack",)),
    Mutant("store-fsync-skipped",
           "the receiver's output file is fsynced, not only flushed, before the ack",
           (("ciphermq/store.py",
             '        """Flush and fsync: the records survive a crash of the process or the '
             'machine."""\n        self._file.flush()\n        os.fsync(self._file.fileno())',
             '        """Flush and fsync: the records survive a crash of the process or the '
             'machine."""\n        self._file.flush()'),),
           ("tests/test_client_fsync.py::test_the_receivers_store_is_fsynced_before_the_ack",)),
    Mutant("outbox-fsync-skipped",
           "the sender's outbox is fsynced before a message is first sent",
           (("ciphermq/outbox.py",
             "            self.append(record)\n        self.sync()",
             "            self.append(record)\n        self.flush()"),),
           ("tests/test_client_fsync.py::test_the_outbox_is_fsynced_before_the_first_send",)),
    Mutant("journal-ack-before-fsync",
           "with --data-dir, ACK is sent only after the journal record is fdatasynced",
           (("ciphermq/connection.py",
             "            self._must_sync = True  # even a duplicate",
             "            self._must_sync = False  # even a duplicate"),),
           ("tests/test_journal.py::test_ack_is_sent_only_after_the_record_is_fsynced",)),
    Mutant("journal-failure-acks",
           "a publish the journal never wrote is never ACKed, even when the journal has died",
           (("ciphermq/connection.py",
             '            log.error("Closing %s without replies: %s", self.peer, exc)\n'
             "            self._replies = []\n            self.close()\n            return False",
             "            return True"),),
           ("tests/test_journal_faults.py"
            "::test_a_journal_stopped_for_good_closes_the_publisher_without_an_ack",)),
    Mutant("foreign-ack-accepted",
           "only the connection a message was delivered to may ack it",
           (("ciphermq/broker.py",
             "        delivery = session.held.pop(message_id, None)\n        if delivery is None:\n"
             "            if message_id in self._ids.acked_at:",
             "        holder = next((s for s in self._sessions if message_id in s.held), session)\n"
             "        delivery = holder.held.pop(message_id, None)\n        if delivery is None:\n"
             "            if message_id in self._ids.acked_at:"),),
           ("tests/test_server.py::test_foreign_ack_is_refused_and_changes_nothing",
            "tests/test_broker.py::test_ack_rules")),
    Mutant("stale-ack-accepted",
           "a late ack from a consumer whose delivery was taken back is refused",
           (("ciphermq/broker.py",
             "                del session.held[delivery.message.id]   # pulled, lost, or skipped",
             "                pass  # pulled, lost, or skipped"),),
           ("tests/test_server.py"
            "::test_a_late_ack_from_a_consumer_that_lost_the_message_is_refused",)),
    Mutant("dedup-forgotten",
           "a re-published id already acked within the dedup window is not stored again",
           (("ciphermq/broker.py",
             "        if message_id in ids.live or message_id in ids.acked_at:",
             "        if message_id in ids.live:"),),
           ("tests/test_broker.py::test_duplicate_of_an_acked_message_within_window_is_not_requeued",)),
    Mutant("acked-id-unbound",
           "an id acked within the dedup window stays bound to its envelope: other bytes are "
           "refused",
           (("ciphermq/ids.py",
             "            self.acked_at[message_id] = self.clock()\n"
             "            self.digests[message_id] = digest\n",
             "            self.acked_at[message_id] = self.clock()\n"),),
           ("tests/test_ids.py::test_after_the_first_ack_the_id_stays_bound_by_its_digest",)),
    Mutant("acked-id-unbound-after-restart",
           "an acked id stays bound to its envelope across a restart (its digest is journaled)",
           (("ciphermq/broker.py",
             "int(self.wall_clock() * 1000), digest))",
             "int(self.wall_clock() * 1000), None))"),),
           ("tests/test_reused_ids.py"
            "::test_an_id_stays_bound_queued_in_flight_acked_and_across_restarts",)),
    Mutant("never-redeliver",
           "an unacked delivery is taken back after --redelivery-interval",
           (("ciphermq/broker.py",
             "            if delivery.deadline > now:",
             "            if True:"),),
           ("tests/test_broker.py::test_redeliver_reports_when_it_is_next_due",
            "tests/test_server.py::test_redelivery_after_the_interval")),
    Mutant("mass-requeue-in-one-hold",
           "a mass requeue goes back a chunk per hold of the broker mutex; neighbours run between",
           (("ciphermq/broker.py",
             "        if len(deliveries) <= REQUEUE_CHUNK:",
             "        if True:"),),
           ("tests/test_mass_requeue.py"
            "::test_between_two_chunks_the_mutex_is_free_and_a_neighbour_runs",)),
    Mutant("pending-requeue-not-snapshotted",
           "messages of a requeue still under way are in a journal snapshot taken meanwhile",
           (("ciphermq/broker.py",
             "            in_flight += [delivery.message for give_back in self._giving_back",
             "            in_flight += [delivery.message for give_back in ()"),),
           ("tests/test_mass_requeue.py"
            "::test_a_snapshot_between_two_chunks_keeps_the_messages_not_yet_back",)),
    Mutant("queue-length-miscounted",
           "--max-queue-length counts the messages in flight as well as the ready ones",
           (("ciphermq/broker.py",
             "            if len(queue.ready) + queue.unacked >= self.max_queue_length:",
             "            if len(queue.ready) >= self.max_queue_length:"),),
           ("tests/test_broker.py::test_messages_in_flight_count_toward_the_queue_length",)),
    Mutant("line-deadline-skipped",
           "a line not finished within --line-timeout drops the connection (slowloris)",
           (("ciphermq/connection.py",
             "        if framer.in_line and now - self._line_started > config.line_timeout:",
             "        if False and now - self._line_started > config.line_timeout:"),),
           ("tests/test_deadlines.py::test_line_deadline_runs_on_the_servers_clock",)),
    Mutant("line-deadline-never-reset",
           "each line gets its own --line-timeout, counted from its first byte",
           (("ciphermq/connection.py",
             '            if b"\\n" in data or not framer.in_line:',
             "            if not framer.in_line:"),),
           ("tests/test_deadlines.py::test_complete_lines_reset_the_line_deadline",)),
    Mutant("auth-deadline-skipped",
           "a client that does not authenticate within --auth-timeout is dropped",
           (("ciphermq/connection.py",
             "        if self.principal is None and now - self._connected_at"
             " > config.auth_timeout:",
             "        if False:"),),
           ("tests/test_access.py::test_authentication_has_a_deadline",)),
    Mutant("tls-floor-lowered",
           "the broker refuses TLS older than 1.2",
           (("ciphermq/transport.py",
             "    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
             "    context.minimum_version = ssl.TLSVersion.TLSv1_2\n",
             "    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
             "    context.minimum_version = ssl.TLSVersion.TLSv1\n"
             '    context.set_ciphers("DEFAULT:@SECLEVEL=0")\n'),),
           ("tests/test_tls.py::test_tls_1_1_is_refused",)),
    Mutant("aad-dropped",
           "the GCM tag binds message_id, ts and sender (associated data)",
           (("ciphermq/crypto.py",
             '            cipher.update(associated_data(message_id, envelope["ts"], self.sender))',
             "            pass"),
            ("ciphermq/crypto.py",
             "        if ad is not None:\n            cipher.update(ad)",
             "        if False:\n            cipher.update(ad)")),
           ("tests/test_crypto.py::test_changed_bound_field_breaks_the_tag",)),
    Mutant("envelope-id-not-bound",
           "an envelope's message_id is bound to its ciphertext: another id does not open it",
           (("ciphermq/crypto.py",
             "    return AD_CONTEXT + _canonical([2, message_id, ts, sender])",
             "    return AD_CONTEXT + _canonical([2, None, ts, sender])"),),
           ("tests/test_crypto.py::test_changed_bound_field_breaks_the_tag",)),
    Mutant("delivery-id-not-checked",
           "the receiver refuses an envelope whose id is not the one the broker delivered",
           (("ciphermq/crypto.py",
             "        if expected_id is not None and message_id != expected_id:",
             "        if False:"),),
           ("tests/test_crypto.py::test_expected_id_must_match",)),
    Mutant("connection-never-steps-aside",
           "a connection busy with a long read steps aside for a neighbour's short read "
           "(--fair-turn)",
           (("ciphermq/connection.py",
             "                    if turn.due():      # a short read is busy and this turn is over",
             "                    if False:"),),
           ("tests/test_turns.py::test_a_connection_steps_aside_between_commands_for_a_short_read",)),
    Mutant("bulk-readers-alternate",
           "a reader steps aside only for a short read, not for a bulk (pipelining) one",
           (("ciphermq/turns.py",
             "            self.short = 0 < commands <= SHORT_READ",
             "            self.short = True"),),
           ("tests/test_turns.py::test_bulk_readers_do_not_step_aside_for_each_other",
            "tests/test_turns.py::test_a_connection_does_not_step_aside_for_a_bulk_read")),
    Mutant("switch-interval-not-applied",
           "the broker process runs with --switch-interval, not Python's 5 ms",
           (("ciphermq/server.py",
             "    sys.setswitchinterval(args.switch_interval)\n",
             ""),),
           ("tests/test_cli.py::test_switch_interval_is_applied_to_the_broker_process",)),
]


def copy_tree(destination):
    """The working tree without .git, the venv and caches (the mutants' sandbox)."""
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache",
                                    "*.egg-info", "build", "dist", "certs")
    shutil.copytree(str(REPO), str(destination), ignore=ignore, symlinks=True)


def apply(root, mutant):
    """Plant ``mutant`` in the copy at ``root``; returns the original texts, or the first
    snippet not found (a stale mutant) as a string."""
    originals = {}
    for file, snippet, replacement in mutant.edits:
        path = root / file
        if path not in originals:
            originals[path] = path.read_text(encoding="utf-8")
        current = path.read_text(encoding="utf-8")
        count = current.count(snippet)
        if count != 1:
            restore(originals)
            return "%s: snippet found %d times: %r" % (file, count, snippet[:60])
        path.write_text(current.replace(snippet, replacement), encoding="utf-8")
    return originals


def restore(originals):
    for path, text in originals.items():
        path.write_text(text, encoding="utf-8")


def run_tests(root, tests, verbose):
    """pytest on ``tests`` in the copy; (exit status, seconds, output)."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "-m", ""] + list(tests)
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=str(root), env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        status, output = "timeout", str(exc)
    if verbose:
        print(output)
    return status, time.monotonic() - started, output


def check_sandbox(root):
    """The copy, not the editable install, is what ``import ciphermq`` finds there."""
    env = dict(os.environ, PYTHONPATH=str(root))
    found = subprocess.run([sys.executable, "-c", "import ciphermq; print(ciphermq.__file__)"],
                           cwd=str(root), env=env, capture_output=True, text=True, check=True)
    return str(Path(found.stdout.strip()).resolve()).startswith(str(root.resolve()) + os.sep)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-k", dest="match", default="", help="only mutants whose name has this")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pytest's output")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.match in m.name]
    if not mutants:
        print("Error: no mutant matches %r" % args.match)
        return 2
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="ciphermq-mutants-") as scratch:
        root = Path(scratch) / "tree"
        copy_tree(root)
        if not check_sandbox(root):
            print("Error: the copy in %s is not what Python imports there" % root)
            return 2
        baseline = sorted({test for m in mutants for test in m.tests})
        status, seconds, output = run_tests(root, baseline, args.verbose)
        print("baseline: %d tests on the unmutated copy: %s (%.1f s)"
              % (len(baseline), "pass" if status == 0 else "FAIL", seconds))
        if status != 0:
            print(output[-3000:])
            print("Error: the mutants' tests fail without any mutant; fix them first")
            return 1
        for mutant in mutants:
            planted = apply(root, mutant)
            if isinstance(planted, str):
                rows.append((mutant, "STALE", 0.0))
                print("stale mutant %s: %s" % (mutant.name, planted))
                failed = True
                continue
            try:
                status, seconds, output = run_tests(root, mutant.tests, args.verbose)
            finally:
                restore(planted)
            if status == 1 or status == "timeout":
                verdict = "caught"
            elif status == 0:
                verdict, failed = "MISSED", True
            else:               # 2: interrupted/collection error, 4: usage, 5: no tests ran
                verdict, failed = "ERROR %s" % status, True
                print(output[-2000:])
            rows.append((mutant, verdict, seconds))
            print("%-30s %-8s %5.1f s" % (mutant.name, verdict, seconds), flush=True)
    print()
    print("| mutant | guarantee it breaks | caught by | result |")
    print("|---|---|---|---|")
    for mutant, verdict, _ in rows:
        tests = ", ".join("`%s`" % t.replace("tests/", "") for t in mutant.tests)
        print("| %s | %s | %s | %s |" % (mutant.name, mutant.guarantee, tests, verdict))
    caught = sum(1 for _, verdict, _ in rows if verdict == "caught")
    print("\n%d of %d mutants caught" % (caught, len(rows)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
