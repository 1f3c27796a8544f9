"""Failed logins: a per-source budget, and log lines that summarise instead of flood.

A client that guesses tokens gets one attempt per connection (connection.py
hangs up after any failure), so its cost to the broker is a TCP connection
and one token hash per guess.  :class:`LoginGuard` bounds that per source
address: after ``limit`` failures within ``window`` seconds, that address's
further ``auth`` lines are refused without hashing anything, until its window
ends.  It also keeps the log quiet: the first failure of an interval is logged
(WARNING, with its peer); the others are counted, and the count is logged as
one summary line when the next failure after the interval arrives.
"""
import logging
import threading
import time

log = logging.getLogger(__name__)


class LoginGuard:
    """Counts failed logins per source address.  Thread-safe; never blocks on I/O."""

    def __init__(self, limit=20, window=60.0, *, clock=time.monotonic, max_sources=10_000):
        self.limit = limit
        self.window = window
        self.clock = clock
        self.max_sources = max_sources
        #: Guards _sources, _quiet_until and _unlogged.  Held only for dict and
        #: counter updates; logging happens after it is released.  Never held
        #: together with another CipherMQ lock.
        self._lock = threading.Lock()
        self._sources = {}          # address -> [window start, failures in that window]
        self._quiet_until = None    # end of the current log interval (None: none yet)
        self._unlogged = 0          # failures in the current interval not logged one by one

    def allowed(self, address):
        """False if ``address`` has used up its failures this window: do not check its token."""
        now = self.clock()
        with self._lock:
            entry = self._sources.get(address)
            return entry is None or now - entry[0] >= self.window or entry[1] < self.limit

    def failed(self, address, peer, refused=False):
        """Record a failed (or refused unchecked) login from ``address``; log it or count it."""
        now = self.clock()
        with self._lock:
            entry = self._sources.get(address)
            if entry is None or now - entry[0] >= self.window:
                if entry is None and len(self._sources) >= self.max_sources:
                    self._forget_oldest(now)
                entry = self._sources[address] = [now, 0]
            entry[1] += 1
            summary = None
            if self._quiet_until is None or now >= self._quiet_until:
                summary, self._unlogged = self._unlogged, 0
                self._quiet_until = now + self.window
                log_this = True
            else:
                self._unlogged += 1
                log_this = False
        if summary:
            log.warning("%d more failed login(s) in the previous %.0f s interval (not logged "
                        "one by one)", summary, self.window)
        if log_this:
            log.warning("Authentication failed from %s%s", peer,
                        " (refused unchecked: too many failures from this address)"
                        if refused else "")

    def _forget_oldest(self, now):
        """Make room: drop expired sources, else the oldest one.  Lock held."""
        expired = [address for address, (start, _) in self._sources.items()
                   if now - start >= self.window]
        for address in expired:
            del self._sources[address]
        if len(self._sources) >= self.max_sources:
            del self._sources[next(iter(self._sources))]
