"""Fuzz the broker while a well-behaved publisher and consumer run beside it.

    .venv/bin/python bench/fuzz.py [--lines N] [--seed S] [--fuzzers K] [--rate R]   # make fuzz

The run, in order:

1. start a broker process (this file with ``--serve``): a ``BrokerServer`` with a
   :class:`Watchdog` installed, which records thread deaths (``threading.excepthook``)
   and ERROR log records from ``ciphermq`` (the server's ``handle_error`` logs there);
2. start the well-behaved publisher (one envelope at a time, each waiting for its
   ``ACK``; the publish->ACK latency of each is recorded) and consumer (acks
   everything, records every id), on a queue of their own;
3. start ``--fuzzers`` processes, each with its share of ``--lines`` seeded random and
   mutated lines made in advance, then alternate windows of ``--window`` seconds:
   a **baseline** window (fuzzers paused) and a **fuzz** window (fuzzers sending, at
   ``--rate`` lines per second in all), until every line is sent.  The publisher runs
   throughout, so both samples see the same broker and the same background load;
4. stop the broker and read its watchdog's findings.

Guarantees checked (exit status 1 if any fails): the broker answered to the end; no
thread died; nothing was logged at ERROR; the consumer got every well-behaved id
exactly once; no fuzzing connection was closed or stalled by the broker; and the p99
latency in fuzz windows is at most ``--max-ratio`` (1.5) times the baseline's.

Why a rate: the broker is one Python process, so fuzz lines and good messages share one
interpreter lock.  Unpaced (``--rate 0``) fuzzers saturate it and every client slows
down in proportion; that measures capacity, not isolation.  At a fixed rate the ratio
shows whether hostile lines cost a neighbour more than their fair share of CPU.

``tests/test_fuzz.py`` runs a slice of the same code in CI, in one process.  The line
generator is :class:`LineFuzzer`: seeded (``random.Random``), so a run can be repeated
with ``--seed``; no third-party fuzzing library.
"""
import argparse
import collections
import json
import logging
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid

WAIT = 10.0                 # seconds a client waits for an expected line before giving up
#: Broker limits for fuzzing: small lines make over-long pieces cheap to send.
BROKER_LIMITS = {"max_line_bytes": 16 * 1024, "max_queue_length": 2000}


# -- the line generator ------------------------------------------------------------

VERBS = (b"auth", b"declare_queue", b"declare_exchange", b"bind", b"publish", b"consume",
         b"fetch", b"ack", b"nack", b"stats", b"ping")
#: Names the fuzzers use.  The well-behaved clients' names are random per run, so no
#: fuzzer can consume, fetch or fill their queue except by breaking the broker.
NAMES = (b"default_queue", b"default_exchange", b"default_queue.dead", b"fz", b"fz.q",
         b"fz:ex", b"fz-topic", b"..", b"a" * 128, b"a" * 129)
KEYS = (b"default_key", b"fz", b"fz.*", b"#", b"a.b.c", b"*.error", b"#.#.#")
#: Bytes that mean something to a framer, a tokenizer or a UTF-8 decoder.
SHARP_BYTES = b"\x00\n\r\t \"\\{}[]:,.-0\x7f\x80\xbf\xc0\xc1\xed\xef\xf5\xfe\xff"
JSON_TOKENS = (b"{", b"}", b"[", b"]", b":", b",", b'"', b"\\", b"null", b"true", b"-0",
               b"1e999", b"NaN", b"-Infinity", b"9" * 50, b'"\\ud800"', b'"\\u0000"',
               b'"message_id"', b'"delivery_count"', b"\x01", b"\xff")


