"""The broker's TCP server and its command line (``python -m ciphermq.server``).

``BrokerServer`` is a ``socketserver.ThreadingTCPServer``: one accept thread
(``ciphermq-accept``), one handler thread per connection (see
:mod:`ciphermq.connection`), and the redelivery timer.

With ``data_dir`` set, the broker first replays its journal (see
:mod:`ciphermq.journal`) and then appends to it; without it, everything lives
in memory, as in the design document, and a crash loses what is queued.

With ``http_port`` set, a read-only dashboard (see :mod:`ciphermq.dashboard`)
serves the stats over HTTP on the broker's host.

Shutdown order (``stop()``), each step waiting for the one before:

1. stop accepting: the dashboard stops serving and sampling (``ciphermq-http``
   and ``ciphermq-metrics`` joined), then ``shutdown()`` ends ``serve_forever``
   in the accept thread;
2. stop the redelivery timer;
3. shut every open connection's socket down, so its reader sees EOF, hands its
   unacked messages back to the broker and stops its delivery thread;
4. join every handler thread (bounded), then close the listening socket;
5. write what the journal still buffers and close it.
"""
import argparse
import logging
import signal
import socketserver
import sys
import threading
import time

from . import __version__, recovery
from .access import Users
from .broker import Broker
from .chaos import Chaos, ChaosSpecError
from .config import ServerConfig, port_number, seconds_or_zero, switch_interval
from .connection import Connection
from .dashboard import Dashboard
from .envelope import EnvelopeLimits
from .journal import EXIT_DAMAGED, Journal, JournalDamaged, JournalError
from .logins import LoginGuard
from .redelivery import RedeliveryTimer
from .transport import server_tls_context
from .turns import Turns

log = logging.getLogger(__name__)


