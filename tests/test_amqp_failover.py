"""bin/Sender.py and bin/Receiver.py over RabbitMQ with ``--url``, as processes.

One private node (the ``rabbitmq`` fixture) for the plain runs; the 3-node cluster
(``rabbitmq_cluster``, marked ``cluster``) for the failover run: 5,000 messages, the
node both scripts are connected to SIGKILLed mid-stream and the receiver SIGKILLed
once -- every message confirmed, none lost, none stored twice.  The verdict is the
checker's (ciphermq/checker.py), from the files the scripts leave behind.  Each test
declares its own exchange and quorum queue.
"""
import json
import re
import subprocess
import sys
import uuid

import pytest
from scripts import RECEIVER, REPO, SENDER, intact_ids, read_records, script_env

from ciphermq import checker, rabbitmq_nodes

#: How long a step of a run may take before the test fails (a bound, never a sleep).
PATIENCE = 120.0
CLUSTER_DEMO = str(REPO / "bin" / "cluster_demo.py")
SAVED = re.compile(r"\[RECEIVER\] (?:so far: )?(\d+) message\(s\) saved")


def names():
    """Options giving a test its own exchange and queue (and so its own dead queue)."""
    name = "f-%s" % uuid.uuid4().hex[:10]
    return ["--exchange", name + ".x", "--queue", name]


def url_args(cluster):
    return [arg for url in cluster.urls for arg in ("--url", url)]


def sender_argv(tmp_path, keys, *args):
    return [sys.executable, SENDER, "--public-key", str(keys[1]),
            "--outbox", str(tmp_path / "outbox.json"),
            "--record", str(tmp_path / "record.json"), *args]


def receiver_argv(tmp_path, keys, *args):
    return [sys.executable, RECEIVER, "--private-key", str(keys[0]),
            "--output", str(tmp_path / "out.json"), *args]


def verdict(tmp_path):
    return checker.check([tmp_path / "record.json"], tmp_path / "out.json",
                         outboxes=[tmp_path / "outbox.json"])


def wait_saved(receiver, at_least):
    """Block until the receiver's progress line says ``at_least`` messages saved (this run)."""
    while True:
        saved = int(SAVED.search(receiver.wait_for("message(s) saved", PATIENCE)).group(1))
        if saved >= at_least:
            return saved


def test_scripts_run_over_rabbitmq_with_url(rabbitmq, keys, tmp_path, spawn):
    """With --url amqp://..., the Sender's messages are each stored once by the Receiver,
    every one confirmed, over a quorum queue both scripts declare."""
    topology = names()
    receiver = spawn(receiver_argv(tmp_path, keys, *url_args(rabbitmq), *topology,
                                   "--max-messages", "50"))
    receiver.wait_for("Subscribed to", PATIENCE)
    sent = subprocess.run(sender_argv(tmp_path, keys, *url_args(rabbitmq), *topology,
                                      "--count", "50"),
                          capture_output=True, text=True, timeout=PATIENCE, env=script_env())
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert receiver.wait(PATIENCE) == 0, receiver.stdout + receiver.stderr
    tally = verdict(tmp_path)
    assert tally.ok and len(tally.acked) == len(tally.stored) == 50, tally.report()
    messages = sorted(record["message"] for record in read_records(tmp_path / "out.json"))
    assert messages == sorted("Test message %d of 50" % i for i in range(1, 51))


def test_a_refused_envelope_is_dead_lettered_not_acked(rabbitmq, keys, tmp_path, spawn):
    """An envelope the Receiver refuses is rejected without requeue: it lands in
    <queue>.dead on RabbitMQ, its reason in the rejects file, and never comes back."""
    import pika
    topology = names()
    queue_name = topology[-1]
    receiver = spawn(receiver_argv(tmp_path, keys, *url_args(rabbitmq), *topology,
                                   "--max-messages", "1"))
    receiver.wait_for("Subscribed to", PATIENCE)
    node = rabbitmq.nodes[0]
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", node.port))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        bogus = {"message_id": "bogus-1", "ciphertext": "not sealed for anyone"}
        channel.basic_publish(topology[1], "default_key", json.dumps(bogus).encode(),
                              pika.BasicProperties(message_id="bogus-1", delivery_mode=2),
                              mandatory=True)
        receiver.wait_for("Message bogus-1 rejected", PATIENCE)
        sent = subprocess.run(sender_argv(tmp_path, keys, *url_args(rabbitmq), *topology,
                                          "--message", "after the bogus one"),
                              capture_output=True, text=True, timeout=PATIENCE,
                              env=script_env())
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert receiver.wait(PATIENCE) == 0, receiver.stdout + receiver.stderr
        method, _, body = channel.basic_get(queue_name + ".dead", auto_ack=True)
        assert method is not None and json.loads(body)["message_id"] == "bogus-1"
        assert channel.queue_declare(queue_name, passive=True).method.message_count == 0
    finally:
        connection.close()
    assert [r["message_id"] for r in read_records(tmp_path / "out.rejects.json")] == ["bogus-1"]


