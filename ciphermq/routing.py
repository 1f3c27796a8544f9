"""Exchanges and how they route: direct, fanout and topic.

An exchange maps a routing key to the queues bound to it.  This module holds
no lock of its own: every exchange belongs to a :class:`~ciphermq.broker.Broker`
and is only touched with that broker's ``mutex`` held.
"""


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

    Walks the pattern once, keeping the set of word counts the pattern so far
    could have consumed: at most (pattern words x key words) steps, whatever
    the wildcards -- a naive backtracking matcher is exponential in the ``#``s.
    """
    words = routing_key.split(".")
    consumed = {0}
    for token in pattern.split("."):
        if token == "#":
            consumed = set(range(min(consumed), len(words) + 1))
        else:
            consumed = {count + 1 for count in consumed
                        if count < len(words) and token in ("*", words[count])}
            if not consumed:
                return False
    return len(words) in consumed
