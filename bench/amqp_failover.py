"""AmqpClient figures for docs/SCALING.md: confirmed publishes per second, and the failover gap.

    python bench/amqp_failover.py [--count 2000] [--window 32]

Starts a private one-node RabbitMQ and a 3-node cluster (ciphermq/rabbitmq_nodes.py), each
in a temporary directory, and prints:

* the start time of each;
* confirmed publishes per second through one AmqpClient (quorum queue, persistent,
  mandatory, publisher confirms), one node and three;
* the failover gap: a publisher confirming one message at a time through node 1; node 1 is
  SIGKILLed; the time from the kill to the first confirm through the next URL (loss noticed,
  reconnect, topology re-declared, quorum leader re-elected).

Measured here, never asserted in tests.
"""
import argparse
import sys
import tempfile
import time
import uuid

from ciphermq import rabbitmq_nodes
from ciphermq.amqp import Topology, connect
from ciphermq.errors import ConnectionLost
from ciphermq.urls import Failover


def envelope():
    return {"message_id": str(uuid.uuid4()), "ciphertext": "x" * 400}


def throughput(cluster, count, window):
    topology = Topology(exchange="bench.x", queue="bench-%s" % uuid.uuid4().hex[:6])
    with connect(Failover(cluster.urls), attempts=1, topology=topology, timeout=30) as client:
        started = time.monotonic()
        for first in range(0, count, window):
            batch = [(topology.exchange, topology.routing_key, envelope())
                     for _ in range(min(window, count - first))]
            for reply in client.publish_many(batch):
                reply.result(30)
        return count / (time.monotonic() - started)


def failover_gap(cluster):
    topology = Topology(exchange="gap.x", queue="gap-%s" % uuid.uuid4().hex[:6])
    failover = Failover(cluster.urls)
    client = connect(failover, attempts=1, topology=topology, timeout=5, heartbeat=2)
    nacks = 0
    for _ in range(50):
        client.publish(topology.exchange, topology.routing_key, envelope(), timeout=10)
    killed_at = time.monotonic()
    cluster.nodes[0].kill()
    while True:
        try:
            client.publish(topology.exchange, topology.routing_key, envelope(), timeout=10)
            break
        except (ConnectionLost, TimeoutError) as exc:
            nacks += "nacked" in str(exc)
            client.close()
            client = connect(failover, attempts=None, retry_interval=0.2, topology=topology,
                             timeout=5, heartbeat=2)
    gap = time.monotonic() - killed_at
    client.close()
    return gap, client.peer, nacks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--window", type=int, default=32)
    args = parser.parse_args(argv)
    for size in (1, 3):
        started = time.monotonic()
        with rabbitmq_nodes.running(tempfile.mkdtemp(prefix="amqp-bench-"), size,
                                    prefix="bench%d-" % size) as cluster:
            print("%d node(s) started in %.1f s" % (size, time.monotonic() - started))
            rate = throughput(cluster, args.count, args.window)
            print("  %d confirmed publishes, window %d: %.0f msg/s" % (args.count, args.window,
                                                                     rate))
            if size == 3:
                gap, peer, nacks = failover_gap(cluster)
                print("  failover gap after SIGKILL of node 1: %.2f s (now on %s; %d nack(s) "
                      "on the way)" % (gap, peer, nacks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
