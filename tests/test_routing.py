"""Exchange types: direct, fanout and AMQP-style topic routing."""
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
