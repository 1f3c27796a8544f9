"""ciphermq-admin: every command run as a process against a real broker on port 0."""
import json
import signal
import subprocess
import sys

import pytest
from conftest import WAIT, envelope, parse_message, publish_line

from ciphermq import access
from ciphermq.broker import Broker

PATIENCE = 30.0


def admin(address, *args, auth=None):
    """Run ``python -m ciphermq.admin`` against ``address``; the CompletedProcess."""
    argv = [sys.executable, "-m", "ciphermq.admin", "--host", address[0],
            "--port", str(address[1])]
    if auth:
        argv += ["--auth", auth]
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=PATIENCE)


def publish(wire, count, prefix="m"):
    for number in range(count):
        assert wire.call(publish_line("%s%d" % (prefix, number))) == "ACK %s%d" % (prefix, number)


def dead_letter(wire, message_id):
    """Fetch and nack one message on a broker with max_deliveries=1: it goes to .dead."""
    message_id_seen, _ = parse_message(wire.call("fetch default_queue"))
    assert message_id_seen == message_id
    assert wire.call("nack %s" % message_id) == "NACK_CONFIRMED %s" % message_id


@pytest.fixture
def dead_server(start_server):
    """A broker that dead-letters a message after one delivery."""
    return start_server(max_deliveries=1)


def test_queues_lists_every_queue_with_its_counts(dead_server, connect):
    """`queues` prints one line per queue, dead-letter queues included, with
    ready/unacked/consumers."""
    wire = connect(dead_server.address)
    publish(wire, 3)
    dead_letter(wire, "m0")
    wire.call("fetch default_queue")        # m1 in flight
    done = admin(dead_server.address, "queues")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]}
    assert rows == {"default_queue": ["1", "1", "0"], "default_queue.dead": ["1", "0", "0"]}


def test_stats_prints_the_brokers_json(server, connect):
    """`stats` prints the broker's stats as JSON that parses, with the totals it counted."""
    publish(connect(), 2)
    done = admin(server.address, "stats")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["totals"]["published"] == 2


