"""Make docs/dashboard.png: a broker with traffic of every kind, photographed by Chromium.

``make dashboard-screenshot`` runs this.  It starts a broker with the dashboard
on a free port, runs about a minute of traffic (a steady publisher with bursts,
a consumer that acks, a consumer that rejects "poison" messages until they are
dead-lettered, a queue nobody consumes), then takes the screenshot with
``chromium --headless --screenshot`` while the traffic still flows.

The traffic is paced with ``Event.wait``; this is a picture, not a test.
"""
import argparse
import json
import math
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid

from ciphermq.config import ServerConfig
from ciphermq.server import BrokerServer


class Line:
    """A bare protocol connection: send a line, read lines."""

    def __init__(self, address):
        self.sock = socket.create_connection(address)
        self.file = self.sock.makefile("rb")

    def send(self, line):
        self.sock.sendall(line.encode() + b"\n")

    def read(self):
        return self.file.readline().decode().rstrip("\n")

    def call(self, line):
        self.send(line)
        return self.read()

    def close(self):
        self.sock.close()


def envelope(message_id):
    return json.dumps({"message_id": message_id, "enc_session_key": "a2V5", "nonce": "bm9uY2U=",
                       "tag": "dGFn", "ciphertext": "Y2lwaGVy"})


def publisher(address, stop):
    """Publish a wave: a few a tick, more in bursts; 1 in 40 to 'jobs' is poison."""
    client = Line(address)
    tick = 0
    while not stop.wait(0.1):
        tick += 1
        count = 2 + int(6 * max(0.0, math.sin(tick / 60.0 * math.pi * 2)))
        for number in range(count):
            prefix = "poison" if (tick + number) % 40 == 0 else "m"
            key = ("order.created", "job", "default_key", "payment")[number % 4]
            exchange = "default_exchange" if key == "default_key" else "shop"
            client.send("publish %s %s %s" % (exchange, key,
                                              envelope("%s-%s" % (prefix, uuid.uuid4()))))
        for _ in range(count):
            client.read()
    client.close()


def consumer(client, queue, reject_poison=False):
    """Consume and ack until the connection is shut down; with reject_poison, nack poison."""
    client.call("consume %s 20" % queue)
    while True:
        line = client.read()
        if not line:
            return
        if not line.startswith("Message: "):
            continue
        message_id = line.split(" ", 2)[1]
        verb = "nack" if reject_poison and message_id.startswith("poison") else "ack"
        client.send("%s %s" % (verb, message_id))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/dashboard.png")
    parser.add_argument("--seconds", type=float, default=70.0, help="traffic before the shot")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("Error: chromium not found (make browser-deps)", file=sys.stderr)
        return 1
    server = BrokerServer(ServerConfig(port=0, http_port=0, max_deliveries=3)).start()
    stop = threading.Event()
    threads, consumers = [], []
    try:
        setup = Line(server.address)
        for line in ("declare_exchange shop topic", "declare_queue orders",
                     "declare_queue jobs", "declare_queue payments", "declare_queue audit",
                     "bind shop orders order.*", "bind shop jobs job",
                     "bind shop payments payment", "bind shop audit #"):
            setup.call(line)
        threads.append(threading.Thread(target=publisher, args=(server.address, stop)))
        consumers = [(Line(server.address), queue) for queue in
                     ("orders", "default_queue", "audit", "jobs")]
        for client, queue in consumers:
            threads.append(threading.Thread(target=consumer, args=(client, queue),
                                            kwargs={"reject_poison": queue == "jobs"}))
        for thread in threads:
            thread.start()
        stop.wait(args.seconds)
        url = "http://%s:%d/" % server.dashboard.address
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            "--hide-scrollbars", "--user-data-dir=" + profile,
                            "--screenshot=" + args.out, "--window-size=1200,800",
                            "--virtual-time-budget=3000", url],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=60)
        print("Wrote %s" % args.out)
        setup.close()
    finally:
        stop.set()
        for client, _ in consumers:
            client.sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
