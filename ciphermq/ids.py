"""The life of a message id: live, then acked within the dedup window, then forgotten.

Every message id is bound to its envelope for as long as the broker knows the
id: the same id with the same bytes is a duplicate, re-ACKed; with different
bytes it is refused (:meth:`MessageIds.bound_to_same`).  While a copy is
queued or in flight the id is *live*, bound to the envelope bytes themselves
(``live``), which the broker keeps anyway; when its first copy is acked (or
purged) the id enters the dedup window with a 16-byte digest of them
(``digests``, also written in the ack's journal record), since the bytes are
then let go::

    bind --> live (its bytes) --first copy settled--> acked (its digest)
                                                          |
                     --dedup_window passed, or dedup_max_ids newer ids--> forgotten

An id is live and acked at once while fanout copies are still to be acked.
"""
import collections

from . import recovery


class MessageIds:
    """Every id the broker knows, what it is bound to, and when it is forgotten.

    Takes no lock of its own: it is part of the broker's state, guarded by
    ``Broker.mutex`` (documented where that lock is made, in
    ``Broker.__init__``), and every method is only called with it held.
    ``clock`` is the broker's injectable monotonic clock.
    """

    def __init__(self, window, max_ids, clock):
        self.window = window        # seconds an acked id is remembered (--dedup-window)
        self.max_ids = max_ids      # ... and at most this many of them (dedup_max_ids)
        self.clock = clock
        self.live = {}              # message id -> its envelope, while a copy is not acked
        self.fanout = {}            # id in live -> copies not yet acked, only if more than 1
        self.live_bytes = 0         # envelope bytes of live ids, once each (compaction rule)
        self.acked_at = {}          # message id -> clock() of its first ack
        self.acked_order = collections.deque()     # ids in acked_at, oldest first
        self.digests = {}           # id in acked_at -> recovery.envelope_digest(body)

    def bind(self, message_id, body, copies):
        """A new id: live, bound to ``body``, until its ``copies`` queued copies are settled."""
        self.live[message_id] = body
        if copies > 1:
            self.fanout[message_id] = copies
        self.live_bytes += len(body)

    def bound_to_same(self, message_id, body):
        """Is a known id bound to these envelope bytes?  What an id is bound to, in one place.

        A live id (a copy queued or in flight) is compared with its envelope
        itself; an acked one (in the dedup window) with the digest taken at its
        first ack.  An id acked before digests were journaled has none: any
        bytes count as the same (dedup by id alone, as then).
        """
        live_body = self.live.get(message_id)
        if live_body is not None:
            return live_body == body
        digest = self.digests.get(message_id)
        return digest is None or digest == recovery.envelope_digest(body)

    def settle_copy(self, message_id, body):
        """One copy acked (or purged); the digest its journal record carries.

        The first puts the id in the dedup window, bound to a digest of its
        envelope; the last ends its life as a live id.
        """
        if message_id in self.acked_at:
            digest = self.digests.get(message_id)
        else:
            # Hashed under the mutex, once per id: about 1 us for a 537-byte envelope,
            # 6 ms at the 4 MiB line limit.  (Hashing at publish, outside the lock, would
            # mean keeping the digest beside the envelope all the time it is queued.)
            digest = recovery.envelope_digest(body)
            self.acked_at[message_id] = self.clock()
            self.digests[message_id] = digest
            self.acked_order.append(message_id)
            if len(self.acked_order) > self.max_ids:
                self._forget(self.acked_order.popleft())
        left = self.fanout.pop(message_id, 1) - 1
        if left > 1:
            self.fanout[message_id] = left
        elif not left:
            del self.live[message_id]
            self.live_bytes -= len(body)
        return digest

    def expire(self, now):
        """Forget the acked ids older than the dedup window (the redelivery timer's pass)."""
        order, acked_at = self.acked_order, self.acked_at
        cutoff = now - self.window
        while order and acked_at[order[0]] <= cutoff:
            self._forget(order.popleft())

    def restore_acked(self, acked, digests, now, wall_now_ms):
        """Acked ids with wall-clock ack times (a journal's) back into the monotonic window."""
        for message_id, wall_ms in sorted(acked.items(), key=lambda item: item[1]):
            age = max(0.0, (wall_now_ms - wall_ms) / 1000)
            if age < self.window and message_id not in self.acked_at:
                self.acked_at[message_id] = now - age
                self.acked_order.append(message_id)
                digest = digests.get(message_id)
                if digest is not None:
                    self.digests[message_id] = digest
        while len(self.acked_order) > self.max_ids:
            self._forget(self.acked_order.popleft())

    def snapshot_acked(self, state, now, wall_now_ms):
        """The dedup window into a RecoveredState, ack times on the wall clock (compaction)."""
        for message_id in self.acked_order:
            age_ms = int((now - self.acked_at[message_id]) * 1000)
            state.acked[message_id] = wall_now_ms - age_ms
            if message_id in self.digests:
                state.acked_digests[message_id] = self.digests[message_id]

    def _forget(self, message_id):
        """An id leaves the dedup window, with its digest."""
        del self.acked_at[message_id]
        self.digests.pop(message_id, None)
