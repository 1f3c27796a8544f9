"""Exchanges and how they route: direct, fanout and topic.

An exchange maps a routing key to the queues bound to it.  This module holds
no lock of its own: every exchange belongs to a :class:`~ciphermq.broker.Broker`
and is only touched with that broker's ``mutex`` held.
"""
import functools


class Exchange:
    """One exchange and its bindings.  Only used with the broker mutex held."""

    def __init__(self, name, kind="direct"):
        self.name = name
        self.kind = kind
        self._bindings = []     # (binding_key, queue) in the order they were made
        self._cache = {}        # routing key -> tuple of queues, cleared by bind()

    def bind(self, binding_key, queue):
        """Bind ``queue`` under ``binding_key``; True if new (binding twice is a no-op)."""
        if (binding_key, queue) in self._bindings:
            return False
        self._bindings.append((binding_key, queue))
        self._cache.clear()
        return True

    def bindings(self):
        return list(self._bindings)

    def route(self, routing_key):
        """The queues a message with ``routing_key`` goes to (each at most once)."""
        queues = self._cache.get(routing_key)
        if queues is None:
            queues = tuple(_unique(queue for key, queue in self._bindings
                                   if self._matches(key, routing_key)))
            if len(self._cache) >= 10_000:       # bounded: keys come from clients
                self._cache.clear()
            self._cache[routing_key] = queues
        return queues

    def _matches(self, binding_key, routing_key):
        if self.kind == "fanout":
            return True
        if self.kind == "topic":
            return topic_matches(binding_key, routing_key)
        return binding_key == routing_key


def _unique(items):
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def topic_matches(pattern, routing_key):
    """AMQP topic matching on dot-separated words.

    ``*`` matches exactly one word and ``#`` matches zero or more words:
    ``stock.*.nyse`` matches ``stock.ibm.nyse``; ``stock.#`` matches ``stock``
    and ``stock.ibm.nyse``.
    """
    return _match_words(tuple(pattern.split(".")), tuple(routing_key.split(".")))


@functools.lru_cache(maxsize=4096)
def _match_words(pattern, words):
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        # '#' swallows zero words, or one word and stays in place.
        return _match_words(rest, words) or (bool(words) and _match_words(pattern, words[1:]))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match_words(rest, words[1:])
