"""Start, inspect and stop a private RabbitMQ cluster on loopback (``make cluster``).

    python bin/cluster.py start                 # 3 nodes, AMQP on 5681-5683, state in .cluster/
    python bin/cluster.py status                # the URLs and the members seen by node 1
    python bin/cluster.py stop                  # stops exactly the processes start made

The nodes keep running after ``start`` exits; ``.cluster/cluster.json`` records
their names, ports and process ids, and ``stop`` signals only those (see
ciphermq/rabbitmq_nodes.py).  ``start`` prints one ``--url`` per node: give them
all to bin/Sender.py and bin/Receiver.py for failover.

Exit status: 0 on success; 1 if RabbitMQ is missing, did not start, not every
node is a running member, or no cluster is recorded.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

# Runnable as ``python bin/cluster.py`` from a checkout, without installing the package.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from ciphermq import rabbitmq_nodes  # noqa: E402  (needs the path above)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="cluster.py", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("start", "status", "stop"))
    parser.add_argument("--dir", default=".cluster", type=Path,
                        help="the cluster's state directory (default %(default)s)")
    parser.add_argument("--size", type=int, default=3, help="nodes (default %(default)s)")
    parser.add_argument("--base-port", type=int, default=5681,
                        help="AMQP port of node 1; node n listens on base+n-1 "
                             "(default %(default)s)")
    parser.add_argument("--dist-port", type=int,
                        help="Erlang distribution port of node 1, likewise (default: 20000 "
                             "above --base-port)")
    parser.add_argument("--epmd-port", type=int, default=4380,
                        help="port of the cluster's own epmd (default %(default)s; the "
                             "system's epmd keeps 4369)")
    args = parser.parse_args(argv)
    if not 1 <= args.size <= 9:
        parser.error("--size must be from 1 to 9")
    if args.dist_port is None:
        args.dist_port = args.base_port + 20000
    for name, first in (("--base-port", args.base_port), ("--dist-port", args.dist_port)):
        if not 1024 <= first <= 65536 - args.size:
            parser.error("%s: node ports must lie from 1024 to 65535" % name)
    return args


def start(args):
    cluster = rabbitmq_nodes.Cluster(args.dir, args.size, base_port=args.base_port,
                                     dist_base_port=args.dist_port, epmd_port=args.epmd_port)
    started = time.monotonic()
    print("🐇 [CLUSTER] starting %d RabbitMQ node(s), state in %s ..." % (args.size, args.dir),
          flush=True)
    cluster.start()
    print("✅ [CLUSTER] %d node(s) up in %.1f s" % (args.size, time.monotonic() - started))
    return show(cluster)


def show(cluster):
    for node in cluster.nodes:
        print("   %s  --url %s  (pid %s)" % (node.name, node.url, node.beam_pid))
    try:
        members = cluster.members()
    except (subprocess.SubprocessError, ValueError, KeyError) as exc:
        print("⚠️ [CLUSTER] cannot ask node 1 for the members: %s" % exc)
        return 1
    print("   running members: %s" % ", ".join(members))
    return 0 if len(members) == len(cluster.nodes) else 1


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.action == "start":
            return start(args)
        cluster = rabbitmq_nodes.Cluster.load(args.dir)
    except rabbitmq_nodes.RabbitMQUnavailable as exc:
        print("❌ [CLUSTER] %s" % exc, file=sys.stderr)
        return 1
    except OSError:
        print("❌ [CLUSTER] no cluster recorded in %s (start one with 'make cluster')"
              % args.dir, file=sys.stderr)
        return 1
    if args.action == "status":
        return show(cluster)
    cluster.stop()
    print("🛑 [CLUSTER] stopped %d node(s) and their epmd; state kept in %s"
          % (len(cluster.nodes), args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
