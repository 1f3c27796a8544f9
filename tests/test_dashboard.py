"""The dashboard over real HTTP: /metrics, /api/stats, read-only, tokens, hostile clients."""
import base64
import contextlib
import http.client
import itertools
import json
import logging
import re
import socket
import threading

import pytest
from conftest import WAIT, Wire, envelope, parse_message, publish_line
from processes import BrokerProcess
from prometheus_client.parser import text_string_to_metric_families

from ciphermq import access, metrics
from ciphermq.broker import COPY_OVERHEAD
from ciphermq.config import ServerConfig
from ciphermq.dashboard import Dashboard, load_page
from ciphermq.ports import free_port
from ciphermq.server import BrokerServer

PATHS = ("/", "/api/stats", "/metrics")


def request(address, path="/", method="GET", headers=None):
    """One HTTP request; returns (status, headers, body bytes)."""
    connection = http.client.HTTPConnection(*address, timeout=WAIT)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def scrape(server, headers=None):
    """/metrics parsed by prometheus_client: {(sample name, labels tuple): value}, families."""
    status, reply_headers, body = request(server.dashboard.address, "/metrics", headers=headers)
    assert status == 200
    assert reply_headers["Content-Type"] == metrics.CONTENT_TYPE
    families = list(text_string_to_metric_families(body.decode()))
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in families for sample in family.samples}
    return samples, {family.name: family for family in families}


def queue_label(name):
    return (("queue", name),)


@pytest.fixture
def dashboard_server(start_server):
    return start_server(http_port=0)


@pytest.fixture
def clients(dashboard_server):
    with contextlib.ExitStack() as stack:
        def open_client():
            client = Wire(dashboard_server.address)
            stack.callback(client.close)
            return client
        yield open_client


# -- /metrics -------------------------------------------------------------------

def test_metrics_count_real_publishes_deliveries_and_acks(dashboard_server, clients):
    """/metrics, read by the Prometheus parser, counts what real clients published,
    were delivered and acked, per queue and in total."""
    sender, receiver = clients(), clients()
    assert sender.call("declare_queue lesson") == "Queue declared"
    for number in range(3):
        assert sender.call(publish_line("m-%d" % number).strip()) == "ACK m-%d" % number
    assert receiver.call("consume default_queue") == "Subscribed to queue"
    ids = [parse_message(receiver.line())[0] for _ in range(3)]
    for message_id in ids[:2]:
        assert receiver.call("ack " + message_id) == "ACK_CONFIRMED " + message_id

    samples, families = scrape(dashboard_server)
    assert samples[("ciphermq_messages_published_total", ())] == 3
    assert samples[("ciphermq_messages_delivered_total", ())] == 3
    assert samples[("ciphermq_messages_acked_total", ())] == 2
    assert samples[("ciphermq_messages_redelivered_total", ())] == 0
    assert samples[("ciphermq_messages_dead_lettered_total", ())] == 0
    assert samples[("ciphermq_queue_messages_ready", queue_label("default_queue"))] == 0
    assert samples[("ciphermq_queue_messages_unacked", queue_label("default_queue"))] == 1
    assert samples[("ciphermq_queue_consumers", queue_label("default_queue"))] == 1
    assert samples[("ciphermq_queue_messages_ready", queue_label("lesson"))] == 0
    assert samples[("ciphermq_connections", ())] == 2
    assert families["ciphermq_messages_published"].type == "counter"
    assert families["ciphermq_queue_messages_ready"].type == "gauge"
    assert all(family.documentation for family in families.values())


def test_metrics_count_redeliveries_and_dead_letters(start_server, clients):
    """A message nacked until it runs out of deliveries shows as redelivered and dead-lettered,
    and waits in <queue>.dead."""
    server = start_server(http_port=0, max_deliveries=2)
    client = Wire(server.address)
    try:
        assert client.call(publish_line("doomed").strip()) == "ACK doomed"
        for _ in range(2):
            assert client.call("fetch default_queue").startswith("Message: doomed ")
            assert client.call("nack doomed") == "NACK_CONFIRMED doomed"
    finally:
        client.close()
    samples, _ = scrape(server)
    assert samples[("ciphermq_messages_redelivered_total", ())] == 1
    assert samples[("ciphermq_messages_dead_lettered_total", ())] == 1
    assert samples[("ciphermq_queue_messages_ready", queue_label("default_queue.dead"))] == 1
    assert samples[("ciphermq_queue_messages_ready", queue_label("default_queue"))] == 0


