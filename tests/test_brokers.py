"""ciphermq.brokers (which client a URL opens, failover over our broker) and the
sender's rule that a RabbitMQ nack costs no attempt."""
import threading

import pytest

from ciphermq import brokers, sender
from ciphermq.amqp import Reply
from ciphermq.errors import ConnectionLost, Nacked, UrlError, UsageError
from ciphermq.outbox import Outbox, record
from ciphermq.ports import free_port, free_ports
from ciphermq.urls import Failover, parse_url


def test_connect_any_fails_over_to_the_next_ciphermq_url(server):
    """With a dead ciphermq:// URL first, connect_any connects to the live one, and the
    next round starts after it."""
    dead = "ciphermq://127.0.0.1:%d" % free_port()
    live = "ciphermq://%s:%d" % server.address
    failover = Failover([dead, live])
    with brokers.connect_any(failover, attempts=1, timeout=5) as connection:
        assert connection.peer == "%s:%d" % server.address
    assert failover.round()[0] == parse_url(dead)


def test_connect_any_gives_up_naming_every_url():
    """When no URL answers, ConnectionLost names each one tried."""
    ports = free_ports(2)
    failover = Failover(["ciphermq://127.0.0.1:%d" % port for port in ports])
    with pytest.raises(ConnectionLost) as caught:
        brokers.connect_any(failover, attempts=1, timeout=2)
    assert all(str(port) in str(caught.value) for port in ports)


def test_a_failover_list_of_parsed_urls_cannot_mix_brokers():
    """Failover refuses parsed URLs of two broker kinds, as it refuses their text."""
    with pytest.raises(UrlError, match="mix"):
        Failover([parse_url("ciphermq://127.0.0.1:1"), parse_url("amqp://127.0.0.1:2/")])


def test_auth_with_an_amqp_url_is_a_usage_error():
    """--auth belongs to our broker: with amqp:// URLs it is refused before connecting."""
    with pytest.raises(UsageError, match="--auth"):
        brokers.connect_any(Failover(["amqp://127.0.0.1:1/"]), auth=("alice", "t"))


class NackingConnection:
    """A stand-in connection whose publishes are nacked while ``nacks`` lasts, then ACKed."""

    peer = "fake:1"

    def __init__(self, nacks):
        self.nacks = nacks

    def publish_many(self, messages):
        replies = []
        for _, _, envelope in messages:
            reply = Reply("publish")
            if self.nacks:
                self.nacks.pop()
                reply._resolve(error=Nacked("RabbitMQ nacked message %s"
                                            % envelope["message_id"]))
            else:
                reply._resolve("ACK %s" % envelope["message_id"])
            replies.append(reply)
        return replies

    def close(self):
        pass


def deliver_with_nacks(tmp_path, monkeypatch, nacks):
    monkeypatch.setattr(sender, "NACK_BACKOFF", 0)      # the wait on stop: none here
    remaining = [True] * nacks
    connects = []

    def fake_connect(**options):
        connects.append(options)
        return NackingConnection(remaining)

    monkeypatch.setattr(sender, "connect_any", fake_connect)
    outbox = Outbox(tmp_path / "outbox.json")
    outbox.add([record({"message_id": "m1", "ciphertext": "x"}, "x", "k")])
    with outbox:
        status = sender.Sender(outbox, exchange="x", routing_key="k", window=1, ack_timeout=5,
                               connect_options={}, stop=threading.Event()).deliver()
        return status, len(outbox), len(connects)


def test_a_burst_of_nacks_costs_no_attempt(tmp_path, monkeypatch):
    """25 nacks in a row (a quorum leader election) do not use up a message's 3 attempts:
    it is sent again on a fresh connection each time and finally ACKed."""
    status, left, connects = deliver_with_nacks(tmp_path, monkeypatch, 25)
    assert (status, left, connects) == (0, 0, 26)


def test_nacks_without_end_give_up_after_the_attempts_they_add_up_to(tmp_path, monkeypatch):
    """A message nacked for ever (a full queue) is given up after ATTEMPTS x
    NACKS_PER_ATTEMPT nacks and stays in the outbox."""
    status, left, connects = deliver_with_nacks(tmp_path, monkeypatch, 1000)
    assert (status, left) == (1, 1)
    assert connects == sender.ATTEMPTS * sender.NACKS_PER_ATTEMPT
