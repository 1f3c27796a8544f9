"""Lesson 12: TLS on the wire, and users with tokens and rights."""
import re


def tls_and_users(stage):
    """12. TLS and users: who may connect, and what each may do."""
    private, public = stage.keys()
    stage.run("certs.py", "--out-dir", "certs", show=False)
    token = re.search(r"token \(shown once\): (\S+)", "\n".join(stage.run(
        "-m", "ciphermq.access", "add", "users.json", "alice", "--publish", "default_exchange",
        show=False))).group(1)
    stage.say("certs/ made by bin/certs.py; users.json: alice may publish, nothing else")
    broker = stage.broker("--tls-cert", "certs/server.pem", "--tls-key", "certs/server.key",
                          "--users", "users.json")
    send = ("Sender.py", "--port", str(broker.port), "--public-key", str(public),
            "--ack-timeout", "2", "--message", "over TLS, as alice")
    tls = ("--tls-ca", "certs/ca.pem")
    plain = stage.run(*send, "--auth", "alice:" + token, "--outbox", "plain.json",
                      show=False, check=False)
    stage.say("without TLS: %s" % plain[-1])
    wrong = stage.run(*send, *tls, "--auth", "alice:not-the-token", "--outbox", "wrong.json",
                      show=False, check=False)
    stage.say("with a wrong token: %s" % wrong[-1])
    good = stage.run(*send, *tls, "--auth", "alice:" + token)
    stage.proves(any("Server ACK received" in line for line in good)
                 and not any("Server ACK received" in line for line in plain + wrong),
                 "only TLS plus alice's token got the message in",
                 "a connection without TLS or with a wrong token was accepted")
    receive = ("Receiver.py", "--port", str(broker.port), "--private-key", str(private),
               *tls, "--auth", "alice:" + token, "--idle-exit", "2")
    done = stage.run(*receive, show=False, check=False)
    stage.say("alice tries to consume: %s" % done[-1])
    stage.proves(stage.stored() == [],
                 "alice may publish but not consume: the queue's rights are enforced",
                 "alice consumed from a queue she has no right to")