def test_metrics_show_queued_bytes_against_max_memory(start_server):
    """/metrics gives the bytes --max-memory bounds (every fanout copy counted), the
    limit, and how many queues exist."""
    server = start_server(http_port=0, max_memory=1_000_000)
    client = Wire(server.address)
    try:
        line = publish_line("m-1").strip()
        assert client.call(line) == "ACK m-1"
    finally:
        client.close()
    body = line.split(" ", 3)[3]
    samples, _ = scrape(server)
    assert samples[("ciphermq_queued_bytes", ())] == len(body) + COPY_OVERHEAD
    assert samples[("ciphermq_max_memory_bytes", ())] == 1_000_000
    assert samples[("ciphermq_queues", ())] == 1


def test_label_values_are_escaped_for_the_parser():
    """Queue names with a backslash, a quote or a newline come back from the Prometheus
    parser exactly as they went in."""
    awkward = 'back\\slash "quoted"\nnewline'
    snapshot = {"queues": {awkward: {"ready": 7, "unacked": 1, "consumers": 2}},
                "totals": {"published": 9}, "connections": 4}
    samples = {(s.name, tuple(s.labels.items())): s.value
               for family in text_string_to_metric_families(metrics.exposition(snapshot))
               for s in family.samples}
    assert samples[("ciphermq_queue_messages_ready", (("queue", awkward),))] == 7
    assert samples[("ciphermq_queue_consumers", (("queue", awkward),))] == 2
    assert samples[("ciphermq_messages_published_total", ())] == 9
    assert samples[("ciphermq_connections", ())] == 4


# -- /api/stats and rates ------------------------------------------------------------

def test_api_stats_is_the_stats_reply_plus_connections_and_rates(dashboard_server, clients):
    """/api/stats holds exactly what the stats command answers, plus connections and rates."""
    client = clients()
    assert client.call(publish_line("s-1").strip()) == "ACK s-1"
    over_the_wire = json.loads(client.call("stats"))
    status, headers, body = request(dashboard_server.dashboard.address, "/api/stats")
    assert status == 200 and headers["Content-Type"] == "application/json"
    served = json.loads(body)
    assert served["queues"] == over_the_wire["queues"]
    assert served["totals"] == over_the_wire["totals"]
    assert served["connections"] == 1
    assert set(served["rates"]) == set(metrics.RATES)
    assert isinstance(served["history"], list)


def test_rates_are_differences_between_samples_over_a_bounded_ring():
    """Rates are per-second differences of neighbouring samples, and only the last `keep`
    samples are kept (a fake clock: no waiting)."""
    now, published = [100.0], [0]
    sampler = metrics.RateSampler(lambda: {"published": published[0], "acked": 0},
                                  clock=lambda: now[0], keep=3)
    assert sampler.rates()["published"] == 0.0
    for elapsed, total in ((0, 0), (1, 5), (3, 9)):
        now[0], published[0] = 100.0 + elapsed, total
        sampler.sample()
    history = sampler.history()
    assert [(p["t"], p["published"], p["acked"]) for p in history] == [(-2, 5, 0), (0, 2, 0)]
    assert sampler.rates()["published"] == 2
    for elapsed in (4, 5):
        now[0] = 100.0 + elapsed
        sampler.sample()
    assert len(sampler.history()) == 2, "three samples kept, so two rates"


# -- read-only, tokens, no contents ------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_anything_but_get_and_head_is_405(dashboard_server, method):
    """The dashboard is read-only: every other method is 405 with Allow: GET, HEAD."""
    for path in PATHS:
        status, headers, body = request(dashboard_server.dashboard.address, path, method)
        assert status == 405, (method, path)
        assert headers["Allow"] == "GET, HEAD"
        assert body.startswith(b"Error: ")


def test_head_answers_headers_only(dashboard_server):
    """HEAD of every endpoint is 200 with its Content-Length and no body."""
    for path in PATHS:
        status, headers, body = request(dashboard_server.dashboard.address, path, "HEAD")
        assert status == 200 and int(headers["Content-Length"]) > 0 and body == b""


