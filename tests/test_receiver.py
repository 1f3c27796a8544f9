"""bin/Receiver.py as a process: each message exactly once in its output -- across duplicates,
rejects, dropped and half-open connections, signals, crashes at every window, and SIGKILLs."""
import json
import os
import random
import signal
import subprocess

import pytest
from conftest import WAIT
from scripts import (
    PATIENCE,
    assert_exactly_once,
    intact_ids,
    publish_sealed,
    queue_stats,
    read_records,
    receiver_args,
    script_env,
    sender_args,
)

from ciphermq.ports import free_port

CRASH_POINTS = ("before-write", "mid-write", "after-write", "after-fsync", "after-ack")


def test_each_message_is_stored_once_with_the_documents_status_lines(server, keys, spawn,
                                                                     tmp_path):
    """N published messages end up in the output once each, acked, with every status line."""
    texts = ["hello %d" % i for i in range(5)]
    ids = publish_sealed(server.address, keys, texts)
    output = tmp_path / "out.json"
    receiver = spawn(receiver_args(server.address[1], keys, output, "--max-messages", "5", "-v"))
    assert receiver.wait() == 0, receiver.stderr
    records = read_records(output)
    assert_exactly_once(records, texts)
    assert all(set(record) == {"message_id", "message", "timestamp", "envelope_digest"}
               for record in records)
    for message_id in ids:
        for line in ("📩 [RECEIVER] Received message %s",
                     "💾 [RECEIVER] Message %s saved to file",
                     "📤 [RECEIVER] Sending ACK for message %s",
                     "✅ [RECEIVER] Server confirmed ACK for message %s"):
            assert line % message_id in receiver.lines
    assert queue_stats(server) == {"ready": 0, "unacked": 0, "consumers": 0}
    assert server.broker.stats()["totals"]["acked"] == 5


def test_a_duplicate_delivery_is_acked_but_not_written_again(server, keys, spawn, tmp_path):
    """A message already in the output file is acked when it comes again, and not re-stored."""
    output = tmp_path / "out.json"
    [old] = publish_sealed(server.address, keys, ["stored before"])
    output.write_text(json.dumps({"message_id": old, "message": "stored before",
                                  "timestamp": "earlier"}) + "\n")
    publish_sealed(server.address, keys, ["new"])
    receiver = spawn(receiver_args(server.address[1], keys, output, "--max-messages", "1", "-v"))
    assert receiver.wait() == 0, receiver.stderr
    assert "⚠️ [RECEIVER] Duplicate message %s, sending ACK" % old in receiver.lines
    assert_exactly_once(read_records(output), ["stored before", "new"])
    assert queue_stats(server)["ready"] == 0
    assert server.broker.stats()["totals"]["acked"] == 2


def test_an_envelope_that_does_not_open_is_recorded_rejected_and_not_redelivered(
        server, keys, spawn, tmp_path):
    """Undecryptable envelopes go to the rejects file and to <queue>.dead with their reason."""
    [forged] = publish_sealed(server.address, keys, ["forged"], tag="A" * 22 + "==")
    [garbled] = publish_sealed(server.address, keys, ["garbled"], nonce="AAAA")
    publish_sealed(server.address, keys, ["genuine"])
    output = tmp_path / "out.json"
    receiver = spawn(receiver_args(server.address[1], keys, output, "--max-messages", "1", "-v"))
    assert receiver.wait() == 0, receiver.stderr
    assert_exactly_once(read_records(output), ["genuine"])
    rejects = read_records(tmp_path / "out.rejects.json")
    assert [(r["message_id"], r["reason"]) for r in rejects] == [
        (forged, "authentication tag does not match"),
        (garbled, "'nonce' has 3 bytes, expected 12")]
    assert all(r["timestamp"] for r in rejects)
    assert "authentication tag" not in receiver.stdout, "the reason stays in the rejects file"
    totals = server.broker.stats()["totals"]
    assert (totals["acked"], totals["redelivered"], totals["dead_lettered"]) == (1, 0, 2)
    dead = server.broker.stats()["queues"]["default_queue.dead"]
    assert dead["ready"] == 2, "refused, not acked away"


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_in_any_window_loses_nothing_and_duplicates_nothing(point, server, keys, spawn,
                                                                   tmp_path):
    """Killed before the write, mid-write, before the fsync, before the ack or before the
    confirmation, then restarted: every message is in the output exactly once."""
    texts = ["window %d" % i for i in range(3)]
    ids = publish_sealed(server.address, keys, texts)
    output = tmp_path / "out.json"
    crashed = spawn(receiver_args(server.address[1], keys, output, "-v"),
                    env=script_env(CIPHERMQ_CRASH_AT=point + ":2"))
    assert crashed.wait() == 70, crashed.stderr
    restarted = spawn(receiver_args(server.address[1], keys, output, "-v"))
    restarted.wait_for("🔗 [RECEIVER] Subscribed")
    [last] = publish_sealed(server.address, keys, ["sentinel"])     # queued behind the others
    restarted.wait_for("✅ [RECEIVER] Server confirmed ACK for message %s" % last)
    restarted.proc.send_signal(signal.SIGTERM)
    assert restarted.wait() == 0, restarted.stderr
    assert_exactly_once(read_records(output), texts + ["sentinel"])
    if point == "mid-write":
        assert any(line.startswith("✂️ [RECEIVER] Cut a torn last line") for line in restarted.lines)
    if point in ("after-write", "after-fsync"):
        assert "⚠️ [RECEIVER] Duplicate message %s, sending ACK" % ids[1] in restarted.lines


