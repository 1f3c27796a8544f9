"""The fault matrix: the real scripts under injected faults, judged by ciphermq.checker.

Each scenario starts a broker (``python -m ciphermq.server``), ``bin/Sender.py -v``
and ``bin/Receiver.py`` as processes, breaks something on purpose, lets them
recover on their own, and hands the files they leave -- the Sender's ``--record``
(one file that every run, killed or not, appends to), its outbox, the
Receiver's output and rejects files -- to the checker.
A scenario passes only with 0 lost and 0 duplicated.  The one exception is
the negative control: a memory-only broker killed with messages queued, where
the checker must see the loss the documentation warns about.

Every scenario is a function ``scenario(run, scale)``: the tests below run
it at the CI scale (a few seconds each) and, marked ``slow``, at a larger
one; ``bench/faults.py`` (``make faults``) runs the same functions at full
scale and writes the figures into docs/RELIABILITY.md.

Kills are timed by progress, never by the clock: "after the n-th line that
says a message was stored" (n drawn from a seeded ``random.Random``), then a
random moment measured by waiting on the process itself.  Set
CIPHERMQ_TEST_SEED to repeat a run; the seed is in every failure message.
"""
import collections
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from processes import BrokerProcess
from proxy import FaultProxy
from scripts import (
    DEMO,
    PATIENCE,
    ScriptProcess,
    intact_ids,
    receiver_args,
    script_env,
    sender_args,
)

from ciphermq import checker
from ciphermq.receiver import CRASH_POINTS, CRASHED  # the CIPHERMQ_CRASH_AT test hook

#: The documented chaos rates (docs/CLIENTS.md), with a short delay to keep CI quick.
CHAOS = "drop-ack=0.05,drop-confirm=0.05,drop-delivery=0.02,disconnect=0.01,delay-ms=0-5"
ACK_LINE = "✅ [SENDER] Server ACK received"
STORED_LINE = "💾 [RECEIVER] Message"
#: How far past its progress anchor a kill may land: a random wait on the process.
KILL_JITTER = 0.05
#: Random receiver kills stop when fewer messages than this are left to store.
MIN_LEFT = 20
#: Sender runs allowed after the first, from its outbox, when it gave up on some messages.
RERUNS = 3


class Scale(NamedTuple):
    """How big a run of the matrix is."""

    messages: int
    receiver_kills: int     # random SIGKILLs, on top of one crash at each exact window
    sender_kills: int
    broker_kills: int
    network_faults: int     # resets, stalls and cuts, through the proxies
    patience: float         # seconds a process may take to finish what it must do


CI = Scale(messages=1000, receiver_kills=3, sender_kills=2, broker_kills=3, network_faults=6,
           patience=30.0)     # below the 60 s test timeout: a stuck run still gets a verdict
SLOW = Scale(messages=2000, receiver_kills=10, sender_kills=5, broker_kills=5,
             network_faults=12, patience=180.0)
SCALES = [pytest.param(CI, id="ci"),
          pytest.param(SLOW, id="slow", marks=[pytest.mark.slow, pytest.mark.timeout(600)])]


# -- one run: its processes, files and faults ------------------------------------------