def test_unknown_path_is_404(dashboard_server):
    """A path the dashboard does not serve is a 404 with an Error line."""
    status, _, body = request(dashboard_server.dashboard.address, "/api/messages")
    assert status == 404 and body.startswith(b"Error: not found")


def basic(name, token):
    return {"Authorization": "Basic " + base64.b64encode(
        ("%s:%s" % (name, token)).encode()).decode()}


def test_with_users_every_endpoint_needs_a_token(start_server, tmp_path):
    """With --users: no or wrong credentials are 401, a user without configure is 403, and
    a user with it (the right `stats` needs) sees every endpoint."""
    path = str(tmp_path / "users.json")
    root = access.add_user(path, "root", ["*"], ["*"], True)
    bob = access.add_user(path, "bob", [], ["default_queue"], False)
    server = start_server(http_port=0, users_file=path)
    address = server.dashboard.address
    for path_ in PATHS:
        status, headers, _ = request(address, path_)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
        assert request(address, path_, headers=basic("root", bob))[0] == 401
        assert request(address, path_, headers=basic("nobody", root))[0] == 401
        assert request(address, path_, headers={"Authorization": "Basic !!!"})[0] == 401
        assert request(address, path_, headers={"Authorization": "Bearer " + root})[0] == 401
        assert request(address, path_, headers=basic("bob", bob))[0] == 403
        assert request(address, path_, headers=basic("root", root))[0] == 200
    samples, _ = scrape(server, headers=basic("root", root))
    assert samples[("ciphermq_connections", ())] == 0


def test_no_response_ever_holds_message_contents(start_server):
    """A marker in a published envelope (an extra field and the ciphertext) is never served
    by any endpoint, with the message ready, in flight or dead."""
    marker = "MARKER-7f3a9c"
    ciphertext = base64.b64encode(b"another marker: 51e2d0").decode()
    server = start_server(http_port=0, max_deliveries=1)
    client = Wire(server.address)
    served = []

    def serve_all():
        for path in PATHS + ("/api/stats?" + marker, "/nothing"):
            served.append(request(server.dashboard.address, path)[2])

    try:
        body = envelope("contents-1", ciphertext=ciphertext, note=marker)
        assert client.call("publish default_exchange default_key " + json.dumps(body)) == \
            "ACK contents-1"
        serve_all()
        assert client.call("fetch default_queue").startswith("Message: contents-1 ")
        serve_all()
        assert client.call("nack contents-1") == "NACK_CONFIRMED contents-1"
        assert json.loads(client.call("stats"))["queues"]["default_queue.dead"]["ready"] == 1
        serve_all()
    finally:
        client.close()
    for needle in (marker, ciphertext, "contents-1"):
        assert all(needle.encode() not in reply for reply in served), needle


def test_page_is_self_contained():
    """The page loads nothing from elsewhere: no URL in it but the SVG namespace."""
    page = load_page().decode()
    urls = set(re.findall(r"\w+://[^\s\"')]+", page))
    assert urls == {"http://www.w3.org/2000/svg"}
    assert "src=" not in page and "href=" not in page


# -- hostile clients ---------------------------------------------------------------

def test_oversized_request_is_431_and_the_dashboard_goes_on(dashboard_server):
    """Request line plus headers over the limit get 431 and a clean close; the next request
    is served."""
    address = dashboard_server.dashboard.address
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.0 431 ")
    assert b"Error: request too large" in reply
    assert request(address, "/metrics")[0] == 200


def test_unfinished_request_is_dropped_and_others_are_served(start_server):
    """A request never finished is closed at the request deadline; others are served meanwhile."""
    server = start_server(http_port=0, http_request_timeout=0.5)
    with socket.create_connection(server.dashboard.address, timeout=WAIT) as sock:
        sock.sendall(b"GET /api/stats HTTP/1.0\r\nHost: x\r\n")
        assert request(server.dashboard.address, "/api/stats")[0] == 200
        assert sock.recv(1024) == b"", "closed without an answer"


