"""Chaos mode: the broker misbehaves on purpose, so students can watch recovery work.

Off unless the broker is started with ``--chaos SPEC``.  SPEC is a comma list
of faults with probabilities (0..1), and an optional delay range::

    drop-ack=0.05,drop-confirm=0.05,drop-delivery=0.02,disconnect=0.01,delay-ms=0-20

=================  =========================================================
``drop-ack``       store a publish but withhold its ``ACK <id>``
                   (the sender times out and re-sends; the broker re-ACKs
                   the duplicate and stores it once)
``drop-confirm``   ack a message but withhold ``ACK_CONFIRMED <id>``
                   (the receiver re-sends its ack; it is confirmed again)
``drop-delivery``  hand a message to a consumer but never write it
                   (the redelivery timer gives it back)
``disconnect``     drop the connection after a command
                   (clients reconnect; unacked messages are requeued)
``delay-ms=A-B``   hold every reply and push for A..B milliseconds
=================  =========================================================

What ``--chaos-seed N`` repeats: connections are numbered in the order the
broker accepts them, and each gets its own random streams, seeded from
``(N, its number)``: one for the faults of its commands (``drop-ack``,
``drop-confirm``, ``disconnect``: one roll per command, in the order it sent
them), one for its pushes (``drop-delivery``: one roll per message pushed
to it, in push order) and one for delays.  So the same sequence of
connections sending the same commands in the same order meets the same
faults, whatever other connections do at the same time.  Which messages are
pushed to which consumer, and when, still depends on timing (consumers
compete, redelivery follows the clock), so a run with several consumers
need not repeat push for push.  Without a seed every run differs.  Every
injected fault is logged at WARNING with the word CHAOS.
"""
import logging
import random
import threading

from .errors import ChaosSpecError

log = logging.getLogger(__name__)

FAULTS = ("drop-ack", "drop-confirm", "drop-delivery", "disconnect")


def parse_spec(spec):
    """``"drop-ack=0.05,delay-ms=0-20"`` -> ``({"drop-ack": 0.05}, (0, 20))``."""
    odds, delay = {}, (0, 0)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        try:
            if name == "delay-ms":
                low, _, high = value.partition("-")
                delay = (int(low), int(high or low))
                if not 0 <= delay[0] <= delay[1] <= 10_000:
                    raise ValueError
            elif name in FAULTS:
                odds[name] = float(value)
                if not 0.0 <= odds[name] <= 1.0:
                    raise ValueError
            else:
                raise ChaosSpecError("unknown chaos fault %r (known: %s, delay-ms)"
                                     % (name, ", ".join(FAULTS)))
        except ValueError as exc:
            if isinstance(exc, ChaosSpecError):
                raise
            raise ChaosSpecError("bad chaos value %r" % item) from None
    return odds, delay


#: The faults rolled per pushed message; the others are rolled per command.
PUSH_FAULTS = ("drop-delivery",)


class Chaos:
    """Decides, reproducibly, when to inject each fault.  Thread-safe.

    :meth:`for_connection` gives each connection its own streams (see the
    module docstring); :meth:`strikes` and :meth:`delay` here roll one shared
    stream, for callers that have no connection.
    """

    def __init__(self, spec, seed=None):
        self.spec = spec
        self.seed = seed
        self.odds, self.delay_ms = parse_spec(spec)
        #: Guards _random, _connections and injected: shared by every connection thread.
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._connections = 0
        self.injected = dict.fromkeys(FAULTS, 0)

    def for_connection(self):
        """The next connection's :class:`ConnectionChaos`; call it in accept order."""
        with self._lock:
            self._connections += 1
            number = self._connections
        return ConnectionChaos(self, number)

    def _count(self, fault, what):
        with self._lock:
            self.injected[fault] += 1
        log.warning("CHAOS %s: %s", fault, what)

    def strikes(self, fault, what):
        """Roll for ``fault``; if it strikes, count and log it (``what`` says where)."""
        odds = self.odds.get(fault)
        if not odds:
            return False
        with self._lock:
            hit = self._random.random() < odds
            if hit:
                self.injected[fault] += 1
        if hit:
            log.warning("CHAOS %s: %s", fault, what)
        return hit

    def delay(self):
        """Seconds to hold the next reply or push (0 when no delay is configured)."""
        low, high = self.delay_ms
        if not high:
            return 0.0
        with self._lock:
            return self._random.uniform(low, high) / 1000.0


class ConnectionChaos:
    """One connection's fault decisions: its own random streams, seeded from (seed, number).

    ``commands`` is rolled only by the connection's reader thread, ``pushes``
    only by its delivery thread, and ``delays`` under ``_lock`` (both threads
    pause); so no lock is needed for the first two.
    """

    def __init__(self, chaos, number):
        self.chaos = chaos
        self.number = number
        seed = chaos.seed

        def stream(name):
            return random.Random(None if seed is None else "%d:%d:%s" % (seed, number, name))

        self._commands = stream("commands")
        self._pushes = stream("pushes")
        self._delays = stream("delays")
        self._lock = threading.Lock()   # guards _delays: both of the connection's threads pause

    def strikes(self, fault, what):
        """Roll this connection's next decision for ``fault``; count and log a strike."""
        odds = self.chaos.odds.get(fault)
        if not odds:
            return False
        rolls = self._pushes if fault in PUSH_FAULTS else self._commands
        if rolls.random() < odds:
            self.chaos._count(fault, "%s (connection %d)" % (what, self.number))
            return True
        return False

    def delay(self):
        """Seconds to hold the next reply or push (0 when no delay is configured)."""
        low, high = self.chaos.delay_ms
        if not high:
            return 0.0
        with self._lock:
            return self._delays.uniform(low, high) / 1000.0