def _kill_receiver_repeatedly(server, keys, spawn, tmp_path, count, kills):
    """Send ``count`` messages while a receiver is SIGKILLed ``kills`` times at random moments."""
    seed = int(os.environ.get("CIPHERMQ_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    texts = ["kill test %d" % i for i in range(count)]
    source = tmp_path / "messages.txt"
    source.write_text("".join(text + "\n" for text in texts))
    output = tmp_path / "out.json"
    port = str(server.address[1])
    sender = spawn(sender_args(port, keys, tmp_path / "outbox.json", "--file", str(source),
                               "--window", "100"))
    killed = 0
    while killed < kills and len(intact_ids(output)) < count:
        receiver = spawn(receiver_args(port, keys, output, "-v"))
        receiver.wait_for("💾 [RECEIVER]")                # it is storing: kill it at random
        try:
            receiver.proc.wait(rng.uniform(0.0, 0.08))   # short: messages must outlast the kills
            raise AssertionError("the receiver exited by itself:\n" + receiver.stderr)
        except subprocess.TimeoutExpired:
            receiver.proc.kill()
        receiver.wait()
        killed += 1
    assert sender.wait() == 0, sender.stdout
    left = count - len(intact_ids(output))
    if left:
        final = spawn(receiver_args(port, keys, output, "--max-messages", str(left)))
        assert final.wait(PATIENCE * 3) == 0, final.stderr
    print("seed %d: %d kills, %d message(s) left for the final run" % (seed, killed, left))
    assert killed == kills, "too few kills (seed %d): the test proved less than it claims" % seed
    assert_exactly_once(read_records(output), texts)


def test_receiver_sigkilled_at_random_while_1000_messages_flow(server, keys, spawn, tmp_path):
    """SIGKILLed 6 times at random while 1,000 messages flow, restarted each time: every
    message is in the output exactly once, and every line is valid JSON."""
    _kill_receiver_repeatedly(server, keys, spawn, tmp_path, count=1000, kills=6)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_receiver_sigkilled_20_times_while_10000_messages_flow(server, keys, spawn, tmp_path):
    """The long version: 20 random SIGKILLs across 10,000 messages, still exactly once."""
    _kill_receiver_repeatedly(server, keys, spawn, tmp_path, count=10_000, kills=20)


def test_dropped_connections_mid_stream_lose_nothing(server, keys, spawn, tmp_path, proxy_to):
    """Connections cut mid-stream on both sides: both clients reconnect; each message once."""
    to_sender, to_receiver = proxy_to(), proxy_to()
    to_sender.cut_after(b"ACK ", 50)
    to_receiver.cut_after(b"Message:", 50)
    texts = ["cut %d" % i for i in range(300)]
    source = tmp_path / "messages.txt"
    source.write_text("".join(text + "\n" for text in texts))
    output = tmp_path / "out.json"
    receiver = spawn(receiver_args(to_receiver.address[1], keys, output, "--max-messages", "300"))
    sender = spawn(sender_args(to_sender.address[1], keys, tmp_path / "outbox.json",
                               "--file", str(source), "--window", "20"))
    assert sender.wait() == 0, sender.stdout
    assert receiver.wait() == 0, receiver.stderr
    assert any(line.startswith("🔌 [SENDER]") for line in sender.lines)
    assert "🔌 [RECEIVER] Connection to the broker lost; reconnecting" in receiver.lines
    assert_exactly_once(read_records(output), texts)
    assert to_sender.connections >= 2 and to_receiver.connections >= 2


def test_a_half_open_connection_is_detected_and_recovered(server, keys, spawn, tmp_path,
                                                          proxy_to):
    """A connection that goes silent without closing is found by the heartbeat; the receiver
    reconnects and stores everything exactly once."""
    proxy = proxy_to()
    proxy.stall_after(b"Message:", 20)
    texts = ["stall %d" % i for i in range(60)]
    publish_sealed(server.address, keys, texts)
    output = tmp_path / "out.json"
    receiver = spawn(receiver_args(proxy.address[1], keys, output, "--max-messages", "60",
                                   "--heartbeat", "0.5"))
    assert receiver.wait() == 0, receiver.stderr
    assert "🔌 [RECEIVER] Connection to the broker lost; reconnecting" in receiver.lines
    assert_exactly_once(read_records(output), texts)


def test_receiver_waits_for_an_unreachable_broker(start_server, keys, spawn, tmp_path):
    """With no broker yet, the receiver retries every second and subscribes once it is up."""
    port = free_port()
    output = tmp_path / "out.json"
    receiver = spawn(receiver_args(port, keys, output, "--max-messages", "1"))
    receiver.wait_for("retrying every second")
    server = start_server(port=port)
    publish_sealed(server.address, keys, ["worth the wait"])
    assert receiver.wait() == 0, receiver.stderr
    assert_exactly_once(read_records(output), ["worth the wait"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_messages_in_hand_and_exits_0(sig, server, keys, spawn, tmp_path):
    """On SIGTERM/SIGINT the receiver stores and acks what it holds, and leaves the rest queued."""
    publish_sealed(server.address, keys, ["signal %d" % i for i in range(300)])
    output = tmp_path / "out.json"
    receiver = spawn(receiver_args(server.address[1], keys, output, "--ack-batch", "10"))
    receiver.wait_for("💾 [RECEIVER]")
    receiver.proc.send_signal(sig)
    assert receiver.wait() == 0, receiver.stderr
    records = read_records(output)
    assert len({r["message_id"] for r in records}) == len(records) > 0
    assert server.broker.stats()["totals"]["acked"] == len(records), "every stored one acked"
    stats = queue_stats(server)
    assert stats["ready"] + stats["unacked"] == 300 - len(records), "the rest stays queued"
    assert receiver.lines[-1].startswith("📊 [RECEIVER]")


def test_ctrl_c_prints_the_summary_once(server, keys, spawn, tmp_path):
    """On SIGINT, after progress lines, the 📊 summary is printed once, as the last line."""
    publish_sealed(server.address, keys, ["summary %d" % i for i in range(20)])
    receiver = spawn(receiver_args(server.address[1], keys, tmp_path / "out.json"))
    receiver.wait_for("20 message(s) saved")       # the once-a-second progress line
    receiver.proc.send_signal(signal.SIGINT)
    assert receiver.wait() == 0, receiver.stderr
    summary = "📊 [RECEIVER] 20 message(s) saved, 0 duplicate(s), 0 rejected"
    assert receiver.lines[-1] == summary
    assert receiver.lines.count(summary) == 1


def test_idle_exit_stops_a_receiver_with_nothing_to_do(server, keys, spawn, tmp_path):
    """--idle-exit ends the run, status 0, once nothing new has come for that long."""
    receiver = spawn(receiver_args(server.address[1], keys, tmp_path / "out.json",
                                   "--idle-exit", "0.3"))
    assert receiver.wait(WAIT) == 0, receiver.stderr


def test_a_corrupt_output_file_is_refused_not_truncated(keys, spawn, tmp_path):
    """A bad line in the middle of the output is not a torn write: the receiver refuses to start."""
    output = tmp_path / "out.json"
    content = '{"message_id": "a", "message": "x", "timestamp": "t"}\nnot json\n' \
              '{"message_id": "b", "message": "y", "timestamp": "t"}\n'
    output.write_text(content)
    receiver = spawn(receiver_args(free_port(), keys, output))
    assert receiver.wait() == 1
    assert "line 2 is not a JSON object" in receiver.stderr
    assert output.read_text() == content


def test_bad_keys_and_options_are_usage_errors(keys, spawn, tmp_path):
    """A missing private key or a broken crash-hook value exits 2 with one clear line."""
    missing = spawn(receiver_args(free_port(), (tmp_path / "nope.pem", None), tmp_path / "o"))
    assert missing.wait() == 2
    assert "❌ [RECEIVER]" in missing.stderr and "Traceback" not in missing.stderr
    hook = spawn(receiver_args(free_port(), keys, tmp_path / "o"),
                 env=script_env(CIPHERMQ_CRASH_AT="during-lunch"))
    assert hook.wait() == 2
    assert "unknown point 'during-lunch'" in hook.stderr
