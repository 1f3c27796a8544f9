"""A trivial threaded relay speaking just enough of CipherMQ's protocol to calibrate clients.

It keeps none of a broker's promises: no validation, no dedup, no prefetch, no redelivery,
one shared queue.  A publish is answered ``ACK <id>`` and its envelope is handed to whoever
consumes; an ``ack`` is answered ``ACK_CONFIRMED <id>``.  What the benchmark clients reach
against it is the ceiling of the harness on this machine: if CipherMQ is far below it, the
clients are not what limits CipherMQ's figures.

Run as ``python bench/relay.py --port N`` (the harness does; see ciphermq_broker.py).
"""
import argparse
import queue
import socket
import socketserver
import sys
import threading

RECV_BYTES = 256 * 1024
BATCH = 512                 # deliveries written per sendall at most
_ID = b'"message_id":"'


class Relay(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address):
        super().__init__(address, RelayConnection)
        #: ``Message: ...`` lines waiting for a consumer (thread-safe on its own).
        self.messages = queue.Queue()


class RelayConnection(socketserver.BaseRequestHandler):
    """One client: the handler thread answers commands; ``consume`` starts a delivery thread."""

    def handle(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        #: Guards sendall: replies (this thread) and deliveries (the delivery thread).
        self.send_lock = threading.Lock()
        partial = b""
        while True:
            data = self.request.recv(RECV_BYTES)
            if not data:
                return
            lines = (partial + data).split(b"\n")
            partial = lines.pop()
            replies = b"".join([self.answer(line) for line in lines])
            with self.send_lock:
                self.request.sendall(replies)

    def answer(self, line):
        verb, _, rest = line.partition(b" ")
        if verb == b"publish":
            body = rest.split(b" ", 2)[2]
            at = body.index(_ID) + len(_ID)
            message_id = body[at:body.index(b'"', at)]
            self.server.messages.put(b"Message: %s %s\n" % (message_id, body))
            return b"ACK %s\n" % message_id
        if verb == b"ack":
            return b"ACK_CONFIRMED %s\n" % rest
        if verb == b"consume":
            with self.send_lock:        # the reply goes out before the first delivery
                self.request.sendall(b"Subscribed to queue\n")
                threading.Thread(target=self.deliver, daemon=True).start()
            return b""
        if verb == b"ping":
            return b"PONG\n"
        return b"Error: the relay does not know %s\n" % verb

    def deliver(self):
        """Delivery thread: write whatever is queued, up to BATCH lines per sendall."""
        messages = self.server.messages
        while True:
            batch = [messages.get()]
            try:
                while len(batch) < BATCH:
                    batch.append(messages.get_nowait())
            except queue.Empty:
                pass
            try:
                with self.send_lock:
                    self.request.sendall(b"".join(batch))
            except OSError:
                return


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    with Relay(("127.0.0.1", args.port)) as relay:
        relay.serve_forever()       # until SIGTERM from the harness
    return 0


if __name__ == "__main__":
    sys.exit(main())
