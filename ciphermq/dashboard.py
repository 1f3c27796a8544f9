"""The broker's read-only web face (``--http-port``): a live page, JSON and Prometheus.

``Dashboard`` owns a ``http.server.ThreadingHTTPServer`` (accept thread
``ciphermq-http``, one daemon thread per request) and a
:class:`~ciphermq.metrics.RateSampler` (thread ``ciphermq-metrics``).  It serves

* ``/``            the page (``dashboard.html``: HTML, CSS and JS inline, nothing
                   from the internet), which fetches ``/api/stats`` every second;
* ``/api/stats``   the ``stats`` JSON plus ``connections``, ``rates`` and ``history``;
* ``/metrics``     Prometheus text exposition format 0.0.4.

It only reads: GET and HEAD, anything else is ``405``.  Its numbers come from
``Broker.stats()`` (which takes the broker mutex exactly as the ``stats``
command does) and never include a message id or a byte of a message.

With ``--users`` every request needs HTTP Basic credentials: a user name and
its token, checked by :class:`~ciphermq.access.Users`, of a user allowed to
``configure`` (the right the ``stats`` command needs); otherwise ``401``
(``403`` for a valid user without the right).

Hostile clients: one connection serves one request (HTTP/1.0); the request
line and headers together may be ``max_request_bytes`` long (``431``) and must
arrive within ``request_timeout`` seconds of the connection, checked on every
read (else the connection is closed, with an INFO line); at most
``max_connections`` are served at once; a client that drops its connection is
an INFO line, never a traceback.
"""
import base64
import binascii
import http.server
import io
import json
import logging
import socket
import sys
import threading
import time
from importlib import resources

from . import metrics
from .errors import ProtocolError

log = logging.getLogger(__name__)

READ_METHODS = ("GET", "HEAD")


def load_page():
    """The page's bytes (ciphermq/dashboard.html, shipped with the package)."""
    return resources.files(__package__).joinpath("dashboard.html").read_bytes()


class Dashboard:
    """The HTTP server and the rate sampler, started and stopped together.

    ``read_stats`` returns a snapshot: ``Broker.stats()`` plus ``"connections"``.
    Binds in the constructor (``OSError`` if it cannot); ``address`` is the real
    one when ``port`` is 0.
    """

    def __init__(self, host, port, read_stats, *, users=None, clock=time.monotonic,
                 request_timeout=10.0, max_request_bytes=8192, max_connections=32,
                 sample_interval=1.0, keep_samples=300):
        self.read_stats = read_stats
        self.users = users
        self.clock = clock          # request deadlines and samples (injectable for tests)
        self.sampler = metrics.RateSampler(lambda: read_stats()["totals"], clock,
                                           sample_interval, keep_samples)
        try:
            self.http = DashboardServer((host, port), self, request_timeout=request_timeout,
                                        max_request_bytes=max_request_bytes,
                                        max_connections=max_connections)
        except OSError as exc:      # say which of the broker's two ports it was
            raise OSError(exc.errno, "dashboard port %d: %s" % (port, exc.strerror)) from None
        self.page = load_page()
        self._thread = None

    @property
    def address(self):
        return self.http.server_address[:2]

    def snapshot(self):
        """What /api/stats serves: stats, connections, latest rates and their history."""
        snapshot = self.read_stats()
        snapshot["rates"] = self.sampler.rates()
        snapshot["history"] = self.sampler.history()
        snapshot["sample_interval"] = self.sampler.interval
        return snapshot

    def start(self):
        self.sampler.start()
        self._thread = threading.Thread(target=self.http.serve_forever,
                                        kwargs={"poll_interval": 0.2}, name="ciphermq-http")
        self._thread.start()
        log.info("Dashboard on http://%s:%d/ (also /api/stats, /metrics)", *self.address)
        return self

    def stop(self, timeout=5.0):
        """Stop accepting, let requests being served finish (bounded), stop sampling.

        Safe twice.  A request still unfinished after ``timeout`` is left to its
        daemon thread, which ends at its own request deadline.
        """
        if self._thread is not None:
            self.http.shutdown()
            self._thread.join(timeout)
            self._thread = None
            if not self.http.wait_idle(timeout):
                log.warning("Dashboard requests still open after %.1f s", timeout)
        self.sampler.stop(timeout)
        self.http.server_close()


class DashboardServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a connection cap and quiet handling of dropped clients."""

    daemon_threads = True           # a stuck client can never keep the process alive
    block_on_close = False          # stop() does not wait for them: they only read
    allow_reuse_address = True

    def __init__(self, address, dashboard, *, request_timeout, max_request_bytes,
                 max_connections):
        self.dashboard = dashboard
        self.request_timeout = request_timeout
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        #: Guards _active (connections being served, for max_connections).
        self._active_lock = threading.Lock()
        #: On _active_lock; notified when _active drops to 0 (stop() waits for it).
        self.idle = threading.Condition(self._active_lock)
        self._active = 0
        super().__init__(address, DashboardHandler)

    def verify_request(self, request, client_address):
        """Admit a connection unless ``max_connections`` are being served."""
        with self._active_lock:
            if self._active < self.max_connections:
                self._active += 1
                return True
        log.info("Dashboard refusing %s:%s: too many connections (max %d)",
                 client_address[0], client_address[1], self.max_connections)
        try:                        # a fresh socket's send buffer is empty: this cannot block
            request.setblocking(False)
            request.send(b"HTTP/1.0 503 Service Unavailable\r\nConnection: close\r\n\r\n")
        except OSError:
            pass
        return False

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1
                if not self._active:
                    self.idle.notify_all()

    def wait_idle(self, timeout):
        """Block until no connection is being served, or ``timeout``; False on timeout."""
        with self._active_lock:
            return self.idle.wait_for(lambda: not self._active, timeout)

    def handle_error(self, request, client_address):
        """A client that went away is news, not a bug; anything else is logged in full."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):            # reset, broken pipe, timeout
            log.info("Dashboard client %s:%s dropped: %s", *client_address[:2], exc)
        else:
            log.exception("Dashboard: unexpected error serving %s:%s", *client_address[:2])