class BrokerServer(socketserver.ThreadingTCPServer):
    """The broker on a socket.  Use as a context manager, or ``start()``/``stop()``."""

    allow_reuse_address = True      # restart on the same port despite TIME_WAIT
    daemon_threads = True           # a stuck client can never keep the process alive ...
    block_on_close = False          # ... because stop() joins handler threads itself, bounded
    request_queue_size = 1024       # listen backlog: many clients may connect at once

    def __init__(self, config=None, *, clock=time.monotonic):
        self.config = config or ServerConfig()
        #: The broker's and the connections' clock: every deadline is measured on it.
        self.clock = clock
        #: Set when the broker should stop: by a signal in main(), or by a failed journal.
        self.stop_requested = threading.Event()
        self.chaos = Chaos(self.config.chaos, self.config.chaos_seed) if self.config.chaos else None
        self.users = Users.load(self.config.users_file) if self.config.users_file else None
        self.login_guard = LoginGuard(self.config.login_failure_limit,
                                      self.config.login_failure_window, clock=clock)
        #: Readers take turns (ciphermq/turns.py); on the real clock, whatever ``clock`` is:
        #: a turn is CPU time, not a deadline.
        self.turns = Turns(self.config.fair_turn, self.config.fair_max_wait)
        self.envelope_limits = EnvelopeLimits(self.config.max_extra_fields,
                                              self.config.max_json_depth)
        self.tls_context = None
        if self.config.tls_cert:
            self.tls_context = server_tls_context(self.config.tls_cert, self.config.tls_key,
                                                  self.config.tls_client_ca)
        self.journal, state = self._open_journal()
        self.broker = self._make_broker(clock)
        if self.journal is not None:
            restored = self.broker.restore(state)
            log.info("Journal %s: recovered %d message(s), %d queue(s), %d acked id(s)",
                     self.journal.path, restored, len(state.queues), len(state.acked))
            try:
                self.journal.start(snapshot=self.broker.snapshot_to_journal)
            except JournalError:
                self.journal.close()
                raise
        self.broker.declare_defaults()
        #: Guards _connections (the open Connection handlers), _admitted
        #: (accepted and not yet finished, for max_connections), _chaos_for and _stopping.
        self._connections_lock = threading.Lock()
        self._connections = set()
        self._chaos_for = {}        # accepted socket -> its ConnectionChaos, until set up
        self._admitted = 0
        self._stopping = False
        self._timer = RedeliveryTimer(self.broker, self.turns)
        self._accept_thread = None
        self.dashboard = None
        try:
            super().__init__((self.config.host, self.config.port), Connection)
            if self.config.http_port is not None:
                self.dashboard = self._make_dashboard()
        except OSError:
            self.server_close()
            if self.journal is not None:
                self.journal.close()
            raise

    def _open_journal(self):
        """With ``data_dir``: the journal and the state it recovered; else (None, None)."""
        if self.config.data_dir is None:
            return None, None
        journal = Journal(self.config.data_dir,
                          compact_min_bytes=self.config.compact_min_bytes,
                          retry_interval=self.config.journal_retry_interval,
                          repair=self.config.repair)
        journal.on_failure = self.stop_requested.set
        try:
            return journal, recovery.fold(journal.recover())
        except JournalError:
            journal.close()
            raise

    def _make_broker(self, clock):
        config = self.config
        return Broker(
            redelivery_interval=config.redelivery_interval,
            max_deliveries=config.max_deliveries,
            consumer_timeout=config.consumer_timeout,
            max_queue_length=config.max_queue_length,
            max_queues=config.max_queues,
            max_exchanges=config.max_exchanges,
            max_bindings=config.max_bindings,
            max_memory=config.max_memory,
            max_unacked=config.max_unacked,
            dedup_window=config.dedup_window,
            dedup_max_ids=config.dedup_max_ids,
            clock=clock,
            journal=self.journal)

    def _make_dashboard(self):
        config = self.config
        return Dashboard(config.host, config.http_port, self._dashboard_stats, users=self.users,
                         clock=self.broker.clock, request_timeout=config.http_request_timeout,
                         max_request_bytes=config.http_max_request_bytes,
                         max_connections=config.http_max_connections)

    def _dashboard_stats(self):
        """``Broker.stats()`` plus the number of open connections."""
        stats = self.broker.stats()
        with self._connections_lock:
            stats["connections"] = len(self._connections)
        return stats

    @property
    def address(self):
        """The ``(host, port)`` actually bound (the real port when asked for 0)."""
        return self.server_address[:2]

    def start(self):
        """Start accepting and the redelivery timer; returns self.  Does not block."""
        self._timer.start()
        self._accept_thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.2}, name="ciphermq-accept")
        self._accept_thread.start()
        if self.dashboard is not None:
            self.dashboard.start()
        log.info("CipherMQ broker listening on %s:%d", *self.address)
        if self.chaos:
            log.warning("CHAOS MODE ON (%s, seed %s): faults will be injected on purpose",
                        self.chaos.spec, self.config.chaos_seed)
        return self

    def stop(self, timeout=5.0):
        """Stop in the documented order; safe twice, from any thread but the accept thread."""
        if self.dashboard is not None:
            self.dashboard.stop(timeout)
        if self._accept_thread is not None:
            self.shutdown()
            self._accept_thread.join(timeout)
            self._accept_thread = None
        self._timer.stop(timeout)
        with self._connections_lock:
            self._stopping = True
            connections = list(self._connections)
        for connection in connections:
            connection.close()
        for connection in connections:
            connection.thread.join(timeout)
            if connection.thread.is_alive():
                log.warning("Connection %s did not stop within %.1f s", connection.peer, timeout)
        self.server_close()
        if self.journal is not None:
            self.journal.close()
        log.info("CipherMQ broker stopped")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- socketserver hooks ---------------------------------------------------

    def verify_request(self, request, client_address):
        """Admit a connection unless ``max_connections`` are already open."""
        with self._connections_lock:
            if self._admitted < self.config.max_connections:
                self._admitted += 1
                return True
        log.warning("Refusing %s:%s: too many connections (max %d)",
                    client_address[0], client_address[1], self.config.max_connections)
        try:                        # a fresh socket's send buffer is empty: this cannot block
            request.setblocking(False)
            request.send(b"Error: too many connections (max %d)\n" % self.config.max_connections)
        except OSError:
            pass
        return False

    def process_request(self, request, client_address):
        """In the accepting thread, so chaos numbers connections in the order they came."""
        if self.chaos is not None:
            with self._connections_lock:
                self._chaos_for[request] = self.chaos.for_connection()
        super().process_request(request, client_address)

    def connection_chaos(self, request):
        """The ConnectionChaos made for ``request`` at accept time (None without --chaos)."""
        with self._connections_lock:
            return self._chaos_for.pop(request, None)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._admitted -= 1

    def register(self, connection):
        """Called by a starting Connection; False once stop() has begun."""
        with self._connections_lock:
            if self._stopping:
                return False
            self._connections.add(connection)
            return True

    def forget(self, connection):
        """Called by a finishing Connection."""
        with self._connections_lock:
            self._connections.discard(connection)

    def handle_error(self, request, client_address):
        log.exception("Unexpected error on connection from %s:%s", *client_address[:2])


