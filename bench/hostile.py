"""Hostile neighbours: each attack of issue 11 beside a well-behaved client.

    .venv/bin/python bench/hostile.py [--baseline S] [--attack S] [--only NAME ...]   # make hostile

For every scenario a fresh broker process starts (``--users``, ``--max-memory`` 64 MiB,
short line and login deadlines: BROKER_OPTIONS).  A well-behaved publisher (one envelope
every 5 ms, each waiting for its reply) and consumer (acks everything) run in this
process's threads on their own queue.  The attacker -- a process of its own -- starts
first and waits, idle, through a **baseline** window; then it does its setup and an
**attack** window of the same length is measured.  So both windows have the same
processes on the machine, and this process the same threads (the RSS sampler runs in
both).  The attacker runs at nice 19 (``--attacker-nice``): on a real network its
client-side CPU is another machine's, and here it would otherwise take one of the
machine's cores from the broker or from the measuring client; the broker's CPU use in
each window is reported, so an attack weakened by that would show.  The report gives the
well-behaved publisher's publish->reply p50/p99 in both windows, its p99 under attack
against its own baseline window's and against all baseline windows pooled (one 4 s
window's p99 is its 8th-largest latency: noisy), how many of its publishes were refused,
the broker's peak RSS (sampled from /proc every 0.25 s) against ``--max-memory``, and
its CPU use.

The first row is a control: an attacker that only floods ``ping``.  The broker's threads
share one interpreter lock, so any busy client slows a neighbour by its share of the CPU;
the control shows that share (bounded by ``--switch-interval`` and ``--fair-turn``, see
docs/SECURITY.md), and an attack is only worse than "busy" if it exceeds it.

The goals (issue 11): p99 in the attack window at most 2x the baseline's, and RSS within
``--max-memory`` plus a fixed overhead (stated in docs/SECURITY.md).  The run reports;
it does not fail on a missed goal, except that it exits 1 if the broker dies or stops
answering.  The attacks are bounded loops: every one ends with its window.
"""
import argparse
import contextlib
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ciphermq_broker import running_broker  # noqa: E402
from processes import percentile, rss_mib, wait_until  # noqa: E402

from ciphermq import access  # noqa: E402

MAX_MEMORY = 64 * 1024 * 1024
BROKER_OPTIONS = ["--max-memory", str(MAX_MEMORY), "--line-timeout", "2",
                  "--auth-timeout", "2", "--max-line-bytes", str(1024 * 1024)]
WAIT = 10.0
PUBLISH_EVERY = 0.005       # the well-behaved publisher's pace (200 envelopes/s)
GO_TIMEOUT = 300.0          # an idle attacker process gives up waiting after this
ATTACKER_NICE = 19          # the attacker's scheduling niceness (see the module docstring)


def envelope(ciphertext="Y2lwaGVy"):
    return json.dumps({"message_id": str(uuid.uuid4()), "enc_session_key": "a2V5",
                       "nonce": "bm9uY2U=", "tag": "dGFn", "ciphertext": ciphertext})