class RequestReader(io.RawIOBase):
    """The socket as a raw stream that enforces the request's deadline and size.

    Every read first checks the clock against the deadline (so a client that
    sends one byte at a time still meets it) and the bytes taken so far
    against ``max_bytes``.
    """

    def __init__(self, sock, deadline, max_bytes, clock=time.monotonic):
        self._sock = sock
        self._deadline = deadline
        self._max_bytes = max_bytes
        self._clock = clock
        self.taken = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.taken >= self._max_bytes:
            raise ProtocolError("request too large (max %d bytes of request line and headers)"
                                % self._max_bytes)
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            raise socket.timeout("request not complete in time")
        self._sock.settimeout(remaining)
        count = self._sock.recv_into(buffer)
        self.taken += count
        return count


class DashboardHandler(http.server.BaseHTTPRequestHandler):
    """One request: GET or HEAD of /, /api/stats or /metrics."""

    server_version = "CipherMQ-dashboard"
    protocol_version = "HTTP/1.0"   # one request per connection: the deadline is per request

    def setup(self):
        self.timeout = self.server.request_timeout
        super().setup()
        clock = self.server.dashboard.clock
        deadline = clock() + self.server.request_timeout
        self.rfile = io.BufferedReader(
            RequestReader(self.connection, deadline, self.server.max_request_bytes, clock), 1024)

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except ProtocolError as exc:
            log.info("Dashboard client %s refused: %s", self.address_string(), exc)
            self.close_connection = True
            self.connection.settimeout(self.server.request_timeout)
            self.wfile.write(b"HTTP/1.0 431 Request Header Fields Too Large\r\n"
                             b"Content-Type: text/plain; charset=utf-8\r\n"
                             b"Connection: close\r\n\r\nError: %s\n" % str(exc).encode())

    def parse_request(self):
        """The stdlib's parsing, then: only GET and HEAD are served."""
        if not super().parse_request():
            return False
        self.connection.settimeout(self.server.request_timeout)    # now: the write deadline
        if self.command not in READ_METHODS:
            self._reply(405, "text/plain; charset=utf-8",
                        b"Error: the dashboard is read-only (GET and HEAD only)\n",
                        [("Allow", ", ".join(READ_METHODS))])
            return False
        return True

    def do_GET(self):
        if not self._authorised():
            return
        path = self.path.split("?", 1)[0]
        dashboard = self.server.dashboard
        if path in ("/", "/index.html"):
            self._reply(200, "text/html; charset=utf-8", dashboard.page)
        elif path == "/api/stats":
            body = json.dumps(dashboard.snapshot(), sort_keys=True).encode()
            self._reply(200, "application/json", body)
        elif path == "/metrics":
            body = metrics.exposition(dashboard.read_stats()).encode()
            self._reply(200, metrics.CONTENT_TYPE, body)
        else:
            self._reply(404, "text/plain; charset=utf-8",
                        b"Error: not found (try /, /api/stats or /metrics)\n")

    do_HEAD = do_GET

    def _authorised(self):
        """True if access control is off or the request names an allowed user."""
        users = self.server.dashboard.users
        if users is None:
            return True
        name, token = parse_basic(self.headers.get("Authorization", ""))
        principal = users.authenticate(name, token) if name is not None else None
        if principal is None:
            self._reply(401, "text/plain; charset=utf-8",
                        b"Error: authentication required (HTTP Basic: user name and token)\n",
                        [("WWW-Authenticate", 'Basic realm="CipherMQ", charset="UTF-8"')])
            return False
        if not principal.configure:
            self._reply(403, "text/plain; charset=utf-8",
                        b"Error: not allowed: %s may not read broker stats\n"
                        % principal.name.encode())
            return False
        return True

    def _reply(self, status, content_type, body, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # Everything the page needs is in the page; it may only talk back to us.
        self.send_header("Content-Security-Policy",
                         "default-src 'none'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):
        """Request lines go to the ``ciphermq.dashboard`` logger at DEBUG, not stderr."""
        log.debug("Dashboard %s: " + format, self.address_string(), *args)

    def log_error(self, format, *args):
        log.info("Dashboard %s: " + format, self.address_string(), *args)


def parse_basic(header):
    """``(name, token)`` from an HTTP Basic ``Authorization`` header, or ``(None, None)``."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    name, colon, token = decoded.partition(":")
    return (name, token) if colon else (None, None)
