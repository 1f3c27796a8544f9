"""A stand-in for the design document's original Receiver's reader: one ``recv`` = one line.

Kept for teaching (tutorial lesson 11, bin/lessons/framing.py) and for the
tests that show what the original clients can and cannot do with our broker
(tests/test_legacy_clients.py, docs/PROTOCOL.md "The document's original
clients").  It is written for those, not copied from the original, and reads
exactly the way the original does: one ``recv(1024)`` is taken as one whole
line; a read that ``startswith("Message:")`` is ``split(" ", 2)`` and its body
``json.loads``-ed, then acked, with one ``recv(1024)`` for the reply.  TCP
keeps no message boundaries, so whatever else shares a read is lost to it.
Our clients frame by newline (ciphermq/protocol.py) and never use this.
"""
import contextlib
import json
import queue
import socket
import threading


class LegacyReader:
    """One recv(1024) per line, as the original Receiver reads; runs in a thread.

    Every read is reported on ``events`` as ``(kind, text)``: ``subscribed``
    (the read after consume), ``message`` (a read it parsed as one message
    and then acked), ``reply`` (the one read after an ack, meant for
    ``ACK_CONFIRMED``), ``unreadable`` (a ``Message:`` read whose JSON does
    not parse: it held more than one line, or part of one) or ``ignored``
    (anything else).  ``stored`` lists the ids it parsed and acked, in order.
    ``timeout`` bounds every socket operation and :meth:`next_event`.
    """

    def __init__(self, address, timeout):
        self.timeout = timeout
        self.sock = socket.create_connection(address, timeout=timeout)
        self.events = queue.Queue()
        self.stored = []
        self.thread = threading.Thread(target=self._run, name="legacy-reader", daemon=True)

    def start(self, queue_name="default_queue"):
        """Send ``consume`` and start reading; returns self."""
        self.sock.sendall(b"consume %s\n" % queue_name.encode())
        self.thread.start()
        return self

    def _run(self):
        try:
            self.events.put(("subscribed", self.sock.recv(1024).decode()))
            while True:
                data = self.sock.recv(1024).decode()
                if not data:
                    return
                if not data.startswith("Message:"):
                    self.events.put(("ignored", data))
                    continue
                try:
                    _, message_id, body = data.split(" ", 2)
                    json.loads(body)
                except ValueError:
                    self.events.put(("unreadable", data))
                    continue
                self.stored.append(message_id)
                self.events.put(("message", data))
                self.sock.sendall(b"ack %s\n" % message_id.encode())
                self.events.put(("reply", self.sock.recv(1024).decode()))
        except OSError:                 # closed, reset or timed out: the reader stops
            return

    def next_event(self):
        """The next ``(kind, text)`` read; raises queue.Empty after ``timeout`` seconds."""
        return self.events.get(timeout=self.timeout)

    def close(self):
        """Hang up (the broker sees the connection end at once) and stop the thread.

        Safe to call twice, and after the broker closed the connection.
        """
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes the thread's recv; close alone won't
        self.sock.close()
        if self.thread.is_alive():
            self.thread.join(self.timeout)