class FaultRun:
    """One scenario's brokers, senders, receivers and proxies, and the files they leave.

    Every process and proxy is registered on ``stack``: closing it kills and
    reaps them all.  ``faults`` counts what was injected, ``notes`` says how
    the clients recovered (e.g. a sender run again from its outbox).
    """

    def __init__(self, workdir, key_pair, stack, scale, seed):
        self.workdir = Path(workdir)
        self.keys = key_pair
        self.stack = stack
        self.scale = scale
        self.seed = seed
        self.rng = random.Random(seed)
        self.output = self.workdir / "received_messages.json"
        self.outbox = self.workdir / "pending_messages.json"
        self.messages = self.workdir / "messages.txt"
        self.record = self.workdir / "sender_record.json"
        self.sender_logs = []
        self.receiver_logs = []
        self.faults = collections.Counter()
        self.notes = []
        self.brokers = []           # every broker process started, for its log

    # -- starting things ------------------------------------------------------------

    def start_broker(self, *args, port=0):
        broker = BrokerProcess(*args, port=port)
        self.stack.callback(broker.close)
        self.brokers.append(broker)
        return broker

    def start_proxy(self, upstream, latency=0.0):
        proxy = FaultProxy(upstream, latency=latency).start()
        self.stack.callback(proxy.close)
        return proxy

    def start_sender(self, port, *args, resume=False):
        """A ``Sender.py -v`` run: the messages file, or with ``resume`` only its outbox."""
        if not resume:
            self.messages.write_text("".join("fault matrix message %d of %d\n"
                                             % (i, self.scale.messages)
                                             for i in range(1, self.scale.messages + 1)))
        log = self.workdir / ("sender-%d.log" % (len(self.sender_logs) + 1))
        self.sender_logs.append(log)
        source = os.devnull if resume else str(self.messages)
        return self._spawn(sender_args(port, self.keys, self.outbox, "--file", source, "-v",
                                       "--record", str(self.record), *args), log)

    def start_receiver(self, port, *args, env=None):
        log = self.workdir / ("receiver-%d.log" % (len(self.receiver_logs) + 1))
        self.receiver_logs.append(log)
        return self._spawn(receiver_args(port, self.keys, self.output, *args), log, env)

    def _spawn(self, argv, log, env=None):
        process = ScriptProcess(argv, env=env, cwd=str(self.workdir), log=log)
        self.stack.callback(process.close)
        return process

    # -- waiting and killing ---------------------------------------------------------

    def kill_soon(self, process, what):
        """SIGKILL ``process`` (a ScriptProcess or BrokerProcess) at a random moment within
        KILL_JITTER, measured by waiting on the process itself."""
        try:
            code = process.proc.wait(self.rng.uniform(0.0, KILL_JITTER))
        except subprocess.TimeoutExpired:
            process.kill()
            self.faults[what] += 1
            return
        raise AssertionError("%s: the process exited by itself (%s) before the kill (seed %d)"
                             % (what, code, self.seed))

    def await_progress(self, process, text, count, why_not):
        """Wait for ``count`` more stdout lines with ``text``.  If the process ends or
        PATIENCE passes without one, note ``why_not`` and return False: no more faults
        can be anchored on its progress."""
        try:
            process.wait_for(text, timeout=PATIENCE, count=count)
        except AssertionError:
            self.notes.append(why_not)
            return False
        return True

    def finish_sending(self, sender, port, *args):
        """Wait for the Sender; while it gave up on some messages, run it again on its outbox."""
        code = sender.wait(self.scale.patience)
        for rerun in range(1, RERUNS + 1):
            if code == 0:
                return
            assert code == 1, "the sender failed (%s, seed %d):\n%s" % (code, self.seed,
                                                                        sender.stderr)
            self.notes.append("sender run %d× more from its outbox" % rerun)
            sender = self.start_sender(port, *args, resume=True)
            code = sender.wait(self.scale.patience)
        assert code == 0, "the sender still fails after %d reruns (seed %d)" % (RERUNS, self.seed)

    def await_receiver(self, receiver):
        """Wait for the Receiver to exit; at the deadline stop it (SIGTERM) and let the
        checker say what is missing, rather than time out without a verdict."""
        try:
            code = receiver.wait(self.scale.patience)
        except subprocess.TimeoutExpired:
            self.notes.append("receiver stopped at the deadline")
            receiver.proc.send_signal(signal.SIGTERM)
            code = receiver.wait()
        assert code == 0, "the receiver failed (%s, seed %d):\n%s" % (code, self.seed,
                                                                      receiver.stderr)

    def stored(self):
        return len(intact_ids(self.output))

    def check(self):
        return checker.check([self.record], self.output, outboxes=[self.outbox])


class Result(NamedTuple):
    """What one scenario did and what the checker found."""

    tally: checker.Tally
    faults: collections.Counter
    notes: list
    seconds: float
    seed: int
    compactions: int = 0            # "Journal compacted" lines in the brokers' logs

    def verdict(self):
        return "\n".join(["seed %d, faults %s, %s" % (self.seed, dict(self.faults), self.notes)]
                         + self.tally.report())


def play(scenario, workdir, key_pair, scale, seed=None, **options):
    """Run ``scenario(run, scale, **options)`` in ``workdir``, stop everything it started,
    and check the files it left."""
    if seed is None:
        seed = int(os.environ.get("CIPHERMQ_TEST_SEED", random.randrange(1 << 30)))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        run = FaultRun(workdir, key_pair, stack, scale, seed)
        scenario(run, scale, **options)
    compactions = sum("Journal compacted" in line for broker in run.brokers
                      for line in broker.lines)
    return Result(run.check(), run.faults, run.notes, time.monotonic() - started, seed,
                  compactions)


