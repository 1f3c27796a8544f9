"""Lessons 1-4: a first message, what the broker sees, routing, competing consumers."""
import json

from ciphermq import crypto

HELLO = "hello, encrypted world"


def hello(stage):
    """1. Keys, a broker, a receiver and a sender: one encrypted message end to end."""
    private, public = stage.keys(show=True)
    broker = stage.broker()
    port = str(broker.port)
    receiver = stage.start("Receiver.py", "--port", port, "--private-key", str(private),
                           "--max-messages", "1")
    stage.run("Sender.py", "--port", port, "--public-key", str(public), "--message", HELLO)
    receiver.wait()
    stage.say("the receiver printed:")
    for line in receiver.lines:
        print("   " + line, flush=True)
    stored = [record["message"] for record in stage.stored()]
    stage.proves(stored == [HELLO], "the receiver decrypted and stored: %s" % HELLO,
                 "the receiver stored %r" % stored)


def spy(stage):
    """2. A spy queue bound to the same exchange gets a copy: ciphertext only."""
    private, public = stage.keys()
    broker = stage.broker()
    with stage.client(broker) as client:
        client.call("declare_queue spy")
        client.call("bind default_exchange spy default_key")
        stage.say("bound queue 'spy' to default_exchange with default_key, like default_queue")
        stage.run("Sender.py", "--port", str(broker.port), "--public-key", str(public),
                  "--message", HELLO)
        copy = client.fetch("spy")
    envelope = json.loads(copy.body)
    for field in ("message_id", "enc_session_key", "nonce", "tag", "ciphertext"):
        stage.say("the spy sees %-16s %s" % (field, str(envelope[field])[:60]))
    stage.proves(HELLO.encode() not in copy.body,
                 "the broker's copy is ciphertext only: '%s' appears nowhere in it" % HELLO,
                 "the plaintext is in the broker's copy")
    opened = crypto.decrypt_message_hybrid(envelope, private)
    stage.proves(opened == HELLO, "only the private key opens it: %s" % opened,
                 "the private key did not open the copy")


ROUTES = [  # (exchange, type, [(queue, binding key)], routing keys published)
    ("orders", "direct", [("eu", "eu"), ("us", "us")], ["eu", "us", "eu"]),
    ("news", "fanout", [("alice", "any"), ("bob", "any")], ["x", "y"]),
    ("logs", "topic", [("errors", "*.error"), ("all_db", "db.#")],
     ["db.error", "web.error", "db.slow.query"]),
]


def routing(stage):
    """3. Direct, fanout and topic exchanges decide which queues get a copy."""
    _, public = stage.keys()
    broker = stage.broker()
    sealer = crypto.Sealer(public)
    counts = {}
    with stage.client(broker) as client:
        for exchange, kind, bindings, keys in ROUTES:
            client.call("declare_exchange %s %s" % (exchange, kind))
            for queue, binding in bindings:
                client.call("declare_queue %s" % queue)
                client.call("bind %s %s %s" % (exchange, queue, binding))
            for key in keys:
                client.publish(exchange, key, sealer.seal("to %s via %s" % (key, exchange)))
            for queue, binding in bindings:
                counts[queue] = json.loads(client.call("stats"))["queues"][queue]["ready"]
                stage.say("%-6s exchange %-7s queue %-7s bound %-8s got %d of %s"
                          % (kind, exchange, queue, binding, counts[queue], keys))
    expected = {"eu": 2, "us": 1, "alice": 2, "bob": 2, "errors": 2, "all_db": 2}
    stage.proves(counts == expected,
                 "direct matched keys exactly, fanout copied to all, topic matched patterns",
                 "routing gave %s, expected %s" % (counts, expected))


def competing(stage):
    """4. Two receivers on one queue share its messages; none gets one twice."""
    private, public = stage.keys()
    broker = stage.broker()
    port = str(broker.port)
    receivers = [stage.start("Receiver.py", "--port", port, "--private-key", str(private),
                             "--output", "out-%d.json" % n, "--prefetch", "1",
                             "--idle-exit", "2") for n in (1, 2)]
    for receiver in receivers:
        receiver.wait_for("Subscribed to")
    stage.run("Sender.py", "--port", port, "--public-key", str(public), "--count", "20",
              show=False)
    for receiver in receivers:
        receiver.wait()
    shares = [len(stage.stored("out-%d.json" % n)) for n in (1, 2)]
    ids = [r["message_id"] for n in (1, 2) for r in stage.stored("out-%d.json" % n)]
    stage.say("receiver 1 stored %d, receiver 2 stored %d" % tuple(shares))
    stage.proves(len(ids) == len(set(ids)) == 20 and min(shares) > 0,
                 "20 messages split %d + %d between competing consumers, none twice" % tuple(
                     shares), "shares %s, %d distinct of %d" % (shares, len(set(ids)), len(ids)))
