"""AmqpClient against a real private RabbitMQ node (and a 3-node cluster, marked ``cluster``).

The node is started once per session by the ``rabbitmq`` fixture (tests/rabbitmq.py);
every test declares its own exchange and quorum queue.  What the tests look at on
RabbitMQ's side they read with plain pika, not through the client under test.
"""
import json
import os
import subprocess
import sys
import uuid

import pytest
from conftest import envelope
from rabbitmq import amqp_urls, unavailable

from ciphermq import rabbitmq_nodes
from ciphermq.amqp import AmqpClient, Topology, connect, require_pika
from ciphermq.errors import ConnectionLost, MissingDependency, ServerError
from ciphermq.ports import free_port
from ciphermq.urls import Failover, parse_url

WAIT = 10.0


@pytest.fixture
def node(rabbitmq):
    return amqp_urls(rabbitmq)[0]


@pytest.fixture
def clients():
    """Open AmqpClients; every one is closed at teardown."""
    opened = []

    def open_client(url, **options):
        options.setdefault("timeout", WAIT)
        client = AmqpClient(url, **options)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


def peek(url, queue_name):
    """Take one message off ``queue_name`` with plain pika: (properties, body), or None."""
    import pika
    connection = pika.BlockingConnection(pika.ConnectionParameters(host=url.host, port=url.port))
    try:
        method, properties, body = connection.channel().basic_get(queue_name, auto_ack=True)
        return None if method is None else (properties, body)
    finally:
        connection.close()


def queue_length(url, queue_name):
    import pika
    connection = pika.BlockingConnection(pika.ConnectionParameters(host=url.host, port=url.port))
    try:
        return connection.channel().queue_declare(queue_name, passive=True).method.message_count
    finally:
        connection.close()


def next_delivery(client):
    delivery = client.deliveries.get(timeout=WAIT)
    assert delivery is not None, "the connection ended instead"
    return delivery


def dead_url():
    """An amqp URL where nothing listens (a port that was free a moment ago)."""
    return parse_url("amqp://127.0.0.1:%d/" % free_port())


# -- publishing ---------------------------------------------------------------------------

def test_publish_is_acked_by_a_publisher_confirm_and_stored_byte_for_byte(node, clients,
                                                                          topology):
    """ACK <id> arrives once RabbitMQ confirms; the body is the envelope's exact bytes, the id
    its message_id, delivery mode persistent."""
    client = clients(node, topology=topology)
    body = json.dumps(envelope(), indent=None, separators=(", ", ": ")).encode()
    message_id = json.loads(body)["message_id"]
    [reply] = client.publish_many([(topology.exchange, topology.routing_key, body)])
    assert reply.result(WAIT) == "ACK %s" % message_id
    properties, stored = peek(node, topology.queue)
    assert stored == body
    assert properties.message_id == message_id
    assert properties.delivery_mode == 2


def test_unroutable_publish_is_an_error_not_a_silent_drop(node, clients, topology):
    """A message no queue is bound for (mandatory) fails its reply with ServerError."""
    client = clients(node, topology=topology)
    reply = client.publish_async(topology.exchange, "nobody-listens", envelope())
    with pytest.raises(ServerError, match="unroutable"):
        reply.result(WAIT)
    # The connection is still usable afterwards.
    client.publish(topology.exchange, topology.routing_key, envelope(), timeout=WAIT)
    assert queue_length(node, topology.queue) == 1


def test_a_window_of_publishes_is_acked_in_order(node, clients, topology):
    """publish_many returns one reply per message, each resolved with its own id."""
    client = clients(node, topology=topology)
    envelopes = [envelope() for _ in range(50)]
    replies = client.publish_many([(topology.exchange, topology.routing_key, e)
                                   for e in envelopes])
    assert [r.result(WAIT) for r in replies] == ["ACK %s" % e["message_id"] for e in envelopes]
    assert queue_length(node, topology.queue) == 50