def _budget(left, kills_left):
    """The most progress lines to wait for before the next kill, leaving work for the
    kills after it (and a margin: a kill lands a little after its anchor)."""
    return max(1, left // (2 * (kills_left + 1)))


# -- the scenarios ------------------------------------------------------------------------

def receiver_crashes(run, scale):
    """The Receiver dies at each exact window once, then is SIGKILLed at random, while the
    Sender runs; a last Receiver stores what is left."""
    port = run.start_broker().port
    sender = run.start_sender(port, "--window", "100")
    for point in CRASH_POINTS:      # before-write, mid-write, after-write, after-fsync, after-ack
        env = script_env(CIPHERMQ_CRASH_AT="%s:%d" % (point, run.rng.randint(1, 10)))
        crashed = run.start_receiver(port, env=env)
        code = crashed.wait(scale.patience)
        assert code == CRASHED, "no crash at %s (%s):\n%s" % (point, code, crashed.stderr)
        run.faults["receiver crashes at exact windows"] += 1
    for kill in range(scale.receiver_kills):
        left = scale.messages - run.stored()
        if left < MIN_LEFT:
            run.notes.append("receiver kills stopped after %d: too few messages left" % kill)
            break
        # Small batches: more fsync-ack cycles for a kill to land in, and slower progress.
        receiver = run.start_receiver(port, "-v", "--prefetch", "20", "--ack-batch", "10")
        nth = run.rng.randint(1, _budget(left, scale.receiver_kills - kill))
        receiver.wait_for(STORED_LINE, timeout=PATIENCE, count=nth)
        run.kill_soon(receiver, "receiver SIGKILLs")
    run.finish_sending(sender, port, "--window", "100")
    left = scale.messages - run.stored()
    run.await_receiver(run.start_receiver(port, *(("--max-messages", str(left)) if left
                                                  else ("--idle-exit", "1"))))


def sender_kills(run, scale):
    """The Sender is SIGKILLed with publishes in flight -- its connection held silent after
    the n-th ACK, so some were stored by the broker but never heard ACKed -- and restarted
    on its outbox each time, while one Receiver runs throughout."""
    broker = run.start_broker()
    proxy = run.start_proxy(broker.address)
    receiver = run.start_receiver(broker.port, "--max-messages", str(scale.messages))
    sender = run.start_sender(proxy.address[1], "--window", "32")
    acked = 0
    for kill in range(scale.sender_kills):
        nth = run.rng.randint(1, _budget(scale.messages - acked, scale.sender_kills - kill))
        proxy.stall_after(b"ACK ", nth)             # the broker ACKs on; the sender hears none
        sender.wait_for(ACK_LINE, timeout=PATIENCE, count=nth)
        # The proxy counts a rule as fired before it forwards the line that fires it.
        assert proxy.fired["stall"] == kill + 1, "the stall after ACK %d never fired" % nth
        run.faults["sender connections stalled"] += 1
        acked += nth
        run.kill_soon(sender, "sender SIGKILLs")
        sender = run.start_sender(proxy.address[1], "--window", "32", resume=True)
    run.finish_sending(sender, proxy.address[1], "--window", "32")
    run.await_receiver(receiver)


def broker_chaos(run, scale, spec=CHAOS):
    """The broker withholds ACKs and confirmations, loses pushes and drops connections
    (--chaos at the documented rates), and both clients carry on by themselves."""
    broker = run.start_broker("--chaos", spec, "--chaos-seed", str(run.seed),
                              "--redelivery-interval", "1")
    quick = ("--ack-timeout", "1", "--heartbeat", "1")
    receiver = run.start_receiver(broker.port, "--max-messages", str(scale.messages), *quick)
    sender = run.start_sender(broker.port, "--window", "16", *quick)
    run.finish_sending(sender, broker.port, "--window", "16", *quick)
    run.await_receiver(receiver)
    for line in broker.lines:
        fault = re.search(r" CHAOS ([a-z-]+): ", line)
        if fault:
            run.faults["chaos " + fault.group(1)] += 1


def broker_kills(run, scale, durable=True):
    """The broker is SIGKILLed after every n-th message the Receiver stores -- so while
    the Sender publishes and while the Receiver drains the backlog -- and restarted on
    the same port (and, when durable, the same --data-dir); the Sender and Receiver
    processes keep running and reconnect on their own.  A small compaction threshold makes
    the journal rewrite itself again and again, so kills also land mid-compaction."""
    data = (("--data-dir", str(run.workdir / "data"), "--compact-min-bytes", "65536")
            if durable else ())
    broker = run.start_broker(*data)
    port = broker.port
    # Memory-only, the receiver cannot wait for all the messages: some are gone for good.
    until = ("--max-messages", str(scale.messages)) if durable else ("--idle-exit", "5")
    # Batches of 20: the kills, anchored on stored lines, can land between any two of them.
    receiver = run.start_receiver(port, "-v", "--ack-batch", "20", "--heartbeat", "1", *until)
    sender = run.start_sender(port, "--window", "32", "--heartbeat", "1")
    for kill in range(scale.broker_kills):
        receiver.discard_unread()       # anchor on what is stored from now on
        nth = run.rng.randint(1, _budget(scale.messages - run.stored(),
                                         scale.broker_kills - kill))
        if not run.await_progress(receiver, STORED_LINE, nth, "broker kills stopped after "
                                  "%d: nothing more reached the receiver" % kill):
            break
        run.kill_soon(broker, "broker SIGKILLs")
        broker = run.start_broker(*data, port=port)
    run.finish_sending(sender, port, "--window", "32", "--heartbeat", "1")
    run.await_receiver(receiver)


def network_faults(run, scale):
    """Both clients talk through fault proxies that add latency, reset connections (RST),
    cut them (FIN) and stall them silently (half-open); the heartbeat finds the stalls."""
    broker = run.start_broker()
    to_sender = run.start_proxy(broker.address, latency=0.002)
    to_receiver = run.start_proxy(broker.address, latency=0.002)
    # A proxy's rules act one after the other, each counting lines from where the last
    # one acted: so each fault comes a gap of about N / (faults + 1) lines after the last.
    for proxy, line, faults in ((to_sender, b"ACK ", (scale.network_faults + 1) // 2),
                                (to_receiver, b"Message:", scale.network_faults // 2)):
        gap = scale.messages // (faults + 1)
        for i in range(faults):
            rule = (proxy.reset_after, proxy.stall_after, proxy.cut_after)[i % 3]
            rule(line, run.rng.randint(gap // 2, gap))
    quick = ("--heartbeat", "0.5")
    receiver = run.start_receiver(to_receiver.address[1], "--max-messages",
                                  str(scale.messages), *quick)
    sender = run.start_sender(to_sender.address[1], "--window", "32", *quick)
    run.finish_sending(sender, to_sender.address[1], "--window", "32", *quick)
    run.await_receiver(receiver)
    for proxy in (to_sender, to_receiver):
        for action, count in proxy.fired.items():
            run.faults["network %ss" % action] += count


def broker_killed_with_a_backlog(run, scale, durable):
    """Everything is ACKed while no receiver runs; the broker is killed and restarted on the
    same port; then a receiver takes what survived."""
    data = ("--data-dir", str(run.workdir / "data")) if durable else ()
    broker = run.start_broker(*data)
    port = broker.port
    run.finish_sending(run.start_sender(port), port)
    broker.kill()
    run.faults["broker SIGKILLs"] += 1
    run.start_broker(*data, port=port)
    until = ("--max-messages", str(scale.messages)) if durable else ("--idle-exit", "1")
    run.await_receiver(run.start_receiver(port, *until))


# -- the tests: the checker itself -----------------------------------------------------------

def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _event(event, message_id):
    return json.dumps({"event": event, "message_id": message_id})


def _sent(message_id, acked=True):
    lines = [_event("attempted", message_id)]
    if acked:
        lines.append(_event("acked", message_id))
    return lines


def _stored(*ids):
    return [json.dumps({"message_id": i, "message": "m", "timestamp": "t"}) for i in ids]


def test_checker_counts_lost_duplicated_held_and_dropped_messages(tmp_path):
    """The checker finds every way a message can go wrong: lost, stored twice, dropped."""
    log = _write(tmp_path / "sender_record.json",
                 _sent("ok") + _sent("lost") + _sent("twice") + _sent("held", acked=False)
                 + _sent("dropped", acked=False) + [_event("failed", "dropped")]
                 + [_event("attempted", "refused"), _event("refused", "refused")]
                 + _sent("refused") + [_event("attempted", "ok")])
    output = _write(tmp_path / "out.json", _stored("ok", "twice", "twice"))
    _write(tmp_path / "out.rejects.json", [json.dumps({"message_id": "refused"})])
    outbox = _write(tmp_path / "outbox.json", [
        json.dumps({"message_id": "held", "envelope": {}}),
        json.dumps({"message_id": "ok", "envelope": {}}), json.dumps({"acked": "ok"})])
    tally = checker.check([log], output, outboxes=[outbox])
    assert tally.counts() == {"attempted": 6, "acked": 4, "stored": 2, "rejected": 1,
                              "lost": 1, "duplicated": 1, "never_acked": 2, "held": 1,
                              "dropped": 1}
    assert (tally.lost, tally.duplicated, tally.dropped) == (["lost"], {"twice": 2}, ["dropped"])
    assert not tally.ok
    report = "\n".join(tally.report())
    assert "1 lost" in report and "twice (2 times)" in report and "1 dropped" in report


def test_checker_ignores_torn_lines_and_refuses_what_is_not_a_record(tmp_path):
    """A torn last line (a process killed mid-write) never counts; a file whose lines are
    not Sender records -- a saved stdout, say -- is refused rather than read as empty."""
    log = tmp_path / "sender_record.json"
    log.write_text("\n".join(_sent("a") + _sent("a-b", acked=False)) + "\n"
                   + _event("acked", "a-b")[:-3], encoding="utf-8")
    output = tmp_path / "out.json"
    output.write_text(_stored("a")[0] + '\n{"message_id": "a-b", "mess', encoding="utf-8")
    tally = checker.check([log], output)
    assert tally.ok and tally.acked == {"a"} and set(tally.stored) == {"a"}
    assert sorted(tally.torn) == sorted([str(log), str(output)])
    stdout = _write(tmp_path / "sender.log", ["✅ [SENDER] Server ACK received for message a"])
    with pytest.raises(checker.CheckError, match="not a JSON object"):
        checker.check([stdout], output)
    unknown = _write(tmp_path / "unknown.json", [_event("delivered", "a")])
    with pytest.raises(checker.CheckError, match="not a Sender record"):
        checker.check([unknown], output)


def test_checker_command_line_exit_status(tmp_path):
    """``python -m ciphermq.checker`` exits 0 for a clean run, 1 for a loss, 2 for bad input."""
    log = _write(tmp_path / "sender_record.json", _sent("a") + _sent("b"))
    clean = _write(tmp_path / "clean.json", _stored("a", "b"))
    short = _write(tmp_path / "short.json", _stored("a"))
    bad = _write(tmp_path / "bad.json", ["not json", _stored("a")[0]])

    def run(output):
        return subprocess.run([sys.executable, "-m", "ciphermq.checker", "--record",
                               str(log), "--output", str(output)],
                              capture_output=True, text=True, timeout=PATIENCE,
                              env=script_env())
    ok, lossy, unusable = run(clean), run(short), run(bad)
    assert ok.returncode == 0 and "✅ [CHECKER] 0 lost, 0 duplicated" in ok.stdout
    assert lossy.returncode == 1 and "❌ [CHECKER] 1 lost" in lossy.stdout
    assert unusable.returncode == 2 and "line 1 is not a JSON object" in unusable.stderr


def test_checker_without_arguments_reads_the_files_of_make_send_and_make_receive(tmp_path):
    """``python -m ciphermq.checker`` alone reads sender_record.json, received_messages.json
    and pending_messages.json in the current directory: it sees what the outbox holds."""
    _write(tmp_path / "sender_record.json",
           _sent("a") + _sent("held", acked=False) + _sent("dropped", acked=False))
    _write(tmp_path / "received_messages.json", _stored("a"))
    _write(tmp_path / "pending_messages.json", [json.dumps({"message_id": "held"})])
    result = subprocess.run([sys.executable, "-m", "ciphermq.checker"], capture_output=True,
                            text=True, timeout=PATIENCE, env=script_env(), cwd=str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "attempted 3, ACKed 1, stored 1" in result.stdout
    assert "never ACKed 2 (1 still held in an outbox)" in result.stdout
    assert "❌ [CHECKER] 1 dropped" in result.stdout
    assert result.stdout.rstrip().endswith(": dropped"), "the dropped id is named"


# -- the tests: the matrix ------------------------------------------------------------------

def _assert_exactly_once(result):
    assert result.tally.ok, result.verdict()
    assert result.tally.acked == result.tally.attempted, result.verdict()
    assert not result.tally.unexpected, result.verdict()


@pytest.mark.parametrize("scale", SCALES)
def test_receiver_crashing_in_every_window_and_sigkilled_at_random_loses_nothing(
        scale, keys, tmp_path):
    """A Receiver killed at each exact window and at random moments, restarted each time,
    leaves every ACKed message in its output exactly once."""
    result = play(receiver_crashes, tmp_path, keys, scale)
    _assert_exactly_once(result)
    assert result.faults == {"receiver crashes at exact windows": len(CRASH_POINTS),
                             "receiver SIGKILLs": scale.receiver_kills}, result.verdict()


@pytest.mark.parametrize("scale", SCALES)
def test_sender_sigkilled_mid_run_and_restarted_loses_nothing(scale, keys, tmp_path):
    """A Sender killed with publishes in flight and restarted on its outbox gets every
    message ACKed, and the Receiver stores each exactly once."""
    result = play(sender_kills, tmp_path, keys, scale)
    _assert_exactly_once(result)
    assert result.faults == {"sender SIGKILLs": scale.sender_kills,
                             "sender connections stalled": scale.sender_kills}, result.verdict()
    assert len(result.tally.attempted) == scale.messages


@pytest.mark.parametrize("scale", SCALES)
def test_broker_dropping_acks_confirmations_pushes_and_connections_loses_nothing(
        scale, keys, tmp_path):
    """Against --chaos (withheld ACKs and ACK_CONFIRMEDs, lost pushes, dropped connections)
    the Sender and Receiver processes still deliver every message exactly once."""
    result = play(broker_chaos, tmp_path, keys, scale)
    _assert_exactly_once(result)
    assert len(result.tally.acked) == scale.messages
    named = ("drop-ack", "drop-confirm", "drop-delivery", "disconnect")
    assert all(result.faults["chaos " + fault] for fault in named), \
        "not every fault in the name fired: %s" % result.verdict()


@pytest.mark.parametrize("scale", SCALES)
def test_broker_sigkilled_with_a_journal_loses_no_acked_message(scale, keys, tmp_path):
    """A broker with --data-dir SIGKILLed repeatedly and restarted on its port: the running
    clients reconnect by themselves and no ACKed message is lost or stored twice."""
    result = play(broker_kills, tmp_path, keys, scale)
    _assert_exactly_once(result)
    assert not result.notes, "the clients needed help: %s" % result.verdict()
    assert result.faults == {"broker SIGKILLs": scale.broker_kills}, result.verdict()
    assert len(result.tally.acked) == scale.messages
    assert result.compactions > 0, "the journal was never compacted during the run"


@pytest.mark.parametrize("scale", SCALES)
def test_network_latency_resets_cuts_and_silent_stalls_lose_nothing(scale, keys, tmp_path):
    """Through proxies that delay, reset, cut and silently stall connections, both clients
    detect each fault (heartbeat for the stalls), reconnect, and lose nothing."""
    result = play(network_faults, tmp_path, keys, scale)
    _assert_exactly_once(result)
    assert sum(result.faults.values()) == scale.network_faults, result.verdict()
    assert len(result.tally.acked) == scale.messages


@pytest.mark.parametrize("durable", [False, True], ids=["memory-only", "data-dir"])
def test_killing_a_memory_only_broker_loses_what_it_had_acked(durable, keys, tmp_path):
    """Negative control: a memory-only broker killed with a backlog loses the ACKed messages
    it held and the checker reports them lost; with --data-dir the same kill loses none."""
    result = play(broker_killed_with_a_backlog, tmp_path, keys, CI._replace(messages=100),
                  durable=durable)
    assert len(result.tally.acked) == 100, result.verdict()
    if durable:
        _assert_exactly_once(result)
    else:
        assert result.tally.lost == sorted(result.tally.acked), result.verdict()
        assert not result.tally.ok and not result.tally.duplicated


def test_chaos_demo_ends_with_the_checkers_clean_verdict(keys, spawn, tmp_path):
    """``make chaos-demo`` (bin/demo.py with --chaos) shows faults being absorbed and ends
    with 0 lost and 0 duplicated."""
    demo = spawn([sys.executable, DEMO, "--keys", str(keys[0].parent), "--count", "60",
                  "--chaos", CHAOS.replace("0-5", "0-20"), "--chaos-seed", "7",
                  "--broker-arg=--redelivery-interval=1"], cwd=str(tmp_path))
    assert demo.wait(PATIENCE * 3) == 0, demo.stdout + demo.stderr
    assert "✅ [CHECKER] 0 lost, 0 duplicated" in demo.stdout
    assert "CHAOS" in demo.stdout
    assert list(tmp_path.iterdir()) == []
