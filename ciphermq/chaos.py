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

Rolls come from one ``random.Random(seed)``, so a run with the same seed
and the same traffic injects the same faults.  Every injected fault is
logged at WARNING with the word CHAOS.
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


class Chaos:
    """Decides, reproducibly, when to inject each fault.  Thread-safe."""

    def __init__(self, spec, seed=None):
        self.spec = spec
        self.odds, self.delay_ms = parse_spec(spec)
        #: Guards _random: rolls from many connection threads share one sequence.
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.injected = dict.fromkeys(FAULTS, 0)

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