class Line:
    """A blocking line client (plain TCP), enough for the attackers and the good clients."""

    def __init__(self, address, user=None, token=None):
        self.sock = socket.create_connection(address, timeout=WAIT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        if user is not None:
            assert self.call("auth %s %s" % (user, token)) == "AUTH_OK"

    def send(self, text):
        self.sock.sendall(text.encode() if isinstance(text, str) else text)

    def line(self):
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def call(self, text):
        self.send(text + "\n")
        return self.line()

    def pipeline(self, lines):
        self.send("".join(line + "\n" for line in lines))
        return [self.line() for _ in lines]

    def close(self):
        self.sock.close()


# -- the attacks: setup(address, token) runs before the window, attack(...) until stop ------

def _setup_nothing(address, token):
    return None


def _attack_pings(address, token, stop, state):
    """The control: `ping` as fast as one client can, 500 a write (costs CPU, nothing else)."""
    conn = Line(address, "root", token)
    while not stop.is_set():
        conn.pipeline(["ping"] * 500)


def _attack_slowloris(address, token, stop, state):
    """50 connections, each dribbling one byte every 0.2 s of a line it never ends."""
    conns = []
    while not stop.is_set():
        while len(conns) < 50:
            try:
                conns.append(Line(address))
            except OSError:
                break
        for conn in list(conns):
            try:
                conn.send(b"p")
            except OSError:
                conns.remove(conn)      # dropped at its deadline: come back
        stop.wait(0.2)


def _attack_segments(address, token, stop, state):
    """3 connections sending an unfinished line in 1-byte segments, as fast as they can."""
    conns = [Line(address) for _ in range(3)]
    while not stop.is_set():
        for index, conn in enumerate(conns):
            try:
                for _ in range(200):
                    conn.send(b"x")
            except OSError:
                conns[index] = Line(address)


def _attack_dead_names(address, token, stop, state):
    """Declare x<N>.dead without end, 500 a write (refused once --max-queues is reached)."""
    conn, number = Line(address, "root", token), 0
    while not stop.is_set():
        conn.pipeline(["declare_queue x%d.dead" % (number + n) for n in range(500)])
        number += 500


def _setup_memory(address, token):
    conn = Line(address, "root", token)
    lines = ["declare_exchange fan fanout", "declare_queue hog", "bind default_exchange hog hog"]
    for n in range(1000):
        lines += ["declare_queue f%d" % n, "bind fan f%d x" % n]
    conn.pipeline(lines)
    conn.close()


def _attack_memory(address, token, stop, state):
    """Publish 32 KiB envelopes to an unconsumed queue and to a fanout of 1,000 queues."""
    conn = Line(address, "root", token)
    body = "QUJD" * 8192
    while not stop.is_set():
        conn.pipeline(["publish default_exchange hog %s" % envelope(body) for _ in range(20)]
                      + ["publish fan x %s" % envelope("QUJD" * 256)])


def _setup_hog(address, token):
    conn = Line(address, "root", token)
    conn.pipeline(["declare_queue hog", "bind default_exchange hog hog"])
    conn.close()


def _attack_memory_small(address, token, stop, state):
    """Publish ~400-byte envelopes to an unconsumed queue, 672 a write (the bytes of the
    fanout attack's 20 large ones): each queued message also costs the broker its own
    objects, which --max-memory must count too (COPY_OVERHEAD)."""
    conn = Line(address, "root", token)
    while not stop.is_set():
        conn.pipeline(["publish default_exchange hog %s" % envelope("QUJD" * 64)
                       for _ in range(672)])


def _setup_fetch(address, token):
    conn = Line(address, "root", token)
    conn.pipeline(["declare_queue held", "bind default_exchange held held"])
    for _ in range(20):
        conn.pipeline(["publish default_exchange held %s" % envelope() for _ in range(1000)])
    conn.close()


def _attack_fetch(address, token, stop, state):
    """Fetch without acking until refused (--max-unacked), then vanish: a mass requeue."""
    while not stop.is_set():
        conn = Line(address, "root", token)
        while not stop.is_set():
            if conn.pipeline(["fetch held"] * 500)[-1].startswith("Error"):
                break
        conn.close()


def _setup_stats(address, token):
    conn = Line(address, "root", token)
    for start in range(0, 5000, 1000):
        conn.pipeline(["declare_queue s%d" % n for n in range(start, start + 1000)])
    conn.close()


def _attack_stats(address, token, stop, state):
    """`stats` in a loop on a broker with 5,000 queues."""
    conn = Line(address, "root", token)
    while not stop.is_set():
        conn.pipeline(["stats"] * 10)


def _setup_topic(address, token):
    conn = Line(address, "root", token)
    lines = ["declare_exchange t topic"]
    for n in range(1000):
        lines.append("declare_queue t%d" % n)
        lines += ["bind t t%d sensor.%d.%d" % (n, n, k) for k in range(10)]
    conn.pipeline(lines)
    conn.close()


def _attack_topic(address, token, stop, state):
    """Publish to a topic exchange with 10,000 bindings, every routing key new."""
    conn, number = Line(address, "root", token), 0
    while not stop.is_set():
        conn.pipeline(["publish t sensor.new%d.temp %s" % (number + n, envelope())
                       for n in range(50)])
        number += 50


def _attack_logins(address, token, stop, state):
    """Guess tokens as fast as one client can: a new connection per guess."""
    while not stop.is_set():
        try:
            conn = Line(address)
            conn.call("auth root wrong-%d" % time.monotonic_ns())
            conn.close()
        except OSError:
            pass


SCENARIOS = {
    "control: ping flood": (_setup_nothing, _attack_pings),
    "slowloris": (_setup_nothing, _attack_slowloris),
    "one-byte-segments": (_setup_nothing, _attack_segments),
    "dead-queue-names": (_setup_nothing, _attack_dead_names),
    "memory-fill+fanout": (_setup_memory, _attack_memory),
    "memory-fill-small": (_setup_hog, _attack_memory_small),
    "fetch-without-ack": (_setup_fetch, _attack_fetch),
    "stats-5000-queues": (_setup_stats, _attack_stats),
    "topic-10k-bindings": (_setup_topic, _attack_topic),
    "failed-logins": (_setup_nothing, _attack_logins),
}


def _attacker(name, address, token, nice, started, go, ready, stop):
    """The attacker process: start, wait idle through the baseline window, then attack."""
    if nice:
        os.nice(nice)
    setup, attack = SCENARIOS[name]
    started.set()
    if not go.wait(GO_TIMEOUT):
        return
    setup(address, token)
    ready.set()
    try:
        attack(address, token, stop, {})
    except (OSError, EOFError, AssertionError):
        if not stop.is_set():
            raise


# -- the well-behaved client ----------------------------------------------------------

class GoodClient:
    """A paced publisher and an acking consumer on queue ``good``; records latencies."""

    def __init__(self, address, token):
        self.publisher = Line(address, "root", token)
        self.publisher.pipeline(["declare_queue good", "bind default_exchange good good"])
        self.consumer = Line(address, "root", token)
        assert self.consumer.call("consume good 100").startswith("Subscribed")
        self.stopped = threading.Event()
        self.reader = threading.Thread(target=self._ack_all, daemon=True, name="good-consumer")
        self.reader.start()

    def _ack_all(self):
        try:
            while not self.stopped.is_set():
                line = self.consumer.line()
                if line.startswith("Message: "):
                    self.consumer.send("ack %s\n" % line.split(" ", 2)[1])
        except (OSError, EOFError):
            pass

    def window(self, seconds):
        """Publish for ``seconds``; returns (latencies in ms, refused count)."""
        latencies, refused = [], 0
        start = time.monotonic()
        due = start
        while due < start + seconds:
            command = "publish default_exchange good %s" % envelope()
            wait_until(due)
            sent = time.monotonic()
            reply = self.publisher.call(command)
            latencies.append((time.monotonic() - sent) * 1000)
            refused += not reply.startswith("ACK ")
            due += PUBLISH_EVERY
        return sorted(latencies), refused

    def close(self):
        self.stopped.set()
        self.publisher.close()
        self.consumer.close()


class BrokerSampler:
    """The broker's RSS every 0.25 s (from /proc) in a thread, through both windows.

    ``peak`` is the largest RSS since the last ``reset``.  It runs in the baseline window
    too, so the measuring process has the same threads in both windows.
    """

    def __init__(self, pid):
        self.pid = pid
        self.peak = rss_mib(pid)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self.thread.start()

    def _sample(self):
        while not self.stopped.wait(0.25):
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, rss_mib(self.pid))

    def reset(self):
        self.peak = rss_mib(self.pid)

    def stop(self):
        self.stopped.set()
        self.thread.join()


