"""A TCP fault proxy for tests: forwards clients to the broker, and breaks things on demand.

    proxy = FaultProxy(server.address).start()
    proxy.address                        # point clients here
    proxy.cut()                          # close every open connection (new ones still work)
    proxy.stall()                        # open connections go silent: bytes swallowed both
                                         # ways, nothing closed -- a half-open connection
    proxy.drop_line(b"ACK ")             # the next line from the broker starting so is lost
    proxy.cut_after(b"Message:", 50)     # close the connection that carries the 50th such line
    proxy.stall_after(b"ACK ", 100)      # ... or make it silent after the 100th
    proxy.reset()                        # abort every open connection with a TCP reset (RST)
    proxy.reset_after(b"ACK ", 30)       # ... or the one that carries the 30th such line
    FaultProxy(address, latency=0.005)   # hold every chunk 5 ms, each way
    proxy.fired                          # Counter of the rules that have acted, by action
    proxy.close()

Threads: ``proxy-accept``, and two pumps per connection (``proxy-up-<n>``
client -> broker, ``proxy-down-<n>`` broker -> client).  Each pump owns
reading one socket; writes go through the transport's ``send_lock``.  Lines
are forwarded whole (each pump frames by newline), so a rule can act on one:
the ``*_after`` rules make a fault land mid-stream deterministically.  Rules
for the same lines act in the order they were added, each counting from the
moment the one before it acted.
Nothing sleeps: every thread blocks on a socket, and close() shuts the
sockets down and joins them all.  (``latency`` is an injected fault, not
synchronisation: a pump holds each chunk on an Event that close() sets.)

A cut ends a connection the polite way, with a FIN: the client reads end of
stream.  A reset aborts it: ``SO_LINGER`` 0, then close, so both ends get an
RST and a client's next read or write fails with ECONNRESET.
"""
import collections
import socket
import struct
import threading

from ciphermq.transport import PlainTransport


class _Link:
    """One proxied connection: the client's side, the broker's side, two pumps."""

    def __init__(self, proxy, number, sock):
        self.proxy = proxy
        self.number = number
        self.sock = sock
        self.client = None
        self.broker = None
        self.stalled = threading.Event()
        self.resetting = threading.Event()
        self.threads = []

    def run(self):
        """The up pump's thread: connect to the broker, then pump."""
        self.client = PlainTransport(self.sock)
        try:
            self.broker = PlainTransport(socket.create_connection(self.proxy.upstream, timeout=5))
        except OSError:
            self.sock.close()
            return
        self.broker.sock.settimeout(None)
        down = threading.Thread(target=self._pump, args=(self.broker, self.client, True),
                                name="proxy-down-%d" % self.number, daemon=True)
        self.threads.append(down)
        down.start()
        self._pump(self.client, self.broker, False)
        down.join(5)
        self.client.close()
        self.broker.close()

    def _pump(self, source, target, to_client):
        partial = b""
        try:
            while True:
                data = source.recv()
                if not data:
                    break
                if self.stalled.is_set():
                    continue                    # swallowed: the other side hears nothing
                if self.proxy.latency:
                    self.proxy.closed.wait(self.proxy.latency)
                lines = (partial + data).split(b"\n")
                partial = lines.pop()
                kept, action = [], None
                for line in lines:
                    action = self.proxy._rule_for(line, to_client)
                    if action != "drop":
                        kept.append(line + b"\n")
                    if action in ("cut", "stall", "reset"):
                        break
                if kept:
                    with target.send_lock:
                        target.sendall(b"".join(kept))
                if action == "reset":
                    self.reset()
                if action in ("cut", "reset"):
                    break
                if action == "stall":
                    self.stalled.set()
        except OSError:
            pass
        self.shutdown()

    def shutdown(self):
        if self.resetting.is_set():
            return                              # run() closes the sockets: RST, not FIN
        for side in (self.client, self.broker):
            if side is not None:
                side.shutdown()

    def reset(self):
        """Abort both sides: wake the pumps without sending a FIN; run()'s close sends RST."""
        self.resetting.set()
        for side in (self.client, self.broker):
            if side is None:
                continue
            try:
                side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
                side.sock.shutdown(socket.SHUT_RD)     # wakes its pump, sends nothing
            except OSError:
                pass                                    # already closed


class FaultProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; see the module docstring."""

    def __init__(self, upstream, latency=0.0):
        self.upstream = tuple(upstream)
        self.latency = latency              # seconds each chunk is held, each way
        self.closed = threading.Event()     # set by close(): ends a latency hold at once
        self.dropped = []                   # the lines dropped by rules
        self.fired = collections.Counter()  # rules that have acted, by action
        #: Lines seen, by (to_client, first word): e.g. forwarded[True, b"PONG"].
        self.forwarded = collections.Counter()
        self._lock = threading.Lock()       # guards _links, _rules, _count, forwarded, fired
        self._links = []
        self._rules = []                    # [action, to_client, prefix, countdown]
        self._count = 0
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.address = self._listener.getsockname()
        self._accept_thread = threading.Thread(target=self._accept, name="proxy-accept",
                                               daemon=True)

    def start(self):
        self._accept_thread.start()
        return self

    @property
    def connections(self):
        """How many connections have been accepted so far."""
        with self._lock:
            return self._count

    def _accept(self):
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return                          # closed
            with self._lock:
                self._count += 1
                link = _Link(self, self._count, sock)
                self._links.append(link)
            thread = threading.Thread(target=link.run, name="proxy-up-%d" % link.number,
                                      daemon=True)
            link.threads.append(thread)
            thread.start()

    # -- faults -----------------------------------------------------------------

    def drop_line(self, prefix, to_client=True):
        """Lose the next line starting with ``prefix`` (from the broker, or to it)."""
        self._add_rule("drop", prefix, 1, to_client)

    def cut_after(self, prefix, count=1, to_client=True):
        """Close the connection right after forwarding the count-th line starting so."""
        self._add_rule("cut", prefix, count, to_client)

    def stall_after(self, prefix, count=1, to_client=True):
        """Make that connection silent right after forwarding the count-th such line."""
        self._add_rule("stall", prefix, count, to_client)

    def reset_after(self, prefix, count=1, to_client=True):
        """Abort that connection (RST) right after forwarding the count-th such line."""
        self._add_rule("reset", prefix, count, to_client)

    def _add_rule(self, action, prefix, count, to_client):
        with self._lock:
            self._rules.append([action, to_client, prefix, count])

    def _rule_for(self, line, to_client):
        """The action due for this line (None: just forward it).  Each rule acts once."""
        with self._lock:
            self.forwarded[to_client, line.split(b" ", 1)[0]] += 1
            for rule in self._rules:
                action, direction, prefix, _ = rule
                if direction == to_client and line.startswith(prefix):
                    rule[3] -= 1
                    if rule[3] > 0:
                        return None
                    self._rules.remove(rule)
                    self.fired[action] += 1
                    if action == "drop":
                        self.dropped.append(line)
                    return action
        return None

    def _snapshot(self):
        with self._lock:
            return list(self._links)

    def cut(self):
        """Close every open connection, both ways.  New connections are forwarded."""
        for link in self._snapshot():
            link.shutdown()

    def stall(self):
        """Make every open connection silent without closing it (new ones work)."""
        for link in self._snapshot():
            link.stalled.set()

    def reset(self):
        """Abort every open connection with an RST, both ways.  New ones are forwarded."""
        for link in self._snapshot():
            link.reset()

    def close(self):
        """Stop accepting, close every connection and join every thread."""
        self.closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._accept_thread.join(5)
        self.cut()
        for link in self._snapshot():
            for thread in list(link.threads):
                thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()
