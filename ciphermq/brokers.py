"""Which broker a script talks to: our own, or RabbitMQ, chosen by the URL.

``--url ciphermq://...`` opens a :class:`ciphermq.client.Client`; ``--url amqp://...``
or ``amqps://...`` an :class:`ciphermq.amqp.AmqpClient`.  Both offer what the scripts
use -- ``publish_many``, ``consume``, ``deliveries``, ``ack_many``, ``lost``, ``peer``,
``close`` -- so :mod:`ciphermq.sender` and :mod:`ciphermq.receiver` call
:func:`connect_any` and never ask which one they got.  Several URLs form a failover
list (:class:`ciphermq.urls.Failover`): each try goes once round the list, starting
after the URL used last.

pika is imported only when an amqp URL is connected to (:mod:`ciphermq.amqp`).
"""

from . import client
from .errors import UsageError
from .urls import BrokerUrl, Failover


def failover_for(host="127.0.0.1", port=5672, urls=None):
    """A :class:`Failover` over ``urls`` (BrokerUrls), or over ``ciphermq://host:port``.

    Raises UrlError (a UsageError) if ``urls`` mixes broker kinds.
    """
    return Failover(urls or [BrokerUrl("ciphermq", host, port)])


def connect_any(failover=None, *, host="127.0.0.1", port=5672, topology=None, auth=None,
                tls_context=None, attempts=None, retry_interval=1.0, stop=None,
                on_retry=None, **options):
    """Open a client to the first URL of ``failover`` that answers (default: host:port).

    Each try is one round over the list; up to ``attempts`` tries (None:
    until ``stop``, a threading.Event, is set), ``retry_interval`` seconds
    apart, with ``on_retry(tries, error)`` before each wait.  ``topology``
    (an :class:`ciphermq.amqp.Topology`) is declared on RabbitMQ and not
    needed by our broker, whose exchanges and queues are configured on the
    server; ``auth`` is our broker's (RabbitMQ's user is in the URL).
    ``options`` (timeout, heartbeat) go to the client.  Blocks; raises
    ConnectionLost when it gives up or is stopped, ServerError at once if
    the broker refuses the login or the topology.
    """
    if failover is None:
        failover = failover_for(host, port)
    if failover.urls[0].kind == "amqp":
        if auth is not None:
            raise UsageError("--auth is for ciphermq:// brokers; put RabbitMQ's user and "
                             "password in the amqp:// URL")
        from . import amqp
        return amqp.connect(failover, attempts=attempts, retry_interval=retry_interval,
                            stop=stop, on_retry=on_retry, topology=topology,
                            tls_context=tls_context, **options)
    return failover.connect(
        lambda url: client.Client(url.host, url.port, auth=auth, tls_context=tls_context,
                                  **options),
        attempts=attempts, retry_interval=retry_interval, stop=stop, on_retry=on_retry)