def test_dripping_request_meets_its_deadline():
    """A client sending a byte at a time is dropped at the deadline: it is checked against
    the clock on every read, not only when a read times out."""
    ticks = itertools.count()
    clock = lambda: float(next(ticks))      # noqa: E731 -- every reading moves time 1 s on
    snapshot = {"queues": {}, "totals": {}, "connections": 0}
    dashboard = Dashboard("127.0.0.1", 0, lambda: dict(snapshot), clock=clock,
                          request_timeout=5.0).start()
    try:
        with socket.create_connection(dashboard.address, timeout=WAIT) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nX-Drip: ")
            closed = threading.Event()
            for _ in range(200):
                try:
                    sock.sendall(b"a")
                    sock.settimeout(0.05)
                    if sock.recv(1024) == b"":
                        closed.set()
                        break
                except socket.timeout:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    closed.set()
                    break
            assert closed.is_set(), "a dripping client kept its connection for 200 reads"
    finally:
        dashboard.stop()


def test_connections_beyond_the_limit_get_503(start_server):
    """Past http_max_connections, a new connection gets 503 at once instead of a thread."""
    server = start_server(http_port=0, http_max_connections=2)
    address = server.dashboard.address
    with contextlib.ExitStack() as stack:
        for _ in range(2):
            held = stack.enter_context(socket.create_connection(address, timeout=WAIT))
            held.sendall(b"GET / HTTP/1.0\r\n")          # unfinished: holds its slot
        extra = stack.enter_context(socket.create_connection(address, timeout=WAIT))
        assert extra.makefile("rb").read().startswith(b"HTTP/1.0 503 ")


def test_dropped_clients_are_info_lines_not_tracebacks(dashboard_server, caplog):
    """Clients that vanish mid-request (reset) leave INFO lines at most, never a traceback."""
    caplog.set_level(logging.DEBUG, logger="ciphermq.dashboard")
    address = dashboard_server.dashboard.address
    for _ in range(20):
        sock = socket.create_connection(address, timeout=WAIT)
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()                                  # RST, whatever the server is doing
    assert request(address, "/metrics")[0] == 200
    try:
        raise BrokenPipeError(32, "Broken pipe")
    except BrokenPipeError:
        dashboard_server.dashboard.http.handle_error(None, ("192.0.2.1", 4242))
    records = [r for r in caplog.records if r.name == "ciphermq.dashboard"]
    assert any("192.0.2.1:4242 dropped" in r.getMessage() for r in records)
    assert all(r.levelno <= logging.INFO and r.exc_info is None for r in records)


# -- lifecycle -----------------------------------------------------------------------

def test_stop_joins_the_dashboard_threads_and_closes_its_port():
    """BrokerServer.stop() stops ciphermq-http and ciphermq-metrics and frees the HTTP port."""
    before = set(threading.enumerate())
    server = BrokerServer(ServerConfig(port=0, http_port=0)).start()
    address = server.dashboard.address
    names = {t.name for t in threading.enumerate()}
    assert {"ciphermq-http", "ciphermq-metrics"} <= names
    assert request(address, "/metrics")[0] == 200
    server.stop()
    leftover = [t for t in threading.enumerate() if t not in before]
    for thread in leftover:         # a request thread may be returning from its last line
        thread.join(WAIT)
    assert [t.name for t in leftover if t.is_alive()] == []
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=WAIT)


def test_busy_dashboard_port_fails_the_start_and_frees_the_broker_port():
    """A dashboard port in use is an error naming it, and the broker port is released."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        broker_port = free_port()
        with pytest.raises(OSError, match="dashboard port %d" % busy):
            BrokerServer(ServerConfig(port=broker_port, http_port=busy))
        BrokerServer(ServerConfig(port=broker_port)).server_close()


def test_dashboard_is_off_unless_asked(start_server):
    """Without http_port there is no dashboard and no HTTP thread."""
    server = start_server()
    assert server.dashboard is None
    assert "ciphermq-http" not in {t.name for t in threading.enumerate()}


def test_http_port_flag_serves_the_dashboard_from_the_command_line():
    """`python -m ciphermq.server --http-port 0` logs the dashboard's address, serves it,
    and still stops cleanly on SIGTERM."""
    broker = BrokerProcess("--http-port", "0")
    try:
        match = re.search(r"Dashboard on http://([\d.]+):(\d+)/", broker.log)
        assert match, broker.log
        address = (match.group(1), int(match.group(2)))
        assert request(address, "/metrics")[0] == 200
        assert b"<title>CipherMQ dashboard</title>" in request(address, "/")[2]
        assert broker.stop() == 0
    finally:
        broker.close()
