"""What the command-line scripts share: connection options, argument types, logging, signals.

``bin/Sender.py`` and ``bin/Receiver.py`` parse their own arguments and call
:mod:`ciphermq.sender` and :mod:`ciphermq.receiver`; the pieces both scripts
need live here so each exists once.
"""
import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from . import amqp, brokers, urls
from .client import check_auth
from .config import port_number
from .errors import MissingDependency, UsageError
from .transport import client_tls_context

#: The checkout the scripts run from: default key paths are resolved against it, so the
#: scripts find ``make keys``'s files from any working directory.
REPO_ROOT = Path(__file__).resolve().parent.parent
MAKE_KEYS_HINT = "run `make keys` in %s, or name the key file with %%s" % REPO_ROOT


def require_pycryptodome(script):
    """Exit with one line saying what to run if this Python cannot import pycryptodome.

    Called by the scripts before they import :mod:`ciphermq.crypto`.
    """
    try:
        from Crypto.Signature import eddsa  # noqa: F401  (pycryptodome's, not PyCrypto's)
    except ImportError:
        print("❌ %s needs pycryptodome, which %s cannot import: run `make install`, then "
              "`.venv/bin/python bin/%s` (or activate .venv first)"
              % (script, sys.executable, script), file=sys.stderr)
        sys.exit(2)


def default_key(name):
    """The default path of a key made by ``make keys``: ``keys/NAME`` in the checkout."""
    return REPO_ROOT / "keys" / name


def key_error(exc, option):
    """The text for an unusable key file; a missing one names ``option`` and ``make keys``."""
    if isinstance(exc.__cause__, FileNotFoundError) or "No such file" in str(exc):
        return "%s: %s" % (exc, MAKE_KEYS_HINT % option)
    return str(exc)


def add_connection_arguments(parser, *, default_port=5672, declare=()):
    """Add the options every client script shares: broker URL or address, TLS, auth,
    heartbeat, and the RabbitMQ topology.

    ``declare`` names the topology options (``"exchange"``, ``"routing_key"``,
    ``"queue"``) the script does not define itself but needs to declare the
    topology on RabbitMQ.
    """
    group = parser.add_argument_group("connection")
    group.add_argument("--url", action="append", type=urls.url_argument, metavar="URL",
                       help="broker URL: ciphermq://host:port (our broker), "
                            "amqp://user:pass@host:port/vhost or amqps://... (RabbitMQ); "
                            "repeat for a failover list (default: ciphermq://HOST:PORT)")
    group.add_argument("--host", default="127.0.0.1", help="broker address (default %(default)s)")
    group.add_argument("--port", type=port_number, default=default_port,
                       help="broker port (default %(default)s)")
    group.add_argument("--heartbeat", type=float, default=5.0, metavar="SECONDS",
                       help="ping the broker after this long without a byte from it; no answer "
                            "within as long again means the connection is dead (default 5)")
    group.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA")
    group.add_argument("--tls-cert", metavar="PEM",
                       help="this client's certificate, for brokers that require one")
    group.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert")
    group.add_argument("--auth", metavar="NAME[:TOKEN]",
                       help="authenticate as NAME (token here, or better from --token-file)")
    group.add_argument("--token-file", metavar="PATH",
                       help="file whose first line is the --auth token")
    rabbit = parser.add_argument_group("RabbitMQ topology (amqp:// URLs; both scripts declare it)")
    defaults = amqp.Topology()
    if "exchange" in declare:
        rabbit.add_argument("--exchange", default=defaults.exchange,
                            help="exchange the queue is bound to (default %(default)s)")
    if "routing_key" in declare:
        rabbit.add_argument("--routing-key", default=defaults.routing_key,
                            help="binding key of the queue (default %(default)s)")
    if "queue" in declare:
        rabbit.add_argument("--queue", default=defaults.queue,
                            help="quorum queue bound to the exchange (default %(default)s)")
    rabbit.add_argument("--exchange-type", choices=amqp.EXCHANGE_TYPES,
                        default=defaults.exchange_type, help="(default %(default)s)")
    rabbit.add_argument("--max-deliveries", type=positive_int, default=defaults.max_deliveries,
                        metavar="N", help="deliveries of a message before RabbitMQ moves it to "
                                          "<queue>.dead (default %(default)s)")


def connection_options(args):
    """Keyword arguments for :func:`ciphermq.brokers.connect_any` from the parsed options.

    Raises UsageError for options that do not fit together, for TLS or token
    files that cannot be read or used, and for amqp:// URLs without pika.
    """
    try:
        return _connection_options(args)
    except UsageError:
        raise
    except (OSError, ValueError) as exc:    # unreadable files (ssl.SSLError too), a bad --auth
        raise UsageError(str(exc)) from None


def _connection_options(args):
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = client_tls_context(args.tls_ca, args.tls_cert, args.tls_key)
    auth = None
    if args.auth:
        name, _, token = args.auth.partition(":")
        if args.token_file:
            if token:
                raise UsageError("give the token in --auth or in --token-file, not both")
            with open(args.token_file, encoding="utf-8") as file:
                token = file.readline().strip()
        auth = (name, token)
        check_auth(*auth)
    elif args.token_file:
        raise UsageError("--token-file needs --auth NAME")
    heartbeat = args.heartbeat if args.heartbeat > 0 else None
    failover = brokers.failover_for(args.host, args.port, args.url)
    topology = None
    if failover.urls[0].kind == "amqp":
        try:
            amqp.require_pika()
        except MissingDependency as exc:        # says how to install it
            raise UsageError(str(exc)) from None
        if auth is not None:
            raise UsageError("--auth is for ciphermq:// brokers; put RabbitMQ's user and "
                             "password in the amqp:// URL")
        if tls is not None and not all(url.tls for url in failover.urls):
            raise UsageError("--tls-* options need amqps:// URLs")
        topology = amqp.Topology(args.exchange, args.exchange_type, args.queue,
                                 args.routing_key, args.max_deliveries).check()
    return {"failover": failover, "topology": topology, "tls_context": tls, "auth": auth,
            "heartbeat": heartbeat}


def positive_int(text):
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def non_negative_int(text):
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def configure_logging(verbose):
    """Library log lines on stderr: INFO with -v, else warnings only."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # pika logs every refused connection and lost node as an error with a traceback;
    # the scripts say it in one status line.  -v shows its warnings.
    logging.getLogger("pika").setLevel(logging.WARNING if verbose else logging.CRITICAL)


def stop_on_signals():
    """An Event that SIGINT and SIGTERM set, for a script's orderly stop (main thread only)."""
    stop = threading.Event()

    def request_stop(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop
