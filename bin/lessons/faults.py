"""Lessons 8-10: chaos mode, tampering and replay, poison messages and dead letters."""
import base64
import json

from ciphermq import crypto
from ciphermq.errors import DecryptionError

CHAOS = "drop-ack=0.05,drop-confirm=0.05,drop-delivery=0.03,disconnect=0.01"


def chaos(stage):
    """8. Chaos mode: a broker that drops ACKs, pushes and connections on purpose."""
    stage.keys()
    stage.say("bin/demo.py with --chaos %s" % CHAOS)
    dashboard = ("--http-port", str(stage.http_port)) if stage.http_port else ()
    lines = stage.run("demo.py", "--keys", str(stage.dir), "--count", "60", "--chaos", CHAOS,
                      "--chaos-seed", "7", "--broker-arg=--redelivery-interval=1", *dashboard,
                      show=False)
    for line in lines:
        if line.startswith(("📊 [DEMO]", "💥 [DEMO]", "🔁 [DEMO]", "📋 [CHECKER]", "✅ [CHECKER]")):
            print("   " + line, flush=True)
    injected = sum(1 for line in lines if line.startswith("💥 [BROKER]"))
    stage.proves(injected > 0 and any("0 lost, 0 duplicated" in line for line in lines),
                 "%d injected faults, and still every message exactly once" % injected,
                 "chaos injected %d faults; the checker did not say 0 lost, 0 duplicated"
                 % injected)


def _flip_a_bit(envelope, field):
    raw = bytearray(base64.b64decode(envelope[field]))
    raw[0] ^= 1
    return dict(envelope, **{field: base64.b64encode(bytes(raw)).decode()})


def tamper_and_replay(stage):
    """9. Tamper and replay: what AES-GCM's tag and the associated data stop."""
    private, public = stage.keys()
    envelope = crypto.Sealer(public).seal("pay Bob 10 euros")
    opener = crypto.Opener(private)
    stage.say("sealed: %s" % opener.open(envelope))
    forgeries = {
        "one bit of the ciphertext flipped": _flip_a_bit(envelope, "ciphertext"),
        "the message_id changed (associated data)": dict(envelope, message_id="another-id"),
        "the timestamp changed (associated data)": dict(envelope, ts=envelope["ts"] + 1),
        "the tag replaced": _flip_a_bit(envelope, "tag"),
    }
    refused = 0
    for what, forged in forgeries.items():
        try:
            opener.open(forged)
            stage.say("❌ %s: OPENED" % what)
        except DecryptionError as exc:
            refused += 1
            stage.say("🛡️ %s: refused (%s)" % (what, exc))
    stage.proves(refused == len(forgeries),
                 "every tampered envelope was refused: the tag covers ciphertext, id and time",
                 "%d of %d forgeries opened" % (len(forgeries) - refused, len(forgeries)))
    broker = stage.broker()
    with stage.client(broker) as client:
        for attempt in (1, 2, 3):
            stage.say("publish #%d of the same envelope: %s" % (attempt, client.call(
                "publish default_exchange default_key %s" % json.dumps(envelope))))
        totals = json.loads(client.call("stats"))["totals"]
        ready = json.loads(client.call("stats"))["queues"]["default_queue"]["ready"]
    stage.proves(totals["published"] == 1 and totals["duplicates"] == 2 and ready == 1,
                 "a replayed envelope is ACKed again but stored once (same message_id)",
                 "replays stored: %s, ready %d" % (totals, ready))


def dead_letters(stage):
    """10. Poison messages go to <queue>.dead; ciphermq-admin requeue-dead puts them back."""
    private, public = stage.keys()
    broker = stage.broker("--max-deliveries", "2")
    port = str(broker.port)
    stage.run("Sender.py", "--port", port, "--public-key", str(public), "--message",
              "a message nobody could handle, yet")
    with stage.client(broker) as client:
        for attempt in (1, 2):
            delivery = client.fetch("default_queue")
            stage.say("a failing consumer got it (delivery %d) and gives it back: %s"
                      % (attempt, client.call("nack %s" % delivery.message_id)))
    admin = ("-m", "ciphermq.admin", "--port", port)
    stage.run(*admin, "queues")
    stage.run(*admin, "peek", "default_queue.dead")
    stage.run(*admin, "requeue-dead", "default_queue")
    stage.run("Receiver.py", "--port", port, "--private-key", str(private), "--max-messages", "1")
    stored = stage.stored()
    stage.proves(len(stored) == 1,
                 "dead-lettered after 2 deliveries, requeued with ciphermq-admin, then stored",
                 "the receiver stored %d message(s)" % len(stored))
