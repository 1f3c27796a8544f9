"""bin/Sender.py as a process: every message ACKed once, through lost ACKs, kills and outages."""
import json
import os
import stat

import pytest
from scripts import (
    assert_exactly_once,
    load_script,
    read_records,
    receiver_args,
    run_sender,
    sender_args,
)

from ciphermq import access, checker
from ciphermq import keys as keyfiles
from ciphermq.outbox import Outbox
from ciphermq.ports import free_port

TEST_MESSAGE = load_script("Sender").TEST_MESSAGE


def receive_all(port, keys, spawn, output, count):
    """Run a receiver until it has stored ``count`` new messages; return the records."""
    receiver = spawn(receiver_args(port, keys, output, "--max-messages", str(count)))
    assert receiver.wait() == 0, receiver.stderr
    return read_records(output)


def test_messages_are_acked_one_connection_with_the_documents_status_lines(
        server, keys, spawn, tmp_path, proxy_to):
    """A few messages: each sent, ACKed and removed from the outbox, in the document's words,
    over one connection; the receiver then holds each once."""
    proxy = proxy_to()
    outbox = tmp_path / "pending.json"
    result = run_sender(proxy.address[1], keys, outbox, "--message", "one", "--message", "two",
                        "--window", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    sent = [line.split()[-1].rstrip(".") for line in lines if line.startswith("🚀 [SENDER]")]
    assert len(sent) == 2
    for message_id in sent:
        assert "✅ [SENDER] Server ACK received for message %s" % message_id in lines
        assert "🗑️ [SENDER] Message %s removed from pending messages" % message_id in lines
    assert proxy.connections == 1
    assert outbox.read_text() == "", "an outbox with nothing pending is compacted to empty"
    records = receive_all(server.address[1], keys, spawn, tmp_path / "out.json", 2)
    assert_exactly_once(records, ["one", "two"])
    assert sorted(r["message_id"] for r in records) == sorted(sent)


def test_without_messages_it_sends_the_documents_test_message(server, keys, spawn, tmp_path):
    """With no message options the sender sends one test message, as the document's did."""
    result = run_sender(server.address[1], keys, tmp_path / "pending.json")
    assert result.returncode == 0, result.stderr
    records = receive_all(server.address[1], keys, spawn, tmp_path / "out.json", 1)
    assert_exactly_once(records, [TEST_MESSAGE])


def test_many_messages_give_a_progress_line_not_one_line_each(server, keys, tmp_path):
    """Past a few messages, stdout carries a progress line instead of per-message lines."""
    result = run_sender(server.address[1], keys, tmp_path / "pending.json", "--count", "50")
    assert result.returncode == 0, result.stderr
    assert "🚀" not in result.stdout and "✅" not in result.stdout
    assert "ACKed 50 of 50" in result.stdout


def test_the_record_names_every_message_attempted_and_acked_even_without_v(
        server, keys, spawn, tmp_path):
    """--record holds an attempted and an acked line for every message whatever -v says, and
    the checker, reading it with the receiver's output, finds each message stored once."""
    record, outbox, output = (tmp_path / name for name in ("record.json", "pending.json",
                                                           "out.json"))
    result = run_sender(server.address[1], keys, outbox, "--count", "30", "--record",
                        str(record))
    assert result.returncode == 0, result.stderr
    assert "🚀" not in result.stdout, "no per-message stdout lines: the record stands alone"
    events = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    attempted = [e["message_id"] for e in events if e["event"] == "attempted"]
    acked = [e["message_id"] for e in events if e["event"] == "acked"]
    assert len(set(attempted)) == 30 and sorted(acked) == sorted(attempted)
    records = receive_all(server.address[1], keys, spawn, output, 30)
    tally = checker.check([record], output, outboxes=[outbox])
    assert tally.ok and tally.acked == set(tally.stored) == set(attempted), tally.report()
    assert len(records) == 30


@pytest.mark.parametrize("window", [1, 8])
def test_a_dropped_ack_is_retried_without_a_duplicate(window, server, keys, spawn, tmp_path,
                                                      proxy_to):
    """The first ACK is lost on the way: the sender re-sends the identical envelope, the broker
    re-ACKs it, and the receiver stores each message once."""
    proxy = proxy_to()
    proxy.drop_line(b"ACK ")
    texts = ["retry %d" % i for i in range(3)]
    args = ["--window", str(window), "--ack-timeout", "0.5", "-v"]
    for text in texts:
        args += ["--message", text]
    result = run_sender(proxy.address[1], keys, tmp_path / "pending.json", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(proxy.dropped) == 1
    assert "(attempt 2 of 3)" in result.stdout
    assert server.broker.stats()["totals"]["duplicates"] >= 1, "the retry reached the broker"
    assert_exactly_once(receive_all(server.address[1], keys, spawn, tmp_path / "out.json", 3),
                        texts)


def test_a_lost_connection_costs_an_attempt_only_to_the_message_it_failed(
        server, keys, spawn, tmp_path, proxy_to):
    """When the oldest message's ACK is lost, only that message spends an attempt; the seven
    in flight with it are sent again at no cost, and nothing is stored twice."""
    proxy = proxy_to()
    proxy.drop_line(b"ACK ")
    texts = ["collateral %d" % i for i in range(8)]
    args = ["--window", "8", "-v"]
    for text in texts:
        args += ["--message", text]
    result = run_sender(proxy.address[1], keys, tmp_path / "pending.json", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("(attempt 2 of 3)") == 1
    assert result.stdout.count("(again: the connection was lost)") == 7
    records = receive_all(server.address[1], keys, spawn, tmp_path / "out.json", 8)
    assert_exactly_once(records, texts)


def test_sender_killed_mid_run_then_restarted_delivers_each_message_once(
        server, keys, spawn, tmp_path, proxy_to):
    """SIGKILL while publishes are in flight, then a new run on the same outbox: every message
    is delivered, none twice."""
    proxy = proxy_to()
    proxy.stall_after(b"ACK ", 100)         # hold the sender mid-run, deterministically
    texts = ["outbox %d" % i for i in range(300)]
    source = tmp_path / "messages.txt"
    source.write_text("".join(text + "\n" for text in texts))
    outbox = tmp_path / "pending.json"
    first = spawn(sender_args(proxy.address[1], keys, outbox, "--file", str(source),
                              "--window", "10", "-v"))
    first.wait_for("✅ [SENDER] Server ACK received", count=100)
    first.kill()
    with Outbox(outbox) as left:
        assert 200 <= len(left) <= 201, "the kill landed mid-run"
    second = run_sender(server.address[1], keys, outbox, "--file", os.devnull)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "message(s) left in %s by an earlier run" % outbox in second.stdout
    records = receive_all(server.address[1], keys, spawn, tmp_path / "out.json", 300)
    assert_exactly_once(records, texts)


def test_sender_gives_up_on_an_unreachable_broker_and_the_next_run_delivers(
        start_server, keys, spawn, tmp_path):
    """With no broker, the sender retries 3 times, exits 1 and keeps its messages; the next
    run delivers them once."""
    port = free_port()
    outbox = tmp_path / "pending.json"
    first = run_sender(port, keys, outbox, "--message", "patient", "--message", "persistent")
    assert first.returncode == 1
    assert "(try 2 of 3)" in first.stdout
    assert "❌ [SENDER] 2 message(s) not acknowledged, kept in %s" % outbox in first.stdout
    server = start_server(port=port)
    second = run_sender(port, keys, outbox, "--file", os.devnull)
    assert second.returncode == 0, second.stdout + second.stderr
    records = receive_all(server.address[1], keys, spawn, tmp_path / "out.json", 2)
    assert_exactly_once(records, ["patient", "persistent"])


def test_a_half_open_connection_is_detected_and_the_sender_carries_on(
        server, keys, spawn, tmp_path, proxy_to):
    """The connection goes silent mid-run; the heartbeat notices, the sender reconnects and
    every message is delivered once."""
    proxy = proxy_to()
    proxy.stall_after(b"ACK ", 20)
    result = run_sender(proxy.address[1], keys, tmp_path / "pending.json", "--count", "60",
                        "--window", "5", "--heartbeat", "0.5", "--ack-timeout", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "presumed dead" in result.stdout
    records = receive_all(server.address[1], keys, spawn, tmp_path / "out.json", 60)
    assert_exactly_once(records, ["Test message %d of 60" % i for i in range(1, 61)])


def test_a_refused_publish_moves_to_the_rejects_file_and_the_rest_go_on(server, keys, tmp_path):
    """A message the broker refuses for good (unroutable) leaves the outbox for the rejects
    file with the broker's reason, once, and the next run is not blocked by it (exit 0)."""
    outbox = tmp_path / "pending.json"
    result = run_sender(server.address[1], keys, outbox, "--routing-key", "nobody_listens",
                        "--message", "lost in routing")
    assert result.returncode == 1
    assert result.stdout.count("🚀 [SENDER] Sending message") == 1     # not retried
    assert "refused for good (unroutable" in result.stdout
    with Outbox(outbox) as left:
        assert len(left) == 0
    rejects = tmp_path / "rejected_messages.json"
    assert stat.S_IMODE(rejects.stat().st_mode) == 0o600
    [rejected] = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert rejected["reason"].startswith("unroutable") and rejected["envelope"]["ciphertext"]
    again = run_sender(server.address[1], keys, outbox, "--message", "the next one")
    assert again.returncode == 0, again.stdout


def test_a_message_too_large_for_the_broker_is_refused_before_sealing(server, keys, tmp_path):
    """A message whose publish would pass --max-line-bytes is named and not sent, nothing of
    it is written, the others are delivered, and the exit status is 1."""
    outbox = tmp_path / "pending.json"
    source = tmp_path / "messages.txt"
    source.write_text("small\n" + "x" * 3000 + "\nsmall too\n")
    result = run_sender(server.address[1], keys, outbox, "--file", str(source),
                        "--max-line-bytes", "2048")
    assert result.returncode == 1, result.stdout
    assert "Message 2 not sent" in result.stdout and "over the broker's limit of 2048" \
        in result.stdout
    assert result.stdout.count("✅ [SENDER] Server ACK received") == 2
    assert "x" * 100 not in outbox.read_text()
    assert not (tmp_path / "rejected_messages.json").read_text()


def test_bad_keys_are_a_usage_error(tmp_path):
    """A missing public key exits 2 with one clear line and writes no outbox."""
    outbox = tmp_path / "pending.json"
    result = run_sender(free_port(), (None, tmp_path / "missing.pem"), outbox)
    assert result.returncode == 2
    assert "❌ [SENDER]" in result.stderr and "Traceback" not in result.stderr
    assert not outbox.exists()


@pytest.mark.parametrize("options", [
    ["--token-file", "token.txt"],                      # without --auth
    ["--auth", "alice", "--token-file", "missing.txt"],  # unreadable
    ["--tls-ca", "missing-ca.pem"],
    ["--signing-key", "missing.key", "--sender", "alice"],
    ["--sender", "not a name"],
    ["--file", "missing-messages.txt"],
], ids=["token-without-auth", "token-missing", "tls-ca-missing", "signing-key-missing",
        "bad-sender-name", "message-file-missing"])
def test_unusable_options_exit_2_with_one_line_and_no_outbox(options, keys, tmp_path):
    """Options that cannot be used -- a missing file, options that contradict each other --
    are caught by name (UsageError, KeyFileError): exit 2, one line, no traceback, no outbox."""
    outbox = tmp_path / "pending.json"
    result = run_sender(free_port(), keys, outbox, *options, cwd=str(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("❌ [SENDER]") and "Traceback" not in result.stderr
    assert not outbox.exists()


def test_tls_and_auth_options_reach_the_broker(start_server, certs, keys, spawn, tmp_path):
    """--tls-ca, --auth and --token-file make both scripts work with a TLS broker that
    requires authentication."""
    users = tmp_path / "users.json"
    alice = access.add_user(str(users), "alice", ["default_exchange"], [], False)
    bob = access.add_user(str(users), "bob", [], ["default_queue"], False)
    server = start_server(tls_cert=str(certs[0] / "server.pem"),
                          tls_key=str(certs[0] / "server.key"), users_file=str(users))
    token_file = tmp_path / "alice.token"
    token_file.write_text(alice + "\n")
    tls = ["--tls-ca", str(certs[0] / "ca.pem")]
    sent = run_sender(server.address[1], keys, tmp_path / "pending.json", *tls,
                      "--auth", "alice", "--token-file", str(token_file), "--message", "secret")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    receiver = spawn(receiver_args(server.address[1], keys, tmp_path / "out.json", *tls,
                                   "--auth", "bob:" + bob, "--max-messages", "1"))
    assert receiver.wait() == 0, receiver.stderr
    assert_exactly_once(read_records(tmp_path / "out.json"), ["secret"])
    refused = run_sender(server.address[1], keys, tmp_path / "other.json", *tls,
                         "--auth", "alice:wrong-token")
    assert refused.returncode == 1 and "authentication as alice refused" in refused.stderr


def test_signed_envelopes_with_key_reuse_pass_a_receiver_that_requires_signatures(
        server, keys, spawn, tmp_path):
    """--signing-key/--sender/--key-reuse on the sender and --trusted-senders/
    --require-signature on the receiver: signed messages are stored, unsigned rejected."""
    trusted = tmp_path / "trusted"
    key, _ = keyfiles.write_signing_key_pair(trusted, "alice")
    unsigned = run_sender(server.address[1], keys, tmp_path / "b.json", "--message", "anon")
    signed = run_sender(server.address[1], keys, tmp_path / "a.json", "--signing-key", str(key),
                        "--sender", "alice", "--key-reuse", "10", "--count", "3")
    assert signed.returncode == unsigned.returncode == 0
    output = tmp_path / "out.json"
    receiver = spawn(receiver_args(server.address[1], keys, output, "--max-messages", "3",
                                   "--trusted-senders", str(trusted), "--require-signature"))
    assert receiver.wait() == 0, receiver.stderr
    assert_exactly_once(read_records(output), ["Test message %d of 3" % i for i in (1, 2, 3)])
    assert [r["reason"] for r in read_records(tmp_path / "out.rejects.json")] == [
        "unsigned envelope"]


def test_the_checker_counts_a_message_refused_for_good_as_accounted_for(server, keys, tmp_path):
    """A message the broker refused for good is in the Sender's rejects file, so the checker
    does not call it dropped (exit 0)."""
    outbox, record = tmp_path / "pending.json", tmp_path / "record.json"
    result = run_sender(server.address[1], keys, outbox, "--routing-key", "nobody_listens",
                        "--record", str(record))
    assert result.returncode == 1
    tally = checker.check([record], tmp_path / "out.json", outboxes=[outbox])
    assert tally.ok and len(tally.refused) == 1 and not tally.dropped