def test_watch_refreshes_count_times_then_exits(server, connect):
    """`watch --count N` shows exactly N views and exits 0 (the wait between them is an Event)."""
    publish(connect(), 1)
    done = admin(server.address, "watch", "--count", "3", "--interval", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(Ctrl-C stops)") == 3
    assert "default_queue" in done.stdout


def test_watch_stops_on_ctrl_c(server):
    """Ctrl-C (SIGINT) ends `watch` at once with status 0, without a traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ciphermq.admin", "--port", str(server.address[1]), "watch",
         "--interval", "3600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "(Ctrl-C stops)" in proc.stdout.readline()   # the first view is out
        proc.send_signal(signal.SIGINT)
        assert proc.wait(PATIENCE) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_purge_drops_ready_messages_and_leaves_in_flight_ones(server, connect):
    """`purge` drops every ready message, an in-flight one can still be acked, and a purged
    id republished is not stored again."""
    wire = connect()
    publish(wire, 4)
    in_flight, _ = parse_message(wire.call("fetch default_queue"))
    done = admin(server.address, "purge", "default_queue")
    assert done.returncode == 0, done.stderr
    assert "3 ready message(s) purged" in done.stdout
    assert wire.call("ack %s" % in_flight) == "ACK_CONFIRMED %s" % in_flight
    assert wire.call(publish_line("m3")) == "ACK m3"        # a late retry: deduplicated
    assert wire.call("fetch default_queue") == "No messages"


def test_requeue_dead_moves_messages_back_with_counts_reset(dead_server, connect):
    """`requeue-dead` moves <queue>.dead back to <queue>, and the message is delivered as new."""
    wire = connect(dead_server.address)
    publish(wire, 1)
    dead_letter(wire, "m0")
    done = admin(dead_server.address, "requeue-dead", "default_queue")
    assert done.returncode == 0, done.stderr
    assert "1 message(s) requeued" in done.stdout
    message_id, body = parse_message(wire.call("fetch default_queue"))
    assert (message_id, body["delivery_count"]) == ("m0", 1)
    assert wire.call("fetch default_queue.dead") == "No messages"


def test_peek_shows_ids_sizes_and_counts_never_contents(server, connect):
    """`peek QUEUE N` lists the first N ids with sizes and delivery counts and no envelope bytes."""
    wire = connect()
    wire.call("publish default_exchange default_key %s"
              % json.dumps(envelope("secret-1", ciphertext="U0VDUkVUU0VDUkVU")))
    publish(wire, 3)
    done = admin(server.address, "peek", "default_queue", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["secret-1", "m0"]
    assert "m1" not in done.stdout
    assert "U0VDUkVU" not in done.stdout and "Y2lwaGVy" not in done.stdout
    reply = json.loads(wire.call("peek default_queue 1"))
    assert set(reply["messages"][0]) == {"id", "size", "delivery_count"}


@pytest.mark.parametrize("args, says", [
    (("purge", "nope"), "unknown queue 'nope'"),
    (("requeue-dead", "default_queue.dead"), "is a dead-letter queue"),
    (("peek", "default_queue", "5000"), "peek count must be 1 to 1000"),
])
def test_refusals_are_one_error_line_and_status_1(server, args, says):
    """A refused admin command prints one `Error: ...` line naming the problem and exits 1."""
    done = admin(server.address, *args)
    assert done.returncode == 1
    assert done.stderr.startswith("Error: ") and says in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreachable_broker_is_an_error_not_a_traceback(server):
    """With no broker at the address, the CLI says so in one Error line and exits 1."""
    done = admin(("127.0.0.1", 1), "queues")
    assert done.returncode == 1 and done.stderr.startswith("Error: ")


def test_admin_commands_need_the_admin_right(start_server, tmp_path, connect):
    """With --users, purge, requeue_dead and peek are refused without the admin right and
    allowed with it."""
    path = str(tmp_path / "users.json")
    plain = access.add_user(path, "alice", ["*"], ["*"], True)
    boss = access.add_user(path, "boss", [], [], True, admin=True)
    server = start_server(users_file=path)
    for args in (("purge", "default_queue"), ("requeue-dead", "default_queue"),
                 ("peek", "default_queue")):
        refused = admin(server.address, *args, auth="alice:" + plain)
        assert refused.returncode == 1 and "may not administer" in refused.stderr, args
        allowed = admin(server.address, *args, auth="boss:" + boss)
        assert allowed.returncode == 0, allowed.stderr


def test_purge_and_requeue_are_journaled_and_replayed(broker_process, tmp_path):
    """After purge and requeue-dead, a broker killed with SIGKILL and restarted on the same
    --data-dir holds the same messages in the same queues."""
    from conftest import Wire
    data = ["--data-dir", str(tmp_path / "data"), "--max-deliveries", "1"]
    first = broker_process(*data)
    wire = Wire(first.address)
    for queue in ("a", "b"):
        wire.call("declare_queue %s" % queue)
        wire.call("bind default_exchange %s key-%s" % (queue, queue))
        for number in range(3):
            assert wire.call(publish_line("%s%d" % (queue, number), key="key-" + queue)
                             ).startswith("ACK")
        for _ in range(2):          # two of each queue's three dead-lettered
            message_id, _ = parse_message(wire.call("fetch %s" % queue))
            wire.call("nack %s" % message_id)
    assert admin(first.address, "requeue-dead", "a").returncode == 0
    assert admin(first.address, "purge", "b").returncode == 0
    before = {queue: admin(first.address, "peek", queue, "100").stdout
              for queue in ("a", "a.dead", "b", "b.dead")}
    wire.close()
    first.kill()
    second = broker_process(*data)
    after = {queue: admin(second.address, "peek", queue, "100").stdout
             for queue in ("a", "a.dead", "b", "b.dead")}
    ids = {queue: sorted(line.split()[0] for line in text.splitlines()[1:-1])
           for queue, text in after.items()}
    assert ids == {"a": ["a0", "a1", "a2"], "a.dead": [], "b": [], "b.dead": ["b0", "b1"]}
    assert {q: sorted(t.splitlines()[1:-1]) for q, t in before.items()} == \
        {q: sorted(t.splitlines()[1:-1]) for q, t in after.items()}


def test_requeue_dead_hands_messages_to_waiting_consumers():
    """Messages moved back by requeue_dead are pushed at once to the queue's consumers."""
    broker = Broker(max_deliveries=1)
    broker.declare_defaults()
    session = broker.open_session("t")
    broker.publish("default_exchange", "default_key", "m0", b"{}")
    broker.consume(session, "default_queue")
    broker.nack(session, "m0")
    broker.register_consumer(session, "default_queue", 10)
    assert broker.take_pushes(session) == []
    assert broker.requeue_dead("default_queue") == 1
    assert broker.take_pushes(session) == [("m0", b"{}", 1)]


def test_access_add_admin_grants_the_admin_right(tmp_path):
    """`python -m ciphermq.access add FILE NAME --admin` writes a user holding the admin right,
    and a user added without it lacks it."""
    path = tmp_path / "users.json"
    for name, flags in (("boss", ["--admin"]), ("alice", [])):
        subprocess.run([sys.executable, "-m", "ciphermq.access", "add", str(path), name, *flags],
                       check=True, capture_output=True, timeout=PATIENCE)
    rights = {user["name"]: user["admin"] for user in json.loads(path.read_text())["users"]}
    assert rights == {"boss": True, "alice": False}


def test_purge_and_requeue_are_refused_while_the_journal_cannot_write(start_server, tmp_path,
                                                                      monkeypatch, connect):
    """While the journal's disk refuses writes, purge and requeue_dead answer
    'Error: journal write failed' and change nothing."""
    from test_journal_faults import FailingDisk
    server = start_server(data_dir=str(tmp_path / "data"), journal_retry_interval=0.05,
                          max_deliveries=1)
    wire = connect(server.address)
    publish(wire, 2)
    dead_letter(wire, "m0")
    disk = FailingDisk(monkeypatch)
    disk.full.set()
    assert wire.call(publish_line("during")).startswith("Error: journal write failed")
    before = json.loads(wire.call("stats"))["queues"]
    for command in ("purge default_queue", "requeue_dead default_queue"):
        assert wire.call(command).startswith("Error: journal write failed"), command
    assert json.loads(wire.call("stats"))["queues"] == before


def test_admin_speaks_tls_with_the_scripts_options(start_server, certs):
    """With --tls-ca the CLI talks to a TLS broker, and without it gets an Error, not an answer."""
    out, _ = certs
    server = start_server(tls_cert=str(out / "server.pem"), tls_key=str(out / "server.key"))
    done = subprocess.run([sys.executable, "-m", "ciphermq.admin", "--port",
                           str(server.address[1]), "--tls-ca", str(out / "ca.pem"), "queues"],
                          capture_output=True, text=True, timeout=PATIENCE)
    assert done.returncode == 0, done.stderr
    assert "default_queue" in done.stdout
    plain = subprocess.run([sys.executable, "-m", "ciphermq.admin", "--port",
                            str(server.address[1]), "--heartbeat", "1", "queues"],
                           capture_output=True, text=True, timeout=PATIENCE)
    assert plain.returncode == 1 and plain.stderr.startswith("Error: ")


def test_an_amqp_url_is_refused_with_one_line():
    """ciphermq-admin speaks only our line protocol: an amqp:// URL is one Error line, status 1."""
    result = subprocess.run([sys.executable, "-m", "ciphermq.admin", "--url",
                             "amqp://127.0.0.1:1", "queues"],
                            capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: ciphermq-admin speaks to CipherMQ brokers only")