def test_bad_url_options_are_one_line_and_exit_2(tmp_path, keys):
    """A malformed --url, a list mixing brokers, or --auth with amqp:// each end the
    script with status 2 and a message naming the problem, never a traceback."""
    cases = [(["--url", "amqp://h:0/"], "port"),
             (["--url", "ciphermq://127.0.0.1:1", "--url", "amqp://127.0.0.1:2/"], "mix"),
             (["--url", "amqp://127.0.0.1:2/", "--auth", "alice:token"], "--auth")]
    for args, reason in cases:
        for argv in (sender_argv(tmp_path, keys, *args), receiver_argv(tmp_path, keys, *args)):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=PATIENCE,
                                  env=script_env())
            assert done.returncode == 2, done.stdout + done.stderr
            assert reason in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_5000_messages_survive_the_sigkill_of_the_node_in_use_and_of_the_receiver(
        rabbitmq_cluster, keys, tmp_path, spawn):
    """5,000 messages through the 3-node cluster, the node both scripts use SIGKILLed
    mid-stream and the receiver SIGKILLed once: every message confirmed, 0 lost,
    0 duplicated in the output."""
    total = 5000
    rabbitmq_cluster.revive()               # whole again if an earlier test killed a node
    topology, urls = names(), url_args(rabbitmq_cluster)
    first = spawn(receiver_argv(tmp_path, keys, *urls, *topology))
    subscribed = first.wait_for("Subscribed to", PATIENCE)
    node = rabbitmq_cluster.nodes[0]
    assert subscribed.endswith("127.0.0.1:%d" % node.port), subscribed
    sender = spawn(sender_argv(tmp_path, keys, *urls, *topology, "--count", str(total)))

    wait_saved(first, 1000)
    node.kill()                             # the node both connected to: the first URL
    first.discard_unread()
    wait_saved(first, 2500)                 # after the failover, on another node
    first.kill()
    already = len(intact_ids(tmp_path / "out.json"))
    assert already < total
    second = spawn(receiver_argv(tmp_path, keys, *urls, *topology,
                                 "--max-messages", str(total - already)))

    assert sender.wait(PATIENCE * 3) == 0, sender.stdout + sender.stderr
    assert second.wait(PATIENCE * 3) == 0, second.stdout + second.stderr
    tally = verdict(tmp_path)
    assert len(tally.acked) == total, tally.report()
    assert tally.ok and len(tally.stored) == total and not tally.duplicated, tally.report()


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_cluster_demo_kills_the_node_in_use_and_loses_nothing(rabbitmq_cluster, keys):
    """bin/cluster_demo.py (make cluster-demo) SIGKILLs the node both scripts use mid-stream,
    exits 0 on the checker's clean verdict, and leaves the cluster whole."""
    rabbitmq_cluster.revive()
    done = subprocess.run([sys.executable, CLUSTER_DEMO, "--dir", rabbitmq_cluster.directory,
                           "--keys", str(keys[0].parent), "--count", "600", "--kill-at", "150"],
                          capture_output=True, text=True, timeout=PATIENCE * 4, env=script_env())
    loaded = rabbitmq_nodes.Cluster.load(rabbitmq_cluster.directory)
    for node, recorded in zip(rabbitmq_cluster.nodes, loaded.nodes):   # so the fixture stops
        node.wrapper_pid, node.beam_pid = recorded.wrapper_pid, recorded.beam_pid  # the new one
    assert done.returncode == 0, done.stdout + done.stderr
    assert "💥 [DEMO] SIGKILL %s" % rabbitmq_cluster.nodes[0].name in done.stdout
    assert "0 lost, 0 duplicated" in done.stdout
    assert "started %s again" % rabbitmq_cluster.nodes[0].name in done.stdout
    assert not rabbitmq_cluster.revive(), "the demo left a node down"


def test_an_amqp_url_without_pika_says_how_to_install_it(tmp_path, keys):
    """Without pika, --url amqp://... ends each script with one line naming the install
    command and exit status 2, no traceback."""
    blocker = tmp_path / "nopika"
    (blocker / "pika").mkdir(parents=True)
    (blocker / "pika" / "__init__.py").write_text("raise ImportError('no pika here')\n")
    env = script_env(PYTHONPATH=str(blocker))
    for argv in (sender_argv(tmp_path, keys, "--url", "amqp://127.0.0.1:1/"),
                 receiver_argv(tmp_path, keys, "--url", "amqp://127.0.0.1:1/")):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PATIENCE, env=env)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "pip install -e '.[amqp]'" in done.stderr and "Traceback" not in done.stderr