def test_a_nack_ends_the_connection_so_the_message_is_sent_again(node, clients):
    """A nacked publish fails with ConnectionLost (the sender reconnects and resends); the
    connection ends, and a publish confirmed before keeps its ACK."""
    import pika
    name = "full-%s" % uuid.uuid4().hex[:8]
    connection = pika.BlockingConnection(pika.ConnectionParameters(host=node.host,
                                                                   port=node.port))
    connection.channel().queue_declare(name, durable=True, arguments={
        "x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"})
    connection.close()
    client = clients(node)
    sent = [envelope() for _ in range(20)]     # the limit is soft: a few may get past it
    replies = client.publish_many([("", name, e) for e in sent])
    assert replies[0].result(WAIT) == "ACK %s" % sent[0]["message_id"]
    outcomes = []
    for reply in replies[1:]:
        try:
            outcomes.append(reply.result(WAIT))
        except ConnectionLost as exc:
            outcomes.append(str(exc))
    nacked = [text for text in outcomes if "nacked message" in text]
    assert nacked, outcomes
    assert client.deliveries.get(timeout=WAIT) is None and client.lost


# -- topology -----------------------------------------------------------------------------

def test_topology_is_a_quorum_queue_declared_idempotently(node, clients, topology):
    """Both sides may declare the same topology again; the queue is a quorum queue."""
    clients(node, topology=topology)
    client = clients(node, topology=topology)
    client.declare(topology)
    import pika
    connection = pika.BlockingConnection(pika.ConnectionParameters(host=node.host,
                                                                   port=node.port))
    channel = connection.channel()
    classic = dict(topology.queue_arguments(), **{"x-queue-type": "classic"})
    try:        # redeclaring it as a classic queue must clash with the quorum queue
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="x-queue-type"):
            channel.queue_declare(topology.queue, durable=True, arguments=classic)
    finally:
        connection.close()


def test_a_conflicting_topology_is_refused_with_the_reason(node, clients, topology):
    """Declaring the queue with another delivery limit is a ServerError naming the clash."""
    clients(node, topology=topology)
    with pytest.raises(ServerError, match="PRECONDITION_FAILED.*x-delivery-limit"):
        clients(node, topology=topology._replace(max_deliveries=7))


def test_bad_topology_is_refused_before_connecting(node):
    """An unknown exchange type is a ValueError, not a broken connection."""
    with pytest.raises(ValueError, match="exchange type"):
        AmqpClient(node, topology=Topology(exchange_type="headers"))


# -- consuming ----------------------------------------------------------------------------

def test_consume_then_ack_removes_the_message(node, clients, topology):
    """A consumed, acked message is gone: it does not come back after the connection closes."""
    publisher = clients(node, topology=topology)
    sent = envelope()
    publisher.publish(topology.exchange, topology.routing_key, sent)
    consumer = clients(node, topology=topology)
    consumer.consume(topology.queue, prefetch=10)
    delivery = next_delivery(consumer)
    assert delivery.message_id == sent["message_id"]
    assert json.loads(delivery.body) == sent
    assert consumer.ack_many([delivery.message_id])[0].result(WAIT) == \
        "ACK_CONFIRMED %s" % sent["message_id"]
    consumer.close()
    assert peek(node, topology.queue) is None


def test_unacked_messages_come_back_after_the_connection_ends(node, clients, topology):
    """Closing without acking returns the delivery to the queue (redelivery, not loss)."""
    publisher = clients(node, topology=topology)
    sent = envelope()
    publisher.publish(topology.exchange, topology.routing_key, sent)
    consumer = clients(node, topology=topology)
    consumer.consume(topology.queue)
    next_delivery(consumer)
    consumer.close()
    properties, _ = peek(node, topology.queue)
    assert properties.message_id == sent["message_id"]


def test_batched_acks_settle_exactly_the_ids_named(node, clients, topology):
    """Acking ids 1 and 3 of 3 leaves id 2 unacked (a multiple ack only when it covers all)."""
    publisher = clients(node, topology=topology)
    sent = [envelope() for _ in range(3)]
    for e in sent:
        publisher.publish(topology.exchange, topology.routing_key, e)
    consumer = clients(node, topology=topology)
    consumer.consume(topology.queue, prefetch=10)
    ids = [next_delivery(consumer).message_id for _ in sent]
    assert ids == [e["message_id"] for e in sent]
    for reply in consumer.ack_many([ids[2], ids[0]]):
        reply.result(WAIT)
    consumer.close()
    properties, _ = peek(node, topology.queue)
    assert properties.message_id == ids[1]
    assert peek(node, topology.queue) is None


