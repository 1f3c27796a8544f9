"""Fixtures for the AMQP tests: private RabbitMQ nodes, started once per session.

``rabbitmq`` is one node; ``rabbitmq_cluster`` three (tests that use it are
marked ``cluster``).  Both run Debian's rabbitmq-server on free loopback ports
with their state in pytest's temporary directory (ciphermq/rabbitmq_nodes.py),
and are stopped, by pid, at the end of the session.

Without rabbitmq-server or pika the tests that need them are skipped with the
reason -- except under ``CI=true``, where they fail: CI installs RabbitMQ
(.ci/run), so a missing one is a broken CI, not a reason to skip.
"""
import os
import uuid

import pytest

from ciphermq import rabbitmq_nodes
from ciphermq.amqp import Topology
from ciphermq.urls import parse_url


def unavailable(reason):
    """Skip with ``reason``; under CI=true fail instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true and RabbitMQ is unavailable: %s" % reason, pytrace=False)
    pytest.skip(reason)


def _start(tmp_path_factory, size):
    try:
        rabbitmq_nodes.check_installed()
    except rabbitmq_nodes.RabbitMQUnavailable as exc:
        unavailable(str(exc))
    cluster = rabbitmq_nodes.Cluster(tmp_path_factory.mktemp("rabbitmq%d-" % size), size,
                                     prefix="test%d-" % size)
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory):
    """One private RabbitMQ node for the session (a rabbitmq_nodes.Cluster of size 1)."""
    cluster = _start(tmp_path_factory, 1)
    yield cluster
    cluster.stop(remove=True)


@pytest.fixture(scope="session")
def rabbitmq_cluster(tmp_path_factory):
    """Three clustered RabbitMQ nodes for the session."""
    cluster = _start(tmp_path_factory, 3)
    yield cluster
    cluster.stop(remove=True)


@pytest.fixture
def topology():
    """A topology no other test uses: its own exchange and quorum queue on the shared node."""
    name = "t-%s" % uuid.uuid4().hex[:10]
    return Topology(exchange=name + ".x", queue=name, routing_key="key", max_deliveries=3)


def amqp_urls(cluster):
    """The cluster's nodes as parsed URLs, node 1 first."""
    return [parse_url(url) for url in cluster.urls]
