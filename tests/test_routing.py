"""Exchange types: direct, fanout and AMQP-style topic routing."""
import random

import pytest

from ciphermq.routing import Exchange, topic_matches


@pytest.mark.parametrize("pattern, key, matches", [
    ("stock.*.nyse", "stock.ibm.nyse", True),
    ("stock.*.nyse", "stock.nyse", False),
    ("stock.#", "stock", True),
    ("stock.#", "stock.ibm.nyse", True),
    ("#", "anything.at.all", True),
    ("#.nyse", "nyse", True),
    ("*.*", "a.b", True),
    ("*.*", "a.b.c", False),
    ("a.#.z", "a.z", True),
    ("a.#.z", "a.b.c.z", True),
    ("a.#.z", "a.b.c", False),
    ("exact.key", "exact.key", True),
])
def test_topic_wildcards(pattern, key, matches):
    """'*' is exactly one word, '#' is zero or more words."""
    assert topic_matches(pattern, key) is matches


def test_pathological_topic_pattern_is_fast():
    """Many '#' against a long key is memoised, not exponential."""
    assert not topic_matches(".".join(["#"] * 40) + ".x", ".".join(["a"] * 120))


def test_direct_routes_a_key_to_every_queue_bound_with_it():
    """A direct key may route to several queues, each once."""
    exchange = Exchange("ex", "direct")
    exchange.bind("k", "q1")
    exchange.bind("k", "q2")
    exchange.bind("k", "q1")
    exchange.bind("other", "q3")
    assert exchange.route("k") == ("q1", "q2")
    assert exchange.route("nope") == ()


def test_fanout_ignores_the_key():
    """Fanout sends to every bound queue whatever the routing key."""
    exchange = Exchange("ex", "fanout")
    exchange.bind("a", "q1")
    exchange.bind("b", "q2")
    assert exchange.route("zzz") == ("q1", "q2")


def test_topic_routes_each_queue_once_even_if_two_patterns_match():
    """A queue bound by two matching patterns receives the message once."""
    exchange = Exchange("ex", "topic")
    exchange.bind("a.*", "q1")
    exchange.bind("#", "q1")
    exchange.bind("b.#", "q2")
    assert exchange.route("a.x") == ("q1",)
    assert exchange.route("b.y.z") == ("q1", "q2")


def _random_words(rng, count, wildcards):
    alphabet = ["a", "b", "c", ""] + (["*", "#"] * 2 if wildcards else [])
    return ".".join(rng.choice(alphabet) for _ in range(count))


def test_topic_trie_routes_exactly_as_the_plain_matcher():
    """On 1,000 random keys against 300 random patterns, the trie gives the plain
    matcher's queues, in binding order, each once."""
    rng = random.Random(11)
    exchange = Exchange("t", "topic")
    patterns = [_random_words(rng, rng.randint(1, 5), True) for _ in range(300)]
    for number, pattern in enumerate(patterns):
        exchange.bind(pattern, "q%d" % (number % 40))
    for _ in range(1000):
        key = _random_words(rng, rng.randint(1, 6), False)
        expected = []
        for number, pattern in enumerate(patterns):
            queue = "q%d" % (number % 40)
            if topic_matches(pattern, key) and queue not in expected:
                expected.append(queue)
        assert list(exchange.route(key)) == expected, key


def test_topic_routing_of_a_new_key_visits_words_not_bindings():
    """With 10,000 literal bindings, routing a new key touches a handful of trie
    nodes (counted), not 10,000 bindings."""
    exchange = Exchange("t", "topic")
    for number in range(10_000):
        exchange.bind("sensor.%d.temp" % number, "q%d" % number)
    exchange.bind("sensor.*.#", "all")
    assert exchange.route("sensor.77.temp") == ("q77", "all")
    assert exchange.route("sensor.new-key.temp") == ("all",)
    assert exchange._trie.nodes_visited("sensor.77.temp") <= 8