def test_a_multiple_ack_covers_a_whole_batch(node, clients, topology):
    """Acking every delivery of a batch (one multiple ack) leaves nothing to redeliver."""
    publisher = clients(node, topology=topology)
    for _ in range(20):
        publisher.publish(topology.exchange, topology.routing_key, envelope())
    consumer = clients(node, topology=topology)
    consumer.consume(topology.queue, prefetch=50)
    ids = [next_delivery(consumer).message_id for _ in range(20)]
    for reply in consumer.ack_many(ids):
        reply.result(WAIT)
    consumer.close()
    assert peek(node, topology.queue) is None


def test_acking_an_id_not_delivered_is_refused(node, clients, topology):
    """An ack for an id this connection holds no delivery of is a ServerError for that ack."""
    consumer = clients(node, topology=topology)
    consumer.consume(topology.queue)
    with pytest.raises(ServerError, match="no unacked delivery"):
        consumer.ack("never-delivered", timeout=WAIT)


def test_reject_moves_the_message_to_the_dead_queue(node, clients, topology):
    """A rejected delivery is not requeued: it lands in <queue>.dead, byte for byte."""
    publisher = clients(node, topology=topology)
    sent = envelope()
    publisher.publish(topology.exchange, topology.routing_key, sent)
    consumer = clients(node, topology=topology)
    consumer.consume(topology.queue)
    delivery = next_delivery(consumer)
    consumer.reject(delivery.message_id, timeout=WAIT)
    dead = clients(node, topology=topology)
    dead.consume(topology.dead_queue)
    dead_letter = next_delivery(dead)
    assert (dead_letter.message_id, dead_letter.body) == (delivery.message_id, delivery.body)
    consumer.close()
    assert queue_length(node, topology.queue) == 0


def test_delivery_limit_dead_letters_after_max_deliveries(node, clients, topology):
    """A message never acked is delivered exactly max_deliveries times, then goes to .dead."""
    topology = topology._replace(max_deliveries=2)
    publisher = clients(node, topology=topology)
    sent = envelope()
    publisher.publish(topology.exchange, topology.routing_key, sent)
    dead = clients(node, topology=topology)
    dead.consume(topology.dead_queue)
    for _ in range(topology.max_deliveries):
        consumer = clients(node, topology=topology)
        consumer.consume(topology.queue)
        assert next_delivery(consumer).message_id == sent["message_id"]
        consumer.close()            # unacked: RabbitMQ counts the return
    assert next_delivery(dead).message_id == sent["message_id"]
    assert queue_length(node, topology.queue) == 0


# -- lost connections and failover ----------------------------------------------------------

def test_failover_skips_a_dead_url(node):
    """connect() over [dead, live] uses the live URL, and records it as the one in use."""
    failover = Failover([dead_url(), node])
    with connect(failover, attempts=1, timeout=WAIT) as client:
        assert client.peer == node.peer
        assert failover.current == 1


def test_connect_gives_up_after_its_attempts_naming_every_url():
    """With no URL answering, connect() raises ConnectionLost after ``attempts`` rounds."""
    failover = Failover([dead_url(), dead_url()])
    retries = []
    with pytest.raises(ConnectionLost, match="cannot connect"):
        connect(failover, attempts=2, retry_interval=0, timeout=2,
                on_retry=lambda tries, error: retries.append(tries))
    assert retries == [1]


def test_a_connection_closed_by_rabbitmq_is_reported_lost(rabbitmq, node, clients, topology):
    """When RabbitMQ drops the connection, ``lost`` turns true and None ends the deliveries."""
    consumer = clients(node, topology=topology)
    consumer.consume(topology.queue)
    broker = rabbitmq.nodes[0]
    subprocess.run([rabbitmq_nodes.CTL_SCRIPT, "-n", broker.name, "close_all_connections",
                    "test"], env=broker.env(), check=True, capture_output=True, timeout=60)
    assert consumer.deliveries.get(timeout=WAIT) is None
    assert consumer.lost
    with pytest.raises(ConnectionLost):
        consumer.publish_async(topology.exchange, topology.routing_key, envelope())


def test_close_is_safe_twice_and_fails_what_is_pending(node, clients, topology):
    """close() twice is harmless; afterwards commands raise ConnectionLost."""
    client = clients(node, topology=topology)
    client.close()
    client.close()
    assert client.lost
    with pytest.raises(ConnectionLost):
        client.ack_many(["x"])


