"""ciphermq.client against a real broker: pipelining, push/reply dispatch, failures, heartbeat,
auth and TLS."""
import contextlib
import queue
import threading

import pytest
from conftest import WAIT, envelope

from ciphermq import access
from ciphermq import client as clientlib
from ciphermq.client import Client, Delivery, connect
from ciphermq.errors import ConnectionLost, ServerError
from ciphermq.ports import free_port
from ciphermq.transport import client_tls_context


@pytest.fixture
def open_client():
    """Open Clients; all closed at teardown."""
    with contextlib.ExitStack() as stack:
        def opener(address, **options):
            options.setdefault("timeout", WAIT)
            client = Client(*address, **options)
            stack.callback(client.close)
            return client
        yield opener


def test_publish_consume_ack_round_trip(server, open_client):
    """A message published through the client is pushed to a consumer and its ack confirmed."""
    sender, receiver = open_client(server.address), open_client(server.address)
    sender.publish("default_exchange", "default_key", envelope("rt-1"))
    receiver.consume("default_queue", prefetch=10)
    delivery = receiver.deliveries.get(timeout=WAIT)
    assert isinstance(delivery, Delivery) and delivery.message_id == "rt-1"
    assert b'"delivery_count": 1' in delivery.body
    receiver.ack("rt-1")
    assert server.broker.stats()["totals"]["acked"] == 1


def test_many_publishes_in_flight_on_one_connection(server, proxy_to, open_client):
    """Pipelining: 500 publishes in flight at once on one connection, each ACK matched to its id."""
    proxy = proxy_to()
    client = open_client(proxy.address)
    replies = client.publish_many(
        [("default_exchange", "default_key", envelope("pipe-%d" % i)) for i in range(250)])
    replies += [client.publish_async("default_exchange", "default_key", envelope("pipe-%d" % i))
                for i in range(250, 500)]
    assert [reply.result(WAIT) for reply in replies] == ["ACK pipe-%d" % i for i in range(500)]
    assert proxy.connections == 1
    assert server.broker.stats()["totals"]["published"] == 500


def test_waiting_for_confirmations_never_blocks_pushed_messages(server, open_client):
    """Pushed messages interleave with ACK_CONFIRMED replies; each goes to its owner."""
    sender, receiver = open_client(server.address), open_client(server.address)
    receiver.consume("default_queue", prefetch=0)
    sender.publish_many([("default_exchange", "default_key", envelope("mix-%d" % i))
                         for i in range(200)])
    got = []
    for _ in range(200):
        delivery = receiver.deliveries.get(timeout=WAIT)
        receiver.ack(delivery.message_id)       # blocks for its reply while pushes keep coming
        got.append(delivery.message_id)
    assert sorted(got) == sorted("mix-%d" % i for i in range(200))
    assert server.broker.stats()["totals"]["acked"] == 200


def test_error_reply_raises_server_error_and_the_connection_goes_on(server, open_client):
    """An 'Error: ...' reply raises ServerError for that command only."""
    client = open_client(server.address)
    with pytest.raises(ServerError, match="unknown command 'bogus'"):
        client.call("bogus")
    with pytest.raises(ServerError, match="unknown exchange 'nowhere'"):
        client.publish("nowhere", "default_key", envelope("err-1"))
    client.ping()
    assert not client.lost


def test_broker_going_away_fails_every_waiter(start_server, open_client):
    """When the broker closes the connection, waiters get ConnectionLost and deliveries ends."""
    server = start_server()
    client = open_client(server.address)
    client.consume("default_queue")
    server.stop()
    assert client.deliveries.get(timeout=WAIT) is None
    assert client.lost
    with pytest.raises(ConnectionLost):
        client.ping()


def test_close_is_safe_twice_and_leaves_no_thread(server):
    """close() may be called twice; the reader thread is gone afterwards."""
    before = set(threading.enumerate())
    client = Client(*server.address, timeout=WAIT)
    client.consume("default_queue")
    client.close()
    client.close()
    assert [t.name for t in threading.enumerate()
            if t not in before and t.name.startswith("ciphermq-client")] == []
    with pytest.raises(ConnectionLost):
        client.publish_async("default_exchange", "default_key", envelope("late-1"))


def test_fetch_answers_or_says_empty_and_is_refused_on_a_consumer(server, open_client):
    """fetch returns a Delivery or None, and cannot be mixed with consume on one connection."""
    client = open_client(server.address)
    assert client.fetch("default_queue") is None
    client.publish("default_exchange", "default_key", envelope("fx-1"))
    delivery = client.fetch("default_queue")
    assert delivery.message_id == "fx-1"
    client.ack("fx-1")
    client.consume("default_queue")
    with pytest.raises(RuntimeError):
        client.fetch("default_queue")


def test_names_the_broker_would_refuse_are_refused_before_sending(server, open_client):
    """Invalid names and envelopes raise at once instead of desynchronising the connection."""
    client = open_client(server.address)
    with pytest.raises(clientlib.protocol.ProtocolError):
        client.publish_async("bad exchange", "default_key", envelope("n-1"))
    with pytest.raises(ValueError):
        client.publish_async("default_exchange", "default_key", '{"no_id": 1}')
    client.ping()


def test_a_lost_reply_line_ends_the_connection_instead_of_misattributing(
        server, proxy_to, open_client):
    """If an ACK line goes missing, the next ACK is not taken for it: the connection ends."""
    proxy = proxy_to()
    proxy.drop_line(b"ACK lost-1")
    client = open_client(proxy.address)
    first = client.publish_async("default_exchange", "default_key", envelope("lost-1"))
    second = client.publish_async("default_exchange", "default_key", envelope("lost-2"))
    with pytest.raises(ConnectionLost, match="out of step"):
        first.result(WAIT)
    with pytest.raises(ConnectionLost):
        second.result(WAIT)
    assert proxy.dropped == [b"ACK lost-1"]