def cpu_seconds(pid):
    """User + system CPU time of process ``pid`` so far, from /proc/<pid>/stat."""
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_scenario(name, users_path, token, args):
    """One attack on a fresh broker: the baseline window, then the attack window.

    The attacker process is started first and waits, idle, through the baseline window,
    so both windows have the same processes on the machine; only the attack differs.
    """
    context = multiprocessing.get_context("spawn")
    login = ("auth root %s\n" % token).encode()
    with running_broker("--users", users_path, *BROKER_OPTIONS, *args.broker_arg,
                        login=login) as broker:
        pid = broker["pid"]
        good = GoodClient(broker["address"], token)
        started, go, ready, stop = (context.Event() for _ in range(4))
        attacker = context.Process(target=_attacker, args=(
            name, broker["address"], token, args.attacker_nice, started, go, ready, stop),
            daemon=True)
        attacker.start()
        try:
            if not started.wait(120):
                raise RuntimeError("%s: the attacker process did not start" % name)
            sampler = BrokerSampler(pid)
            base_rss, cpu = rss_mib(pid), cpu_seconds(pid)
            baseline, base_refused = good.window(args.baseline)
            base_cpu = (cpu_seconds(pid) - cpu) / args.baseline
            go.set()
            if not ready.wait(120):
                raise RuntimeError("%s: the attacker's setup did not finish" % name)
            sampler.reset()
            cpu = cpu_seconds(pid)
            attacked, refused = good.window(args.attack)
            attack_cpu = (cpu_seconds(pid) - cpu) / args.attack
            sampler.stop()
        finally:
            stop.set()
            go.set()
            attacker.join(15)
            if attacker.is_alive():
                attacker.kill()
        assert good.publisher.call("ping") == "PONG", "broker stopped answering"
        good.close()
    return {"scenario": name,
            "base_p50": percentile(baseline, 0.5), "base_p99": percentile(baseline, 0.99),
            "p50": percentile(attacked, 0.5), "p99": percentile(attacked, 0.99),
            "ratio": percentile(attacked, 0.99) / percentile(baseline, 0.99),
            "refused": refused + base_refused, "sent": len(attacked) + len(baseline),
            "base_rss": base_rss, "peak_rss": sampler.peak,
            "base_cpu": base_cpu * 100, "attack_cpu": attack_cpu * 100,
            "baseline": baseline}


