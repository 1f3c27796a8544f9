"""The redelivery timer: one thread that gives back deliveries nobody acked.

The document's server "retries delivery of Delivered messages every 30
seconds".  Here every delivery carries its own deadline; this thread sleeps
on an Event until the earliest one is due, asks the broker to take back
whatever has expired, and goes back to waiting.
"""
import logging
import threading

from .turns import between_chunks

log = logging.getLogger(__name__)


class RedeliveryTimer:
    """Runs ``broker.retry_unacknowledged`` whenever a deadline is due.

    ``start()`` launches the thread ``ciphermq-redelivery`` (non-daemon: it
    is always stopped explicitly); ``stop()`` sets the stop Event and joins.
    """

    #: Never wake more often than this, however close deadlines are.
    MIN_WAIT = 0.005

    def __init__(self, broker, turns):
        self._broker = broker
        #: The server's Turns (ciphermq/turns.py): a give-back too large for one hold of
        #: the broker mutex steps aside between chunks for a short read, as a reader does.
        self._turns = turns
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ciphermq-redelivery")

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout=5.0):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self):
        clock = self._broker.clock
        while not self._stop.is_set():
            try:
                next_due = self._retry()
            except Exception:               # a bug: log it, keep the timer alive
                log.exception("redelivery pass failed")
                next_due = clock() + 1.0
            self._stop.wait(max(self.MIN_WAIT, next_due - clock()))

    def _retry(self):
        """One pass of retry_unacknowledged; a pass that puts messages back in chunks steps
        aside between two of them for a short read, as a reader does (ciphermq/turns.py)."""
        return self._broker.retry_unacknowledged(between_chunks=between_chunks(self._turns))