class LineFuzzer:
    """A seeded source of hostile lines; not thread-safe (one per fuzzing connection).

    ``line()`` returns one piece of input, usually ending in a line terminator
    (sometimes ``\\r\\n``, ``\\r`` or nothing, so pieces also splice into each other).
    """

    def __init__(self, seed, max_line_bytes=BROKER_LIMITS["max_line_bytes"]):
        self.rng = random.Random(seed)
        self.max_line_bytes = max_line_bytes
        self._ids = 0
        self._strategies = [(20, self.valid), (30, self.mutated), (15, self.jsonish_publish),
                            (10, self.random_verb), (8, self.spliced), (6, self.encoding_trick),
                            (9, self.random_bytes), (2, self.oversized)]
        self._weights = [weight for weight, _ in self._strategies]
        self.made = collections.Counter()      # lines made, by strategy name

    def line(self):
        strategy = self.rng.choices(self._strategies, self._weights)[0][1]
        self.made[strategy.__name__] += 1
        return strategy() + self.rng.choices((b"\n", b"\r\n", b"\r", b""), (85, 8, 3, 4))[0]

    # -- strategies: each returns one line without its terminator ----------------

    def valid(self):
        """A well-formed command on the fuzzers' own names."""
        rng = self.rng
        verb = rng.choice(VERBS)
        if verb == b"publish":
            return b"publish %s %s %s" % (rng.choice(NAMES), rng.choice(KEYS), self.envelope())
        if verb == b"bind":
            return b"bind %s %s %s" % (rng.choice(NAMES), rng.choice(NAMES), rng.choice(KEYS))
        if verb == b"declare_exchange":
            kind = rng.choice((b"direct", b"fanout", b"topic", b"bogus"))
            return b"declare_exchange %s %s" % (rng.choice(NAMES), kind)
        if verb == b"consume":
            return b"consume %s %d" % (rng.choice(NAMES), rng.choice((0, 1, 5, 65535, 65536)))
        if verb in (b"ack", b"nack"):
            return b"%s fz-%d" % (verb, rng.randrange(self._ids + 1))
        if verb == b"auth":
            return b"auth alice not-a-token"
        if verb in (b"declare_queue", b"fetch"):
            return b"%s %s" % (verb, rng.choice(NAMES))
        return verb

    def envelope(self):
        """A valid envelope's JSON, with a few random extra fields."""
        self._ids += 1
        fields = {"message_id": "fz-%d" % self._ids, "enc_session_key": "a2V5",
                  "nonce": "bm9uY2U=", "tag": "dGFn",
                  "ciphertext": "Y2lwaGVy" * self.rng.randint(0, 8)}
        for index in range(self.rng.randint(0, 3)):
            fields["x%d" % index] = self.rng.choice(
                (None, True, -0.0, 2 ** 70, "\u2028", "caf\u00e9", [1, [2, [3]]], {"a": {"b": 1}}))
        return json.dumps(fields, ensure_ascii=self.rng.random() < 0.5).encode("utf-8")

    def mutated(self):
        """A valid command with one to four bytes flipped, inserted, deleted or cut."""
        line = bytearray(self.valid())
        rng = self.rng
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(line) + 1)
            byte = rng.choice(SHARP_BYTES) if rng.random() < 0.7 else rng.randrange(256)
            operation = rng.randrange(4)
            if operation == 0 and position < len(line):
                line[position] = byte
            elif operation == 1:
                line.insert(position, byte)
            elif operation == 2:
                del line[position:position + rng.randint(1, 8)]
            else:
                del line[position:]
        return bytes(line)

    def spliced(self):
        """The head of one valid command glued to the tail of another."""
        first, second = self.valid(), self.valid()
        head = first[:self.rng.randrange(len(first) + 1)]
        return head + second[self.rng.randrange(len(second) + 1):]

    def jsonish_publish(self):
        """A publish whose JSON is a random walk over tokens: deep, duplicated, non-numbers."""
        rng = self.rng
        if rng.random() < 0.5:              # a structurally valid object with hostile values
            body = b'{"message_id": "fz-%d", "enc_session_key": "a2V5", "nonce": "", ' \
                   b'"tag": "", "ciphertext": "", "x": %s}' % (rng.randrange(10 ** 6),
                                                              self.value(0))
        else:
            body = b"{" + b"".join(rng.choice(JSON_TOKENS) for _ in range(rng.randint(1, 40)))
        return b"publish default_exchange default_key " + body

    def value(self, depth):
        """A JSON-ish value: valid or not, nested up to 12 levels."""
        rng = self.rng
        kind = rng.randrange(8 if depth < 12 else 4)
        if kind == 0:
            return rng.choice((b"1e999", b"-1e999", b"NaN", b"Infinity", b"-0", b"1" * 4400,
                               b"0.1e-400", b"12345678901234567890", b"01", b"1."))
        if kind == 1:
            return rng.choice((b'"\\ud800"', b'"\\udc00x"', b'"\\ud83d\\ude00"', b'"\x01"',
                               b'"\\u0000"', b'"\\nMessage: forged {}"', b'"\xc0\xaf"', b'"\\x"'))
        if kind in (2, 3):
            return rng.choice((b"null", b"true", b"false", b"0", b'"text"', b"[]", b"{}"))
        items = [self.value(depth + 1) for _ in range(rng.randint(0, 3))]
        if kind in (4, 5):
            return b"[" + b", ".join(items) + b"]"
        keys = [rng.choice((b'"a"', b'"b"', b'"delivery_count"', b'"\\ud800"')) for _ in items]
        return b"{" + b", ".join(b"%s: %s" % pair for pair in zip(keys, items)) + b"}"

    def random_verb(self):
        """An unknown or garbled verb with random arguments."""
        rng = self.rng
        alphabet = "abcdefghijklmnopqrstuvwxyz_:.-ABCZ019\u00e9\u0430\u0663\ufeff\u202e"
        verb = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        args = [rng.choice(NAMES + KEYS) for _ in range(rng.randint(0, 5))]
        return b" ".join([verb.encode("utf-8")] + args)

    def encoding_trick(self):
        """A valid command behind a BOM, in UTF-16/32, or with overlong or surrogate bytes."""
        line = self.valid()
        trick = self.rng.randrange(5)
        if trick == 0:
            return b"\xef\xbb\xbf" + line
        if trick == 1:
            return line.decode("latin-1").encode("utf-16")
        if trick == 2:
            return line.decode("latin-1").encode("utf-32")
        if trick == 3:
            return line.replace(b" ", b"\xc0\xa0").replace(b"_", b"\xc1\x9f")
        return line + b" \xed\xa0\x80"

    def random_bytes(self):
        return self.rng.randbytes(self.rng.randint(0, 200))

    def oversized(self):
        """A piece around the line limit: just under, at, or far over it."""
        size = self.rng.choice((self.max_line_bytes - 1, self.max_line_bytes,
                                self.max_line_bytes + 1, 3 * self.max_line_bytes))
        head = self.rng.choice((b"", b"publish default_exchange default_key {", b"ping "))
        return head + b"A" * max(0, size - len(head))


