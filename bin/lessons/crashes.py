"""Lessons 5-7: kill -9 the receiver, the sender, the broker -- and count what survived."""


def _summary(process):
    """The receiver's last status line (saved, duplicates, rejected)."""
    return [line for line in process.lines if "📊 [RECEIVER]" in line][-1:]


def kill_receiver(stage):
    """5. A receiver killed mid-stream loses nothing and stores nothing twice."""
    private, public = stage.keys()
    broker = stage.broker()
    port, key = str(broker.port), str(private)
    stage.run("Sender.py", "--port", port, "--public-key", str(public), "--count", "300",
              "--record", "sender_record.json", show=False)
    stage.say("300 messages ACKed by the broker; now a receiver, killed at its first save")
    receiver = stage.start("Receiver.py", "--port", port, "--private-key", key)
    receiver.wait_for("saved to file")
    receiver.kill()
    stage.say("💀 receiver killed with SIGKILL after storing %d message(s); starting it again"
              % len(stage.stored()))
    again = stage.start("Receiver.py", "--port", port, "--private-key", key, "--idle-exit", "2")
    again.wait()
    stage.say("second run: %s" % " ".join(_summary(again)))
    tally = stage.verdict()
    stage.proves(tally.ok and len(stage.stored()) == 300,
                 "kill -9 of the receiver: 300 stored, exactly once",
                 "the checker found a loss or a duplicate")


def kill_sender(stage):
    """6. A sender killed mid-send resumes from its outbox; the broker stores each once."""
    private, public = stage.keys()
    broker = stage.broker("--chaos", "delay-ms=20-20")
    port = str(broker.port)
    stage.say("the broker answers each read 20 ms late (--chaos delay-ms=20), so the kill "
              "lands mid-send")
    sender = stage.start("Sender.py", "--port", port, "--public-key", str(public), "--count",
                         "500", "--window", "4", "--record", "sender_record.json", "-v")
    sender.wait_for("Server ACK received")
    sender.kill()
    records = stage.stored("pending_messages.json")
    held = {r["message_id"] for r in records if "message_id" in r} - {
        r["acked"] for r in records if "acked" in r}
    stage.say("💀 sender killed with SIGKILL; its outbox still holds %d unACKed message(s)"
              % len(held))
    stage.run("Sender.py", "--port", port, "--public-key", str(public), "--count", "0",
              "--record", "sender_record.json")
    lines = stage.run("Receiver.py", "--port", port, "--private-key", str(private),
                      "--idle-exit", "2", show=False)
    stage.say("the receiver: %s" % lines[-1])
    tally = stage.verdict()
    stage.proves(held and tally.ok and len(stage.stored()) == 500,
                 "kill -9 of the sender: the outbox sent the rest, 500 stored, exactly once",
                 "the checker found a loss or a duplicate")


def kill_broker(stage):
    """7. With --data-dir, a broker killed after ACKing loses none of what it ACKed."""
    private, public = stage.keys()
    broker = stage.broker("--data-dir", "data")
    stage.run("Sender.py", "--port", str(broker.port), "--public-key", str(public),
              "--count", "100", "--record", "sender_record.json", show=False)
    stage.say("100 messages ACKed: each ACK came after its journal record was fsynced")
    broker.kill()
    stage.say("💀 broker killed with SIGKILL; restarting it on the same --data-dir")
    broker = stage.broker("--data-dir", "data")
    lines = stage.run("Receiver.py", "--port", str(broker.port), "--private-key", str(private),
                      "--max-messages", "100", show=False)
    stage.say("the receiver, on the restarted broker: %s" % lines[-1])
    tally = stage.verdict()
    stage.proves(tally.ok and len(stage.stored()) == 100,
                 "kill -9 of the broker: the journal gave back all 100 ACKed messages",
                 "the checker found a loss or a duplicate")
