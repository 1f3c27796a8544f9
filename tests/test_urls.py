"""--url parsing and the failover order (ciphermq/urls.py): pure, no broker."""
import argparse

import pytest

from ciphermq.urls import BrokerUrl, Failover, UrlError, parse_url, parse_urls, url_argument


def test_ciphermq_url_names_our_broker_with_its_default_port():
    """ciphermq://host[:port] parses to our broker, port 5672 when none is given."""
    assert parse_url("ciphermq://127.0.0.1:7000") == BrokerUrl("ciphermq", "127.0.0.1", 7000)
    url = parse_url("ciphermq://broker.example")
    assert (url.kind, url.port, url.tls) == ("ciphermq", 5672, False)


def test_amqp_url_carries_login_vhost_and_defaults():
    """amqp URLs give user, password and vhost (percent-decoded), with RabbitMQ's defaults."""
    url = parse_url("amqp://alice:p%40ss@rabbit:5681/lab%2Fone")
    assert url == BrokerUrl("amqp", "rabbit", 5681, "alice", "p@ss", "lab/one")
    assert parse_url("amqp://rabbit") == BrokerUrl("amqp", "rabbit", 5672, "guest", "guest", "/")
    assert parse_url("amqp://rabbit:5681/").vhost == "/"
    assert parse_url("amqp://rabbit/%2F").vhost == "/"
    secure = parse_url("amqps://rabbit")
    assert (secure.kind, secure.tls, secure.port) == ("amqp", True, 5671)


def test_ipv6_hosts_parse_and_print_in_brackets():
    """An IPv6 literal is accepted and shown as [addr]:port."""
    url = parse_url("amqp://[::1]:5681")
    assert (url.host, url.peer) == ("::1", "[::1]:5681")


def test_printing_a_url_never_shows_the_password():
    """str(BrokerUrl) and error messages hide the password."""
    assert "s3cret" not in str(parse_url("amqp://bob:s3cret@rabbit:5681/v"))
    with pytest.raises(UrlError) as caught:
        parse_url("amqp://bob:s3cret@rabbit:5681/v?x=1")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("127.0.0.1:5672", "not a broker URL"),
    ("http://rabbit", "unknown scheme"),
    ("amqp://:5672", "no host"),
    ("amqp://rabbit:notaport", "port"),
    ("amqp://rabbit:70000", "port"),
    ("amqp://rabbit:0", "port"),
    ("amqp://rabbit/a/b", "virtual host"),
    ("amqp://rabbit?heartbeat=5", "query"),
    ("ciphermq://alice@broker:7000", "only ciphermq://host:port"),
    ("ciphermq://broker:7000/vhost", "only ciphermq://host:port"),
])
def test_bad_urls_are_refused_with_the_reason(text, words):
    """Every malformed --url is a UrlError whose message says what is wrong."""
    with pytest.raises(UrlError, match=words):
        parse_url(text)


def test_url_argument_turns_errors_into_usage_errors():
    """As an argparse type, a bad URL is an ArgumentTypeError (a usage line, exit 2)."""
    with pytest.raises(argparse.ArgumentTypeError, match="unknown scheme"):
        url_argument("mqtt://broker")
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", type=url_argument, action="append")
    assert parser.parse_args(["--url", "amqp://a", "--url", "amqp://b"]).url[1].host == "b"


def test_a_failover_list_cannot_mix_brokers():
    """ciphermq and amqp URLs in one list are refused: they do not share queues."""
    with pytest.raises(UrlError, match="cannot mix"):
        parse_urls(["ciphermq://a:1", "amqp://b"])
    with pytest.raises(UrlError, match="no broker URL"):
        parse_urls([])


def test_failover_rounds_start_after_the_url_last_used_and_wrap():
    """The first round starts at the first URL; after one was used, the next starts after it."""
    failover = Failover(["amqp://a", "amqp://b", "amqp://c"])
    assert [u.host for u in failover.round()] == ["a", "b", "c"]
    failover.used(failover.urls[0])
    assert [u.host for u in failover.round()] == ["b", "c", "a"]
    failover.used(failover.urls[2])
    assert [u.host for u in failover.round()] == ["a", "b", "c"]
    single = Failover(["amqp://only"])
    single.used(single.urls[0])
    assert [u.host for u in single.round()] == ["only"]