# -- clients ----------------------------------------------------------------------------

class LineClient:
    """A raw protocol connection that frames replies by newline; one thread uses it."""

    def __init__(self, address, timeout=WAIT):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        """The next line without its newline; EOFError at EOF, socket.timeout after WAIT."""
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(256 * 1024)
            if not chunk:
                raise EOFError("broker closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def call(self, command):
        self.send(command + b"\n")
        return self.line()

    def close(self):
        self.sock.close()


def fuzz_batches(seed, lines, max_line_bytes=BROKER_LIMITS["max_line_bytes"], control=False):
    """The seeded input of one fuzzing connection: ``lines`` pieces in batches of 1-20.

    Made before the connection opens, so that generating input costs nothing while
    the broker is being measured.  With ``control``, every piece is ``ping``: the same
    traffic shape with nothing hostile in it.  Returns a list of ``(pieces, bytes)``.
    """
    fuzzer = LineFuzzer(seed, max_line_bytes)
    batches = []
    while lines > 0:
        size = min(fuzzer.rng.randint(1, 20), lines)
        pieces = [b"ping\n" if control else fuzzer.line() for _ in range(size)]
        batches.append((size, b"".join(pieces)))
        lines -= size
    return batches


def fuzz_connection(address, batches, rate=None, gate=None):
    """Send the batches over one connection, reading everything the broker says.

    Each batch is followed by ``nack fz-sync-<n>``, whose error reply (it names the
    id) marks the end of the batch's replies: so the fuzzer never runs ahead of the
    broker, and a broker that stops answering is noticed.  A connection the broker
    closes or stalls is counted and replaced.  With ``rate`` (lines per second) the
    batches are paced; without, each goes as soon as the last is answered.  With
    ``gate`` (an Event), each batch first waits for it to be set.  Returns counts:
    lines sent, reply lines read, unexpected closes, stalls.
    """
    counts = {"lines": 0, "replies": 0, "closed": 0, "stalled": 0}
    client = LineClient(address)
    next_batch_at = time.monotonic()
    try:
        for size, data in batches:
            if gate is not None:
                gate.wait()
            if rate:
                now = time.monotonic()
                if next_batch_at > now:
                    time.sleep(next_batch_at - now)     # pacing the load, not synchronisation
                next_batch_at = max(next_batch_at, now) + size / rate
            marker = b"fz-sync-%d" % counts["lines"]
            counts["lines"] += size
            try:
                client.send(data + b"\nnack " + marker + b"\n")
                while True:
                    counts["replies"] += 1
                    if marker in client.line():
                        break
            except socket.timeout:
                counts["stalled"] += 1
            except (EOFError, ConnectionError):
                counts["closed"] += 1
            else:
                continue
            client.close()                  # start again on a fresh connection
            client = LineClient(address)
    finally:
        client.close()
    return counts


def _fuzz_process(address, seed, lines, max_line_bytes, rate, control, results, gate):
    """A fuzzer process (bench only): make its input, say "ready", fuzz while ``gate``
    is set, and report its counts."""
    batches = fuzz_batches(seed, lines, max_line_bytes, control)
    results.put(("ready", seed))
    results.put(("counts", fuzz_connection(address, batches, rate, gate)))


class GoodClients:
    """The well-behaved publisher and consumer, on a queue of their own.

    The consumer (thread ``fuzz-good-consumer``) acks every message it is pushed and
    records each id; the publisher publishes one envelope at a time from the calling
    thread and records its publish->ACK latency.
    """

    def __init__(self, address):
        self.address = address
        suffix = uuid.uuid4().hex[:12]
        self.exchange, self.queue = b"good-ex-" + suffix.encode(), b"good-q-" + suffix.encode()
        self.published = []             # ids, in order
        self.latencies = []             # seconds, one per publish
        self.received = []              # ids as the consumer got them (duplicates kept)
        self.failures = []              # what went wrong, in words
        self._closing = False
        #: Guards received, failures and _closing; ``arrived`` is notified when an id
        #: arrives or the consumer stops.
        self.mutex = threading.Lock()
        self.arrived = threading.Condition(self.mutex)
        self.publisher = LineClient(address)
        for command in (b"declare_exchange %s" % self.exchange, b"declare_queue %s" % self.queue,
                        b"bind %s %s good" % (self.exchange, self.queue)):
            reply = self.publisher.call(command)
            if reply.startswith(b"Error"):
                raise RuntimeError("setup failed: %r" % reply)
        self.consumer = LineClient(address)
        if self.consumer.call(b"consume %s 100" % self.queue) != b"Subscribed to queue":
            raise RuntimeError("consumer could not subscribe")
        self._consumer_thread = threading.Thread(target=self._consume, name="fuzz-good-consumer",
                                                 daemon=True)
        self._consumer_thread.start()

    def publish(self, count=None, until=None, deadline=None):
        """Publish one envelope at a time, each waiting for its ACK; return their latencies.

        Stops after ``count`` envelopes, once the Event ``until`` is set, or at the
        ``time.monotonic()`` ``deadline``, whichever comes first.
        """
        latencies = []
        while ((count is None or len(latencies) < count) and not (until and until.is_set())
               and (deadline is None or time.monotonic() < deadline)):
            message_id = "good-%d-%s" % (len(self.published), uuid.uuid4().hex[:8])
            body = json.dumps({"message_id": message_id, "enc_session_key": "a2V5",
                               "nonce": "bm9uY2U=", "tag": "dGFn", "ciphertext": "Y2lwaGVy"})
            line = b"publish %s good %s\n" % (self.exchange, body.encode())
            started = time.perf_counter()
            self.publisher.send(line)
            reply = self.publisher.line()
            latencies.append(time.perf_counter() - started)
            if reply != b"ACK %s" % message_id.encode():
                self.failures.append("publish %s answered %r" % (message_id, reply))
            self.published.append(message_id)
        self.latencies.extend(latencies)
        return latencies

    def _consume(self):
        try:
            while True:
                line = self.consumer.line()
                if line.startswith(b"ACK_CONFIRMED "):
                    continue
                if not line.startswith(b"Message: "):
                    with self.mutex:
                        self.failures.append("consumer got %r" % line[:200])
                    continue
                message_id = line.split(b" ", 2)[1]
                self.consumer.send(b"ack %s\n" % message_id)
                with self.arrived:
                    self.received.append(message_id.decode())
                    self.arrived.notify_all()
        except (EOFError, OSError) as exc:
            with self.arrived:
                if not self._closing:
                    self.failures.append("consumer connection ended: %s" % exc)
                self.arrived.notify_all()

    def wait_for_all(self, timeout=WAIT):
        """Block until the consumer has every published id (or ``timeout``); True if it has."""
        expected = set(self.published)
        with self.arrived:
            return self.arrived.wait_for(
                lambda: expected <= set(self.received) or self.failures, timeout)

    def check(self):
        """What went wrong for the well-behaved clients: lost, duplicated, failures."""
        with self.mutex:
            received = list(self.received)
            failures = list(self.failures)
        lost = sorted(set(self.published) - set(received))
        duplicated = sorted(i for i, n in collections.Counter(received).items() if n > 1)
        strangers = sorted(set(received) - set(self.published))
        return {"lost": lost, "duplicated": duplicated, "strangers": strangers,
                "failures": failures}

    def close(self):
        with self.mutex:
            self._closing = True
        self.consumer.sock.shutdown(socket.SHUT_RDWR)     # wakes the consumer thread
        self._consumer_thread.join(WAIT)
        self.consumer.close()
        self.publisher.close()


# -- the watchdog (runs where the broker runs) ---------------------------------------------

class Watchdog(logging.Handler):
    """Counts thread deaths and ERROR records from ``ciphermq`` while installed.

    ``threading.excepthook`` sees every exception that ends a thread; the server's
    ``handle_error`` logs an unexpected handler exception at ERROR.  Use as a context
    manager; the previous hook is chained to and restored.
    """

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.thread_deaths = []         # "thread-name: exception"
        self.errors = []                # formatted ERROR records
        self._previous_hook = None

    def emit(self, record):
        self.errors.append("%s: %s" % (record.name, record.getMessage()))

    def _hook(self, args):
        name = args.thread.name if args.thread is not None else "?"
        self.thread_deaths.append("%s: %r" % (name, args.exc_value))
        self._previous_hook(args)

    def __enter__(self):
        self._previous_hook, threading.excepthook = threading.excepthook, self._hook
        logging.getLogger("ciphermq").addHandler(self)
        return self

    def __exit__(self, *exc_info):
        logging.getLogger("ciphermq").removeHandler(self)
        threading.excepthook = self._previous_hook


def serve(limits):
    """``--serve``: a broker with a Watchdog; prints its port, runs until stdin closes,
    then prints the watchdog's findings as JSON."""
    from ciphermq.config import ServerConfig
    from ciphermq.server import BrokerServer
    with Watchdog() as watchdog:
        server = BrokerServer(ServerConfig(port=0, **limits)).start()
        print("PORT %d" % server.address[1], flush=True)
        sys.stdin.read()
        server.stop()
    print(json.dumps({"thread_deaths": watchdog.thread_deaths, "errors": watchdog.errors}),
          flush=True)
    return 0


# -- the full run -----------------------------------------------------------------------

def percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run(args):
    """The measurement described in the module docstring; returns the exit status."""
    broker = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port_line = broker.stdout.readline()
        if not port_line.startswith("PORT "):
            print("broker did not start: %r" % port_line)
            return 1
        address = ("127.0.0.1", int(port_line.split()[1]))
        good = GoodClients(address)
        good.publish(count=200)                         # warm up; not measured
        started = time.monotonic()
        baseline, fuzzed, counts = measure_beside_fuzzers(address, good, args)
        elapsed = time.monotonic() - started
        good.wait_for_all()
        still_answers = good.publisher.call(b"ping") == b"PONG"
        good.close()
    finally:
        report_text, _ = broker.communicate(timeout=60)  # closes stdin: the broker stops
    health = json.loads(report_text.strip().splitlines()[-1])
    findings = good.check()
    p99_base, p99_fuzz = percentile(baseline, 0.99), percentile(fuzzed, 0.99)
    ratio = p99_fuzz / p99_base
    print("CipherMQ fuzz run: %d %s from %d fuzzers (seed %d, %s), %.1f s"
          % (counts["lines"], "pings (control run)" if args.control else "lines", args.fuzzers,
             args.seed, "%.0f lines/s while fuzzing" % args.rate if args.rate else "unpaced",
             elapsed))
    print("  broker replies read by fuzzers   %d" % counts["replies"])
    print("  well-behaved messages            %d (baseline %d, under fuzz %d)"
          % (len(good.published), len(baseline), len(fuzzed)))
    print("  publish->ACK p50 baseline/fuzz   %.3f ms / %.3f ms"
          % (1000 * percentile(baseline, 0.5), 1000 * percentile(fuzzed, 0.5)))
    print("  publish->ACK p99 baseline/fuzz   %.3f ms / %.3f ms  (ratio %.2f, target <= %.2f)"
          % (1000 * p99_base, 1000 * p99_fuzz, ratio, args.max_ratio))
    checks = [
        ("broker still answers", still_answers),
        ("no thread died (threading.excepthook)", not health["thread_deaths"]),
        ("nothing logged at ERROR (handle_error)", not health["errors"]),
        ("no well-behaved message lost", not findings["lost"]),
        ("no well-behaved message duplicated", not findings["duplicated"]),
        ("well-behaved clients saw no error",
         not findings["failures"] and not findings["strangers"]),
        ("no fuzzing connection closed by the broker", counts["closed"] == 0),
        ("no fuzzing connection stalled", counts["stalled"] == 0),
        ("p99 under fuzz within %.2fx baseline" % args.max_ratio, ratio <= args.max_ratio),
    ]
    for name, passed in checks:
        print("  %-44s %s" % (name, "ok" if passed else "FAILED"))
    for detail in health["thread_deaths"] + health["errors"] + findings["failures"][:10]:
        print("    " + detail)
    if findings["lost"] or findings["duplicated"]:
        print("    lost %s duplicated %s" % (findings["lost"][:10], findings["duplicated"][:10]))
    return 0 if all(passed for _, passed in checks) else 1


def measure_beside_fuzzers(address, good, args):
    """Alternate baseline and fuzz windows until the fuzzers have sent every line.

    The fuzzer processes make their input first, then fuzz only while ``gate`` is
    set.  The good publisher publishes throughout; its latencies go to the baseline
    (gate clear, first) or to the fuzz sample (gate set).  Alternating short windows
    means both samples see the same background load on a shared machine.
    Returns (baseline latencies, fuzz latencies, the fuzzers' summed counts).
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    gate = context.Event()
    shares = [args.lines // args.fuzzers + (index < args.lines % args.fuzzers)
              for index in range(args.fuzzers)]
    rate = args.rate / args.fuzzers if args.rate else None
    workers = [context.Process(target=_fuzz_process, name="fuzzer-%d" % index,
                               args=(address, args.seed + index, share,
                                     BROKER_LIMITS["max_line_bytes"], rate, args.control,
                                     results, gate))
               for index, share in enumerate(shares)]
    for worker in workers:
        worker.start()
    ready = 0
    while ready < len(workers):             # every fuzzer has made its input
        kind, _ = results.get(timeout=120)
        ready += kind == "ready"
    counts = {"lines": 0, "replies": 0, "closed": 0, "stalled": 0}
    fuzzing_done = threading.Event()

    def collect():
        for _ in workers:
            _, worker_counts = results.get()
            for key in counts:
                counts[key] += worker_counts[key]
        fuzzing_done.set()

    collector = threading.Thread(target=collect, name="fuzz-collector")
    collector.start()
    baseline, fuzzed = [], []
    while not fuzzing_done.is_set():
        gate.clear()
        good.publish(count=20)              # let batches already sent drain; not measured
        baseline += good.publish(deadline=time.monotonic() + args.window)
        gate.set()
        fuzzed += good.publish(deadline=time.monotonic() + args.window, until=fuzzing_done)
    collector.join()
    for worker in workers:
        worker.join(WAIT)
    return baseline, fuzzed, counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100_000, help="fuzz lines in all")
    parser.add_argument("--seed", type=int, default=5, help="seed of the first fuzzer")
    parser.add_argument("--fuzzers", type=int, default=3, help="fuzzing connections")
    parser.add_argument("--rate", type=float, default=5000,
                        help="fuzz lines per second, all fuzzers together; 0 = as fast as the "
                             "broker answers (default %(default)s)")
    parser.add_argument("--window", type=float, default=0.5,
                        help="seconds of each baseline / fuzz window (default %(default)s)")
    parser.add_argument("--max-ratio", type=float, default=1.5,
                        help="allowed p99 latency ratio, fuzz / baseline")
    parser.add_argument("--control", action="store_true",
                        help="send plain pings instead of fuzz lines: the same load with "
                             "nothing hostile in it (the cost of traffic, not of hostility)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(BROKER_LIMITS)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
