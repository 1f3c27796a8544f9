"""Start and stop a private RabbitMQ node for the benchmark comparison (peer mode).

``private_rabbitmq()`` runs Debian's ``rabbitmq-server`` as a throw-away node that shares
nothing with a system RabbitMQ or with CipherMQ (which owns port 5672): its own node name,
AMQP, distribution and epmd ports on 127.0.0.1 (picked free), its own HOME (so its own
Erlang cookie), Mnesia, logs and config in a temporary directory that is removed
afterwards.  The work is done by ``ciphermq/rabbitmq_nodes.py``, which also starts the
3-node cluster of ``make cluster`` and the tests' nodes; this module keeps the benchmark's
interface to it.

Install on a fresh Debian machine with ``make rabbitmq-install`` (as root: apt-get install
rabbitmq-server, then stop the system node the package may start on 5672).  Readiness is
checked with a real AMQP login through pika, so pika must be installed.
"""

import contextlib
import tempfile

from ciphermq import rabbitmq_nodes
from ciphermq.rabbitmq_nodes import RabbitMQUnavailable, check_installed

__all__ = ["RabbitMQUnavailable", "check_installed", "private_rabbitmq"]


@contextlib.contextmanager
def private_rabbitmq(port=None):
    """Run a private RabbitMQ node for the duration of the ``with`` block.

    Yields a dict ``{"host", "port", "pid", "node", "wrapper_pid"}`` where ``pid`` is the
    beam.smp process (use it with ``processes.rss_mib``). Blocks while starting; raises
    :class:`RabbitMQUnavailable` if RabbitMQ or pika is missing or the node fails to start.
    The node, its epmd and its files are gone when the block exits, however it exits.
    """
    check_installed()
    directory = tempfile.mkdtemp(prefix="bench-rabbitmq-")
    with rabbitmq_nodes.running(directory, size=1, base_port=port, prefix="bench") as cluster:
        node = cluster.nodes[0]
        yield {"host": "127.0.0.1", "port": node.port, "pid": node.beam_pid,
               "node": node.name, "wrapper_pid": node.wrapper_pid}


if __name__ == "__main__":
    from processes import rss_mib

    with private_rabbitmq() as info:
        print("RabbitMQ up:", info, f"RSS {rss_mib(info['pid']):.1f} MiB")