def build_parser():
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="ciphermq-server",
        description="CipherMQ broker: routes encrypted envelopes it cannot read, "
                    "and keeps every message until a receiver acknowledges it.")
    add = parser.add_argument
    add("--host", default=defaults.host, help="address to listen on (default %(default)s)")
    add("--port", type=port_number, default=defaults.port,
        help="port to listen on; 0 = any free port, logged at start (default %(default)s)")
    add("--redelivery-interval", type=float, default=defaults.redelivery_interval,
        metavar="SECONDS", help="redeliver unacked messages after this (default %(default)s)")
    add("--max-deliveries", type=int, default=defaults.max_deliveries,
        help="times a message may be given back (nack, disconnect, timeout) before it goes "
             "to <queue>.dead (default %(default)s)")
    add("--consumer-timeout", type=float, default=defaults.consumer_timeout, metavar="SECONDS",
        help="disconnect a consumer that holds messages and acks nothing for this long, "
             "and requeue them; 0 = never (default %(default)s)")
    add("--max-line-bytes", type=int, default=defaults.max_line_bytes,
        help="longest command line accepted (default %(default)s)")
    add("--max-connections", type=int, default=defaults.max_connections,
        help="open connections at most (default %(default)s)")
    add("--max-queue-length", type=int, default=defaults.max_queue_length,
        help="messages (ready + unacked) per queue at most (default %(default)s)")
    add("--max-queues", type=int, default=defaults.max_queues,
        help="queues that may be declared, <name>.dead included (default %(default)s)")
    add("--max-exchanges", type=int, default=defaults.max_exchanges,
        help="exchanges that may be declared (default %(default)s)")
    add("--max-bindings", type=int, default=defaults.max_bindings,
        help="bindings over all exchanges (default %(default)s)")
    add("--max-extra-fields", type=int, default=defaults.max_extra_fields,
        help="envelope fields beyond the five required (default %(default)s)")
    add("--max-json-depth", type=int, default=defaults.max_json_depth,
        help="nesting depth of extra envelope fields (default %(default)s)")
    add("--prefetch", type=int, default=defaults.default_prefetch, dest="default_prefetch",
        help="unacked pushes per consumer when consume names none; 0 = unlimited "
             "(default %(default)s)")
    add("--write-timeout", type=float, default=defaults.write_timeout, metavar="SECONDS",
        help="drop a client that does not read for this long (default %(default)s)")
    add("--idle-timeout", type=float, default=defaults.idle_timeout, metavar="SECONDS",
        help="drop a client that sends nothing for this long (default: never)")
    add("--dedup-window", type=float, default=defaults.dedup_window, metavar="SECONDS",
        help="remember acked message ids this long, to re-ACK duplicates (default %(default)s)")
    add("--data-dir", default=None, metavar="DIR",
        help="keep a journal here so a crash loses nothing that was ACKed "
             "(default: memory only, as in the design document)")
    add("--line-timeout", type=float, default=defaults.line_timeout, metavar="SECONDS",
        help="drop a client that takes longer than this to finish a line (default %(default)s)")
    add("--auth-timeout", type=float, default=defaults.auth_timeout, metavar="SECONDS",
        help="with --users or TLS: time allowed to authenticate (default %(default)s)")
    add("--users", dest="users_file", default=None, metavar="FILE",
        help="turn access control on (see python -m ciphermq.access); default: off")
    add("--tls-cert", default=None, metavar="PEM", help="serve TLS 1.2+ with this certificate")
    add("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    add("--tls-client-ca", default=None, metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS)")
    add("--compact-min-bytes", type=int, default=defaults.compact_min_bytes, metavar="BYTES",
        help="with --data-dir: never compact a journal smaller than this (default %(default)s)")
    add("--repair", action="store_true",
        help="with --data-dir: if the journal is damaged, keep every intact record and move "
             "the damaged bytes to a new journal.damaged.* file (default: refuse to start)")
    # -- broker-wide bounds against hostile clients (docs/SECURITY.md, "Bounds") --
    add("--max-memory", type=int, default=defaults.max_memory, metavar="BYTES",
        help="queued envelope bytes plus 256 a copy for the broker's own objects, every copy "
             "counted; beyond it publishes are refused (default %(default)s)")
    add("--max-unacked", type=int, default=defaults.max_unacked,
        help="unacked messages one connection may hold, pushed and fetched "
             "(default %(default)s)")
    add("--login-failure-limit", type=int, default=defaults.login_failure_limit,
        help="with --users: failed logins per source address per window before its "
             "logins are refused unchecked (default %(default)s)")
    add("--login-failure-window", type=float, default=defaults.login_failure_window,
        metavar="SECONDS", help="the window of --login-failure-limit (default %(default)s)")
    add("--switch-interval", type=switch_interval, default=defaults.switch_interval,
        metavar="SECONDS",
        help="the interpreter's thread switch interval in the broker process: the longest a "
             "connection woken by its socket waits while another runs (default %(default)s; "
             "Python's own is 0.005)")
    add("--fair-turn", type=seconds_or_zero, default=defaults.fair_turn, metavar="SECONDS",
        help="a connection that has run commands this long while another runs a short read "
             "(a few commands: an interactive client) steps aside for it between two "
             "commands; 0 = never (default %(default)s)")
    add("--chaos", default=None, metavar="SPEC",
        help="inject faults for teaching, e.g. drop-ack=0.05,drop-confirm=0.05,"
             "drop-delivery=0.02,disconnect=0.01,delay-ms=0-20 (default: off)")
    add("--chaos-seed", type=int, default=None, metavar="N",
        help="seed for --chaos: connections, numbered in accept order, each roll their own "
             "seeded dice, so the same connections sending the same commands meet the same "
             "faults (which consumer gets which push still depends on timing)")
    add("--http-port", type=port_number, default=None, metavar="PORT",
        help="serve a read-only dashboard, /api/stats and Prometheus /metrics on this port "
             "of --host; 0 = any free port, logged at start (default: off)")
    add("--log-level", default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="(default %(default)s)")
    add("--version", action="version", version="%(prog)s " + __version__)
    return parser


def config_from_args(args):
    fields = {field for field in ServerConfig.__dataclass_fields__}
    return ServerConfig(**{key: value for key, value in vars(args).items() if key in fields})


def main(argv=None):
    """Run the broker in the foreground until SIGINT or SIGTERM; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Process-wide, so the entry point sets it, not BrokerServer (docs/SECURITY.md,
    # "Hostile neighbours").
    sys.setswitchinterval(args.switch_interval)
    log.info("Interpreter switch interval %g ms", sys.getswitchinterval() * 1000)
    try:
        server = BrokerServer(config_from_args(args))
    except JournalDamaged as exc:
        log.error("%s", exc)
        return EXIT_DAMAGED                 # 4: the journal needs --repair (or a human)
    except (JournalError, ChaosSpecError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("Cannot start on %s:%d: %s", args.host, args.port, exc)
        return 1
    signalled = []

    def request_stop(signum, frame):
        log.info("Received %s, shutting down", signal.Signals(signum).name)
        signalled.append(signum)
        server.stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    server.start()
    while not server.stop_requested.wait(1.0):
        pass
    server.stop()
    return 0 if signalled else 3         # 3: stopped by a journal failure


if __name__ == "__main__":
    sys.exit(main())
