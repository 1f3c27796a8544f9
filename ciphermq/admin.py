"""``python -m ciphermq.admin`` (``ciphermq-admin``): look inside a running broker, and tidy it.

    ciphermq-admin queues                  # one line per queue: ready, unacked, consumers
    ciphermq-admin stats                   # the broker's stats JSON, pretty-printed
    ciphermq-admin watch [--count N]       # the queues table, refreshed once a second
    ciphermq-admin purge QUEUE             # drop the queue's ready messages
    ciphermq-admin requeue-dead QUEUE      # move QUEUE.dead back to QUEUE, delivery counts reset
    ciphermq-admin peek QUEUE [N]          # ids, sizes and delivery counts -- never contents

Connection options are the scripts' (``--host``, ``--port``, TLS, ``--auth``:
see :mod:`ciphermq.cli`).  With ``--users`` on the broker, ``purge``,
``requeue-dead`` and ``peek`` need the ``admin`` right and ``stats`` the
``configure`` right (``python -m ciphermq.access add ... --admin --configure``).

Each command is one request over the ordinary line protocol (``stats``,
``purge <queue>``, ``requeue_dead <queue>``, ``peek <queue> [n]``; see
docs/PROTOCOL.md).  Exit status 0 on success, 1 with an ``Error: ...`` line
on stderr if the broker refused or could not be reached, 2 for bad usage.
"""
import argparse
import json
import sys
import threading
import time

from . import cli
from .brokers import connect_any
from .errors import CipherMQError, UsageError


def queues_table(stats):
    """The ``queues`` view: one aligned line per queue (dead-letter queues included)."""
    rows = [("queue", "ready", "unacked", "consumers")]
    for name, queue in sorted(stats["queues"].items()):
        rows.append((name, str(queue["ready"]), str(queue["unacked"]), str(queue["consumers"])))
    width = max(len(row[0]) for row in rows)
    return "\n".join("%-*s %8s %8s %10s" % (width, *row) for row in rows)


def totals_line(stats):
    return "  ".join("%s=%d" % item for item in sorted(stats["totals"].items()))


def watch(client, out, *, interval=1.0, count=None, stop=None, clock=time.strftime):
    """Print the queues table every ``interval`` seconds until ``stop`` is set or ``count`` views.

    The wait between views is ``stop.wait(interval)``: Ctrl-C (which sets
    ``stop``) ends it at once, and a test passes ``interval=0``.
    """
    stop = stop if stop is not None else threading.Event()
    shown = 0
    clear = "\x1b[H\x1b[2J" if out.isatty() else ""
    while not stop.is_set():
        stats = json.loads(client.call("stats"))
        out.write("%sCipherMQ %s:%s at %s (Ctrl-C stops)\n%s\n%s\n\n" % (
            clear, client.address[0], client.address[1], clock("%H:%M:%S"),
            queues_table(stats), totals_line(stats)))
        out.flush()
        shown += 1
        if count is not None and shown >= count:
            break
        stop.wait(interval)
    return shown


def run(args, client, out):
    """Run one parsed command on a connected client; return the exit status."""
    if args.command == "queues":
        out.write(queues_table(json.loads(client.call("stats"))) + "\n")
    elif args.command == "stats":
        out.write(json.dumps(json.loads(client.call("stats")), indent=2, sort_keys=True) + "\n")
    elif args.command == "watch":
        watch(client, out, interval=args.interval, count=args.count, stop=args.stop)
    elif args.command == "purge":
        reply = client.call("purge %s" % args.queue)
        out.write("🧹 [ADMIN] %s: %s ready message(s) purged\n" % (args.queue, reply.split()[1]))
    elif args.command == "requeue-dead":
        reply = client.call("requeue_dead %s" % args.queue)
        out.write("♻️ [ADMIN] %s.dead -> %s: %s message(s) requeued, delivery counts reset\n"
                  % (args.queue, args.queue, reply.split()[1]))
    elif args.command == "peek":
        peeked = json.loads(client.call("peek %s %d" % (args.queue, args.n)))
        out.write("%-40s %10s %10s\n" % ("message id", "bytes", "deliveries"))
        for message in peeked["messages"]:
            out.write("%-40s %10d %10d\n" % (message["id"], message["size"],
                                             message["delivery_count"]))
        out.write("(%d shown; contents stay encrypted and are never shown)\n"
                  % len(peeked["messages"]))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="ciphermq-admin", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_connection_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("queues", help="one line per queue: ready, unacked, consumers")
    commands.add_parser("stats", help="the broker's stats JSON")
    watch_parser = commands.add_parser("watch", help="the queues table, refreshed")
    watch_parser.add_argument("--count", type=cli.positive_int, metavar="N",
                              help="stop after N views (default: until Ctrl-C)")
    watch_parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                              help="between views (default 1)")
    for name, text in (("purge", "drop the queue's ready messages"),
                       ("requeue-dead", "move QUEUE.dead back to QUEUE, delivery counts reset")):
        commands.add_parser(name, help=text).add_argument("queue", metavar="QUEUE")
    peek = commands.add_parser("peek", help="ids, sizes and delivery counts (never contents)")
    peek.add_argument("queue", metavar="QUEUE")
    peek.add_argument("n", nargs="?", type=cli.positive_int, default=10, metavar="N")
    return parser


def main(argv=None, out=None):
    out = out if out is not None else sys.stdout
    args = build_parser().parse_args(argv)
    args.stop = cli.stop_on_signals() if args.command == "watch" else None
    try:
        if any(url.kind != "ciphermq" for url in args.url or ()):
            raise UsageError("ciphermq-admin speaks to CipherMQ brokers only; for RabbitMQ "
                             "use its own tools (rabbitmqctl, the management plugin)")
        options = cli.connection_options(args)
        with connect_any(attempts=1, **options) as client:
            return run(args, client, out)
    except (CipherMQError, TimeoutError) as exc:
        print("Error: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
