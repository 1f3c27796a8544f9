"""Broker URLs: which broker a script talks to, and the failover list they form.

``--url`` (repeatable) names the broker:

* ``ciphermq://host[:port]`` -- our own broker (default port 5672);
* ``amqp://[user[:password]@]host[:port][/vhost]`` -- RabbitMQ (default port 5672,
  user ``guest``, vhost ``/``);
* ``amqps://...`` -- the same over TLS (default port 5671).

Several URLs form a failover list (:class:`Failover`): the first that answers is
used, and after a lost connection the next round starts with the URL after the
one that was in use, wrapping around.  All URLs of one list name the same kind
of broker: a list mixing ``ciphermq`` and ``amqp`` is refused, because the two
do not share their queues.

Pure: no sockets, no pika.  Errors are :class:`UrlError` (a ValueError) with a
message fit to print after ``Error: ``; :func:`url_argument` turns them into
argparse's usage errors.
"""
import argparse
import threading
import urllib.parse
from typing import NamedTuple

from .errors import ConnectionLost, UrlError

SCHEMES = {"ciphermq": 5672, "amqp": 5672, "amqps": 5671}   # scheme -> default port


class BrokerUrl(NamedTuple):
    """One parsed broker URL.  ``str()`` of it never shows the password."""

    scheme: str             # "ciphermq", "amqp" or "amqps"
    host: str
    port: int
    username: str = "guest"
    password: str = "guest"
    vhost: str = "/"

    @property
    def kind(self):
        """``"ciphermq"`` or ``"amqp"`` (amqps is amqp over TLS)."""
        return "ciphermq" if self.scheme == "ciphermq" else "amqp"

    @property
    def tls(self):
        return self.scheme == "amqps"

    @property
    def peer(self):
        """``host:port`` as the status lines print it (IPv6 in brackets)."""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s:%d" % (host, self.port)

    def __str__(self):
        if self.kind == "ciphermq":
            return "ciphermq://%s" % self.peer
        vhost = "" if self.vhost == "/" else "/" + urllib.parse.quote(self.vhost, safe="")
        return "%s://%s@%s%s" % (self.scheme, urllib.parse.quote(self.username, safe=""),
                                 self.peer, vhost)


def parse_url(text):
    """Parse one ``--url`` value into a :class:`BrokerUrl`; raises UrlError."""
    if not isinstance(text, str) or not text.strip():
        raise UrlError("empty broker URL")
    if "://" not in text:
        raise UrlError("%r is not a broker URL: expected ciphermq://host:port, "
                       "amqp://user:pass@host:port/vhost or amqps://..." % text)
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise UrlError("%r: unknown scheme %r (use ciphermq, amqp or amqps)" % (_shown(text),
                                                                              parts.scheme))
    if parts.query or parts.fragment:
        raise UrlError("%r: query strings and fragments are not supported" % _shown(text))
    if not parts.hostname:
        raise UrlError("%r: no host" % _shown(text))
    try:
        port = parts.port
    except ValueError:
        raise UrlError("%r: the port must be a number from 1 to 65535" % _shown(text)) from None
    if port == 0:
        raise UrlError("%r: the port must be a number from 1 to 65535" % _shown(text))
    port = port or SCHEMES[scheme]
    if scheme == "ciphermq":
        if parts.username is not None or parts.path not in ("", "/"):
            raise UrlError("%r: a ciphermq URL is only ciphermq://host:port "
                           "(authenticate with --auth)" % _shown(text))
        return BrokerUrl(scheme, parts.hostname, port)
    username = urllib.parse.unquote(parts.username) if parts.username is not None else "guest"
    password = urllib.parse.unquote(parts.password) if parts.password is not None else (
        "guest" if parts.username is None else "")
    if not username:
        raise UrlError("%r: empty user name" % _shown(text))
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if "/" in path:
        raise UrlError("%r: the path is one virtual host; write '/' in it as %%2F" % _shown(text))
    vhost = urllib.parse.unquote(path) if path else "/"
    return BrokerUrl(scheme, parts.hostname, port, username, password, vhost)


def parse_urls(texts):
    """Parse a failover list; raises UrlError if it is empty or mixes broker kinds."""
    urls = [parse_url(text) for text in texts]
    if not urls:
        raise UrlError("no broker URL given")
    return check_one_kind(urls)


def check_one_kind(urls):
    """Return ``urls`` (BrokerUrls); raises UrlError if they mix broker kinds."""
    if len({url.kind for url in urls}) > 1:
        raise UrlError("one failover list cannot mix ciphermq:// and amqp(s):// URLs: "
                       "they are different brokers with different queues")
    return urls


def url_argument(text):
    """argparse ``type=`` for ``--url``: a BrokerUrl, or a usage error naming the problem."""
    try:
        return parse_url(text)
    except UrlError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shown(text):
    """The URL as it may be printed: with any password replaced by ``***``."""
    parts = urllib.parse.urlsplit(text)
    if parts.password is None:
        return text
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class Failover:
    """A failover list and where the next connection attempt starts.

    Refuses (UrlError) a list that mixes broker kinds, parsed or not.
    Owned by one thread (the script's main loop); not locked.  Each call to
    :meth:`round` yields every URL once, starting with the one after the URL
    last :meth:`used` (the first URL before any was used), wrapping around.
    """

    def __init__(self, urls):
        self.urls = parse_urls(urls) if urls and isinstance(urls[0], str) else list(urls)
        if not self.urls:
            raise UrlError("no broker URL given")
        check_one_kind(self.urls)
        self.current = None         # index of the URL last connected to, or None

    def round(self):
        """The URLs in the order the next connection attempt should try them."""
        start = 0 if self.current is None else (self.current + 1) % len(self.urls)
        return self.urls[start:] + self.urls[:start]

    def used(self, url):
        """Record that ``url`` answered: the next round starts after it."""
        self.current = self.urls.index(url)

    def connect(self, open_one, *, attempts=None, retry_interval=1.0, stop=None,
                on_retry=None):
        """``open_one(url)`` for the URLs of a :meth:`round` until one answers; its result.

        ``open_one`` raises ConnectionLost for a URL that does not answer.  Up
        to ``attempts`` rounds (None: until ``stop``, a threading.Event, is
        set), waiting ``retry_interval`` seconds on ``stop`` between rounds;
        ``on_retry(tries, error)`` is called before each wait.  Blocks; raises
        ConnectionLost when it gives up or is stopped.  Anything else
        ``open_one`` raises (a refused login, say) ends the attempt at once.
        """
        stop = stop if stop is not None else threading.Event()
        tries = 0
        while True:
            tries += 1
            errors = []
            for url in self.round():
                try:
                    connection = open_one(url)
                except ConnectionLost as exc:
                    errors.append(str(exc))
                    continue
                self.used(url)
                return connection
            error = ConnectionLost("; ".join(errors))
            if attempts is not None and tries >= attempts:
                raise error
            if on_retry is not None:
                on_retry(tries, error)
            if stop.wait(retry_interval):
                raise ConnectionLost("stopped while connecting to %s"
                                     % ", ".join(str(url) for url in self.urls))