def pool_baselines(rows):
    """The p99 of every scenario's baseline window together, and each row's ratio to it.

    Every baseline window runs under the same conditions (a fresh broker, the attacker
    process idle), so together they estimate the baseline p99 far better than one 4 s
    window does (its p99 is its 8th-largest latency).
    """
    pooled = percentile(sorted(x for row in rows for x in row["baseline"]), 0.99)
    for row in rows:
        row["pooled_ratio"] = row["p99"] / pooled
    return pooled


def table(rows):
    out = ["| attack | baseline p50 / p99 | under attack p50 / p99 | p99 ratio: own baseline "
           "/ pooled | good publishes refused | broker RSS before / peak | "
           "broker CPU baseline / attack |",
           "|---|---|---|---|---|---|---|"]
    for row in rows:
        out.append("| %s | %.2f / %.2f ms | %.2f / %.2f ms | %.2f / %.2f | %d of %d "
                   "| %.0f / %.0f MiB | %.0f%% / %.0f%% |"
                   % (row["scenario"], row["base_p50"], row["base_p99"], row["p50"],
                      row["p99"], row["ratio"], row["pooled_ratio"], row["refused"],
                      row["sent"], row["base_rss"], row["peak_rss"], row["base_cpu"],
                      row["attack_cpu"]))
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=float, default=4.0, help="seconds (default 4)")
    parser.add_argument("--attack", type=float, default=6.0, help="seconds (default 6)")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None,
                        metavar="SCENARIO", help="run only these (default: all)")
    parser.add_argument("--attacker-nice", type=int, default=ATTACKER_NICE, metavar="N",
                        help="the attacker process's niceness; 0 = as the rest "
                             "(default %(default)s)")
    parser.add_argument("--broker-arg", action="append", default=[], metavar="OPTION",
                        help="an extra broker option, e.g. --broker-arg=--switch-interval=0.005 "
                             "(repeat for more)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ciphermq-hostile-") as tmp:
        users_path = os.path.join(tmp, "users.json")
        token = access.add_user(users_path, "root", ["*"], ["*"], True)
        for name in args.only or SCENARIOS:
            row = run_scenario(name, users_path, token, args)
            rows.append(row)
            print("%-20s p99 %.2f -> %.2f ms (x%.2f), refused %d, RSS %.0f -> %.0f MiB, "
                  "CPU %.0f%% -> %.0f%%"
                  % (name, row["base_p99"], row["p99"], row["ratio"], row["refused"],
                     row["base_rss"], row["peak_rss"], row["base_cpu"], row["attack_cpu"]),
                  flush=True)
    pooled = pool_baselines(rows)
    print()
    print("--max-memory %d MiB; publisher paced at %d/s; windows %.0f s + %.0f s; "
          "pooled baseline p99 %.2f ms"
          % (MAX_MEMORY // (1024 * 1024), round(1 / PUBLISH_EVERY), args.baseline, args.attack,
             pooled))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
