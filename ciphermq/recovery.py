"""What journal records mean: building them, and folding them back into state.

:mod:`ciphermq.journal` moves bytes to and from disk; this module knows what
the bytes say.  ``fold(payloads)`` replays a journal into a plain
:class:`RecoveredState` that :meth:`ciphermq.broker.Broker.restore` turns
into live queues; ``snapshot_records`` writes a state back out as the
shortest journal that says the same thing (compaction).
"""
import hashlib
import logging

log = logging.getLogger(__name__)

#: The queue field of an ack record that only keeps an id in the dedup window
#: (``*`` can never be a queue name).
DEDUP_ONLY = "*"


def envelope_digest(body):
    """What an acked (or purged) id stays bound to: 16 bytes of BLAKE2b over the envelope
    bytes, carried by its ack record."""
    return hashlib.blake2b(body, digest_size=16).digest()


def queue_record(name):
    return b"Q " + name.encode("ascii")


def exchange_record(name, kind):
    return b"X %s %s" % (name.encode("ascii"), kind.encode("ascii"))


def binding_record(exchange, queue, key):
    return b"B %s %s %s" % (exchange.encode("ascii"), queue.encode("ascii"), key.encode("ascii"))


def publish_record(message_id, queue_names, body):
    return b"P %s %s %s" % (message_id.encode("ascii"),
                            ",".join(queue_names).encode("ascii"), body)


def ack_record(message_id, queue_name, wall_ms, digest=None):
    """``A <id> <queue> <ms> [<digest hex>]``: the digest keeps the id bound to its envelope."""
    record = b"A %s %s %d" % (message_id.encode("ascii"), queue_name.encode("ascii"), wall_ms)
    return record if digest is None else record + b" " + digest.hex().encode("ascii")


def dead_letter_record(message_id, from_queue, to_queue, reason=None):
    """``D <id> <from> <to> [<reason>]``: the reason is free text to the end of the record."""
    record = b"D %s %s %s" % (message_id.encode("ascii"), from_queue.encode("ascii"),
                              to_queue.encode("ascii"))
    return record if reason is None else record + b" " + reason.encode("ascii", "replace")


def purge_record(queue_name, message_ids, wall_ms):
    """``purge``: the ready copies of these ids left the queue, settled like acks."""
    return b"U %s %s %d" % (queue_name.encode("ascii"),
                            ",".join(message_ids).encode("ascii"), wall_ms)


def requeue_record(from_queue, to_queue, message_ids):
    """``requeue_dead``: these ids moved from a dead-letter queue back to its queue."""
    return b"R %s %s %s" % (from_queue.encode("ascii"), to_queue.encode("ascii"),
                            ",".join(message_ids).encode("ascii"))


class RecoveredState:
    """Everything a journal says, in plain containers, in the order it was said."""

    def __init__(self):
        self.queues = {}            # name -> None (an ordered set)
        self.exchanges = {}         # name -> type
        self.bindings = []          # (exchange, queue, key)
        self.live = {}              # message id -> (body, [queue names holding a copy])
        self.acked = {}             # message id -> wall-clock ms of its ack
        self.acked_digests = {}     # message id -> envelope digest (ack records that carry one)
        self.reasons = {}           # message id -> why it was dead-lettered (if said)

    def __repr__(self):
        return "<RecoveredState %d queues, %d live messages, %d acked ids>" % (
            len(self.queues), len(self.live), len(self.acked))


def fold(payloads):
    """Replay record payloads (oldest first) into a :class:`RecoveredState`."""
    state = RecoveredState()
    for payload in payloads:
        kind, _, rest = payload.partition(b" ")
        handler = _FOLDERS.get(kind)
        if handler is None:
            log.warning("Journal: skipping unknown record type %r", kind[:8])
            continue
        handler(state, rest)
    return state


def _fold_queue(state, rest):
    state.queues[rest.decode("ascii")] = None


def _fold_exchange(state, rest):
    name, kind = rest.decode("ascii").split(" ")
    state.exchanges[name] = kind


def _fold_binding(state, rest):
    binding = tuple(rest.decode("ascii").split(" "))
    if binding not in state.bindings:
        state.bindings.append(binding)


def _fold_publish(state, rest):
    message_id, queues, body = rest.split(b" ", 2)
    message_id = message_id.decode("ascii")
    names = queues.decode("ascii").split(",")
    for name in names:
        state.queues.setdefault(name, None)
    state.live[message_id] = (body, names)


def _fold_ack(state, rest):
    message_id, queue, wall_ms, *digest = rest.decode("ascii").split(" ")
    _ack_copy(state, message_id, queue, int(wall_ms),
              bytes.fromhex(digest[0]) if digest else None)


def _ack_copy(state, message_id, queue, wall_ms, digest):
    """One copy of ``message_id`` acked (or purged) from ``queue``; ``digest``: what the id
    stays bound to, or None (a record older than digests)."""
    if digest is not None:
        state.acked_digests.setdefault(message_id, digest)
    entry = state.live.get(message_id)
    if entry is not None and queue in entry[1]:
        entry[1].remove(queue)
        if not entry[1]:
            del state.live[message_id]
    # As in the broker: the first acked copy puts the id in the dedup window.
    state.acked.setdefault(message_id, wall_ms)


def _fold_dead_letter(state, rest):
    message_id, from_queue, to_queue, *reason = rest.decode("ascii").split(" ", 3)
    if reason:
        state.reasons[message_id] = reason[0]
    entry = state.live.get(message_id)
    if entry is not None and from_queue in entry[1]:
        names = entry[1]
        names[names.index(from_queue)] = to_queue
        state.queues.setdefault(to_queue, None)


def _fold_purge(state, rest):
    queue, ids, wall_ms = rest.decode("ascii").split(" ")
    for message_id in ids.split(","):
        # The record names ids only; the bytes of their publish records bind them, as the
        # broker's purge did (a purged id leaves bound to a digest like an acked one).
        entry = state.live.get(message_id)
        _ack_copy(state, message_id, queue, int(wall_ms),
                  None if entry is None else envelope_digest(entry[0]))


def _fold_requeue(state, rest):
    from_queue, to_queue, ids = rest.decode("ascii").split(" ")
    for message_id in ids.split(","):
        _fold_dead_letter(state, ("%s %s %s" % (message_id, from_queue, to_queue)).encode())


_FOLDERS = {b"Q": _fold_queue, b"X": _fold_exchange, b"B": _fold_binding,
            b"P": _fold_publish, b"A": _fold_ack, b"D": _fold_dead_letter,
            b"U": _fold_purge, b"R": _fold_requeue}


def snapshot_records(state):
    """The records that rebuild ``state`` (a RecoveredState), generated lazily."""
    for name in state.queues:
        yield queue_record(name)
    for name, kind in state.exchanges.items():
        yield exchange_record(name, kind)
    for exchange, queue, key in state.bindings:
        yield binding_record(exchange, queue, key)
    for message_id, (body, names) in state.live.items():
        yield publish_record(message_id, names, body)
        reason = state.reasons.get(message_id)
        if reason is not None:      # from == to: only says why it is dead
            dead = next((name for name in names if name.endswith(".dead")), None)
            if dead is not None:
                yield dead_letter_record(message_id, dead, dead, reason)
    for message_id, wall_ms in state.acked.items():
        yield ack_record(message_id, DEDUP_ONLY, wall_ms, state.acked_digests.get(message_id))
