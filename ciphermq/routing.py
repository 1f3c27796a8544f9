"""Exchanges and how they route: direct, fanout and topic.

An exchange maps a routing key to the queues bound to it.  This module holds
no lock of its own: every exchange belongs to a :class:`~ciphermq.broker.Broker`
and is only touched with that broker's ``mutex`` held.
"""


class Exchange:
    """One exchange and its bindings.  Only used with the broker mutex held.

    Routing a key never walks every binding: a direct exchange looks the key
    up in a dict, a fanout exchange keeps its queue list, and a topic
    exchange walks a :class:`TopicTrie` of binding-key words, which costs
    about O(words of the key) (times the wildcards it meets), not
    O(bindings).  Results are cached per routing key (bounded).
    """

    def __init__(self, name, kind="direct"):
        self.name = name
        self.kind = kind
        self._bindings = {}     # (binding_key, queue) -> order it was made, for bindings()
        self._direct = {}       # binding key -> [(order, queue)] (direct exchanges)
        self._trie = TopicTrie() if kind == "topic" else None
        self._cache = {}        # routing key -> tuple of queues, cleared by bind()

    def bind(self, binding_key, queue):
        """Bind ``queue`` under ``binding_key``; True if new (binding twice is a no-op)."""
        if (binding_key, queue) in self._bindings:
            return False
        order = self._bindings[(binding_key, queue)] = len(self._bindings)
        if self._trie is not None:
            self._trie.add(binding_key, order, queue)
        else:
            self._direct.setdefault(binding_key, []).append((order, queue))
        self._cache.clear()
        return True

    def bindings(self):
        """``(binding_key, queue)`` pairs in the order they were made."""
        return list(self._bindings)

    def is_bound(self, binding_key, queue):
        return (binding_key, queue) in self._bindings

    def route(self, routing_key):
        """The queues a message with ``routing_key`` goes to (each at most once),
        in the order their bindings were made."""
        queues = self._cache.get(routing_key)
        if queues is None:
            if self.kind == "fanout":
                matches = [(order, queue) for (_, queue), order in self._bindings.items()]
            elif self._trie is not None:
                matches = sorted(self._trie.match(routing_key), key=_order)
            else:
                matches = self._direct.get(routing_key, ())
            queues = tuple(_unique(queue for _, queue in matches))
            if len(self._cache) >= 10_000:       # bounded: keys come from clients
                self._cache.clear()
            self._cache[routing_key] = queues
        return queues


def _order(match):
    return match[0]


def _unique(items):
    seen = set()
    unique = []
    for item in items:
        if item not in seen:
            seen.add(item)
            unique.append(item)
    return unique


class TopicTrie:
    """Topic binding keys as a trie of their dot-separated words.

    Each node has children by literal word plus one ``*`` and one ``#``
    child; the bindings ending at a node are kept there.  :meth:`match`
    walks the routing key's words once per reachable (node, position) pair,
    remembered so that ``#`` never makes it exponential: the cost grows with
    the key's words and the wildcard branches it meets, not with how many
    bindings there are.  Same answers as :func:`topic_matches` (tested).
    """

    __slots__ = ("children", "ends")

    def __init__(self):
        self.children = {}      # word ("*" and "#" included) -> TopicTrie
        self.ends = []          # (order, queue) of the bindings whose key ends here

    def add(self, binding_key, order, queue):
        node = self
        for word in binding_key.split("."):
            node = node._child(word)
        node.ends.append((order, queue))

    def _child(self, word):
        child = self.children.get(word)
        if child is None:
            child = self.children[word] = TopicTrie()
        return child

    def match(self, routing_key):
        """Every ``(order, queue)`` bound under a pattern matching ``routing_key``."""
        return self._walk(routing_key)[0]

    def nodes_visited(self, routing_key):
        """How many (node, position) pairs :meth:`match` walks (for tests of its cost)."""
        return self._walk(routing_key)[1]

    def _walk(self, routing_key):
        words = routing_key.split(".")
        count = len(words)
        found = []
        seen = set()
        stack = [(self, 0)]
        while stack:
            node, position = stack.pop()
            if (id(node), position) in seen:
                continue
            seen.add((id(node), position))
            children = node.children
            if position == count:
                found.extend(node.ends)
            else:
                for word in (words[position], "*"):
                    child = children.get(word)
                    if child is not None:
                        stack.append((child, position + 1))
            hash_child = children.get("#")
            if hash_child is not None:          # "#" eats zero or more words
                for rest in range(position, count + 1):
                    stack.append((hash_child, rest))
        return found, len(seen)


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