def test_wrong_password_is_a_server_error_not_a_retry(node):
    """A refused login raises ServerError at once (retrying would not help)."""
    url = node._replace(password="wrong")
    with pytest.raises(ServerError, match="refused the login"):
        connect(Failover([url]), attempts=3, timeout=WAIT)


def test_missing_pika_says_how_to_install_it():
    """Without pika an amqp URL fails with the install command, not an ImportError trace."""
    code = ("import sys; sys.modules['pika'] = None\n"
            "from ciphermq.amqp import require_pika\n"
            "from ciphermq.errors import MissingDependency\n"
            "try:\n    require_pika()\nexcept MissingDependency as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "pip install -e '.[amqp]'" in out
    assert require_pika() is not None and issubclass(MissingDependency, Exception)


def test_missing_rabbitmq_fails_under_ci_and_skips_elsewhere(monkeypatch):
    """The fixtures' verdict on a missing RabbitMQ: a failure under CI=true, a skip otherwise."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        unavailable("no rabbitmq-server")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no rabbitmq-server"):
        unavailable("no rabbitmq-server")


@pytest.mark.timeout(rabbitmq_nodes.START_TIMEOUT + 2 * rabbitmq_nodes.STOP_TIMEOUT)
def test_a_node_whose_port_another_node_answers_is_not_taken_for_ready(rabbitmq, tmp_path):
    """Readiness means *this* node logs us in: a new node given the port of a running one
    fails its start with its own exit, though every login on that port succeeds all along
    (before the readiness check asked who answered, the start raised FileNotFoundError)."""
    cluster = rabbitmq_nodes.Cluster(tmp_path / "clash", 1, base_port=rabbitmq.nodes[0].port,
                                     prefix="clash")
    try:
        with pytest.raises(rabbitmq_nodes.RabbitMQUnavailable, match="exited with"):
            cluster.start()
    finally:
        cluster.stop()                              # a no-op unless start wrongly succeeded
    assert not os.path.exists(tmp_path / "clash" / rabbitmq_nodes.STATE_FILE)
    with connect(Failover([amqp_urls(rabbitmq)[0]]), attempts=1, timeout=WAIT):
        pass                                        # the running node is untouched


# -- the cluster ----------------------------------------------------------------------------

@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_confirmed_messages_survive_the_sigkill_of_the_node_in_use(rabbitmq_cluster):
    """Messages confirmed through node 1 are all consumable via another node after node 1 is
    SIGKILLed; the clients see the loss and fail over to the next URL."""
    urls = amqp_urls(rabbitmq_cluster)
    topology = Topology(exchange="c.x", queue="c-%s" % uuid.uuid4().hex[:8], routing_key="k")
    sender_list, receiver_list = Failover(urls), Failover(urls)
    sender = connect(sender_list, attempts=1, topology=topology, timeout=WAIT)
    receiver = connect(receiver_list, attempts=1, topology=topology, timeout=WAIT)
    try:
        assert sender.peer == receiver.peer == urls[0].peer
        sent = [envelope() for _ in range(200)]
        for reply in sender.publish_many([(topology.exchange, topology.routing_key, e)
                                          for e in sent]):
            reply.result(WAIT)
        receiver.consume(topology.queue, prefetch=10)
        first = next_delivery(receiver)
        receiver.ack(first.message_id, timeout=WAIT)

        rabbitmq_cluster.nodes[0].kill()

        assert sender.deliveries.get(timeout=60) is None and sender.lost
        while receiver.deliveries.get(timeout=60) is not None:
            pass                                    # deliveries already in hand, then the end
        assert receiver.lost
    finally:
        sender.close()
        receiver.close()
    with connect(receiver_list, attempts=3, topology=topology, timeout=WAIT) as again:
        assert again.peer == urls[1].peer
        again.consume(topology.queue, prefetch=500)
        seen = {first.message_id}
        while len(seen) < len(sent):
            delivery = again.deliveries.get(timeout=60)
            assert delivery is not None
            seen.add(delivery.message_id)
            again.ack(delivery.message_id, timeout=WAIT)
    assert seen == {e["message_id"] for e in sent}
