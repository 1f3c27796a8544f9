"""ciphermq.ports and the ports of a private RabbitMQ cluster: every port picked is free,
below the ephemeral range and different from every other one picked with it."""
import itertools
import os
import socket
import subprocess
import sys

import pytest

from ciphermq import ports, rabbitmq_nodes
from ciphermq.errors import RabbitMQUnavailable


def random_picks(monkeypatch, *values):
    """Make the ports' random choice return ``values`` in turn, then repeat the last."""
    picks = itertools.chain(values, itertools.repeat(values[-1]))
    monkeypatch.setattr(ports.random, "randrange", lambda low, high: next(picks))


def test_ports_asked_for_together_are_all_different_though_the_draw_repeats(monkeypatch):
    """free_ports(n) returns n different ports when the random draw repeats one (picking
    a port at a time, each probe closed before the next, returned the same port twice)."""
    first, second = ports.free_ports(2)
    random_picks(monkeypatch, first, first, first, second)
    assert ports.free_ports(2) == [first, second]


def test_a_port_in_use_or_excluded_is_never_picked(monkeypatch):
    """A port something listens on, and a port in ``taken``, are skipped."""
    busy, excluded, free = ports.free_ports(3)
    with socket.create_server(("127.0.0.1", busy)):
        random_picks(monkeypatch, busy, excluded, free)
        assert ports.free_ports(1, taken=[excluded]) == [free]


def test_ports_lie_below_the_ephemeral_range_and_none_is_bound_afterwards():
    """Picked ports are below the range outgoing connections draw from, and are released."""
    low = ports._ephemeral_low()
    picked = ports.free_ports(50)
    assert len(set(picked)) == 50 and all(1024 <= port < low for port in picked)
    for port in picked:
        socket.create_server(("127.0.0.1", port)).close()


def test_a_machine_whose_ephemeral_range_starts_at_1024_still_gets_different_ports(
        monkeypatch):
    """With no room below the ephemeral range, the kernel picks: still free, still all
    different, still clear of ``taken``."""
    monkeypatch.setattr(ports, "_ephemeral_low", lambda: 1024)
    taken = ports.free_ports(1)
    picked = ports.free_ports(20, taken=taken)
    assert len(set(picked)) == 20 and not set(picked) & set(taken)


def test_running_out_of_tries_is_an_error_not_a_repeat(monkeypatch):
    """When the draw keeps returning one port, asking for two fails instead of repeating it."""
    only = ports.free_port()
    random_picks(monkeypatch, only)
    with pytest.raises(OSError, match="no 2 free port"):
        ports.free_ports(2)


def test_a_clusters_ports_are_all_different_and_keep_clear_of_those_given(monkeypatch,
                                                                          tmp_path):
    """A 3-node cluster's epmd, AMQP and distribution ports are 7 different ports even when
    the draw repeats; ports it is given are never drawn again; given ports that overlap are
    refused before anything starts."""
    drawn = ports.free_ports(7)
    random_picks(monkeypatch, *[port for port in drawn for _ in range(3)])
    cluster = rabbitmq_nodes.Cluster(tmp_path, 3)
    mine = [cluster.epmd_port] + [p for node in cluster.nodes
                                  for p in (node.port, node.dist_port)]
    assert sorted(mine) == sorted(drawn)

    given = drawn[0]
    random_picks(monkeypatch, given + 1, given + 2, *drawn[1:])
    cluster = rabbitmq_nodes.Cluster(tmp_path, 3, base_port=given)
    assert [node.port for node in cluster.nodes] == [given, given + 1, given + 2]
    others = [cluster.epmd_port] + [node.dist_port for node in cluster.nodes]
    assert len(set(others)) == 4 and not set(others) & {given, given + 1, given + 2}

    with pytest.raises(RabbitMQUnavailable, match="overlap"):
        rabbitmq_nodes.Cluster(tmp_path, 2, base_port=given, dist_base_port=given + 1)


def test_only_the_process_holding_a_listener_counts_as_its_owner():
    """_holds_listener names the process that listens on a port: true for it, false for
    another live process and for a port nobody listens on."""
    with subprocess.Popen(
            [sys.executable, "-c", "import socket, sys\n"
             "s = socket.create_server(('127.0.0.1', 0))\n"
             "print(s.getsockname()[1], flush=True)\n"
             "sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as listener:
        port = int(listener.stdout.readline())
        holds = [rabbitmq_nodes._holds_listener(listener.pid, port),
                 rabbitmq_nodes._holds_listener(os.getpid(), port),
                 rabbitmq_nodes._holds_listener(listener.pid, ports.free_port())]
        listener.stdin.close()              # it exits; the with block reaps it
    assert holds == [True, False, False]