def test_heartbeat_detects_a_silently_stalled_connection(server, proxy_to, open_client):
    """A half-open connection (the proxy stops forwarding, closes nothing) is declared dead."""
    proxy = proxy_to()
    client = open_client(proxy.address, heartbeat=0.2)
    client.consume("default_queue")
    proxy.stall()
    assert client.deliveries.get(timeout=WAIT) is None
    with pytest.raises(ConnectionLost, match="presumed dead"):
        client.ping()


def test_heartbeat_keeps_an_idle_healthy_connection(server, proxy_to, open_client):
    """An idle connection to a live broker answers its pings and is not declared dead."""
    proxy = proxy_to()
    client = open_client(proxy.address, heartbeat=0.05, heartbeat_timeout=WAIT)
    client.consume("default_queue")
    with pytest.raises(queue.Empty):
        client.deliveries.get(timeout=0.5)      # ten heartbeats: nothing, in particular no None
    assert proxy.forwarded[True, b"PONG"] >= 3, "idle, the client pings"
    client.ping()


def test_connect_retries_then_gives_up(server):
    """connect() retries an unreachable broker the given number of times, then raises."""
    port = free_port()
    tries = []
    with pytest.raises(ConnectionLost, match="cannot connect"):
        connect("127.0.0.1", port, attempts=3, retry_interval=0.01,
                on_retry=lambda n, exc: tries.append(n))
    assert tries == [1, 2]
    stop = threading.Event()
    stop.set()
    with pytest.raises(ConnectionLost, match="stopped"):
        connect("127.0.0.1", port, stop=stop)
    with connect(*server.address, attempts=1) as client:
        client.ping()


# -- auth and TLS, against the broker's own --users and TLS ---------------------------

@pytest.fixture
def users(tmp_path):
    """A users file: alice may publish to default_exchange and consume default_queue."""
    path = tmp_path / "users.json"
    token = access.add_user(str(path), "alice", ["default_exchange"], ["default_queue"], False)
    return str(path), token


def test_auth_is_sent_first_and_lets_the_client_work(start_server, users, open_client):
    """With auth=(name, token) the client authenticates before anything else and can then work."""
    path, token = users
    server = start_server(users_file=path)
    client = open_client(server.address, auth=("alice", token))
    client.publish("default_exchange", "default_key", envelope("auth-1"))
    client.consume("default_queue")
    assert client.deliveries.get(timeout=WAIT).message_id == "auth-1"


def test_refused_auth_is_a_clear_server_error(start_server, users):
    """A wrong token raises ServerError naming the principal; bad credentials never leave."""
    path, _ = users
    server = start_server(users_file=path)
    with pytest.raises(ServerError, match="authentication as alice refused"):
        Client(*server.address, auth=("alice", "wrong-token"), timeout=WAIT)
    with pytest.raises(ValueError):
        Client(*server.address, auth=("alice", "has space"), timeout=WAIT)


def _tls_server(start_server, certs_dir, **extra):
    return start_server(tls_cert=str(certs_dir / "server.pem"),
                        tls_key=str(certs_dir / "server.key"), **extra)


def test_tls_round_trip_with_concurrent_reads_and_writes(certs, start_server, open_client):
    """Over TLS, pushes are read while acks and publishes are written from other threads."""
    server = _tls_server(start_server, certs[0])
    tls = client_tls_context(str(certs[0] / "ca.pem"))
    sender = open_client(server.address, tls_context=tls)
    receiver = open_client(server.address, tls_context=tls)
    receiver.consume("default_queue", prefetch=0)
    big = envelope("tls-big", ciphertext="QUFB" * 75_000)   # many TLS records in one line
    sender.publish("default_exchange", "default_key", big)
    replies = sender.publish_many([("default_exchange", "default_key", envelope("tls-%d" % i))
                                   for i in range(300)])
    got = []
    for _ in range(301):
        delivery = receiver.deliveries.get(timeout=WAIT)
        got.append(delivery.message_id)
        receiver.ack_async(delivery.message_id)
    assert all(reply.result(WAIT).startswith("ACK tls-") for reply in replies)
    assert sorted(got) == sorted(["tls-big"] + ["tls-%d" % i for i in range(300)])
    receiver.ping()
    assert server.broker.stats()["totals"]["acked"] == 301


def test_tls_refuses_a_broker_with_an_untrusted_certificate(certs, start_server):
    """A client that does not trust the broker's CA fails the handshake with ConnectionLost."""
    server = _tls_server(start_server, certs[0])
    untrusted = client_tls_context(str(certs[1] / "ca.pem"))       # the rogue CA
    with pytest.raises(ConnectionLost, match="certificate verify failed"):
        Client(*server.address, tls_context=untrusted, timeout=WAIT)


def test_mutual_tls_needs_the_client_certificate(certs, start_server, open_client):
    """With client certificates required, a client with one works and one without is refused."""
    good = certs[0]
    server = _tls_server(start_server, good, tls_client_ca=str(good / "ca.pem"))
    ca = str(good / "ca.pem")
    with_cert = client_tls_context(ca, str(good / "alice.pem"), str(good / "alice.key"))
    open_client(server.address, tls_context=with_cert).ping()
    with pytest.raises(ConnectionLost):
        # TLS 1.3 may finish the client's handshake before the refusal arrives.
        open_client(server.address, tls_context=client_tls_context(ca)).ping()
    with pytest.raises(ValueError):
        client_tls_context(ca, key=str(good / "alice.key"))
