"""The same client, over RabbitMQ: :class:`AmqpClient` speaks AMQP 0-9-1 through pika.

It offers what the scripts use on :class:`ciphermq.client.Client` -- ``publish_many``
returning one reply per message, ``consume`` filling :attr:`deliveries` with
:class:`~ciphermq.client.Delivery` tuples, ``ack_many``, ``lost``, ``close`` -- so the
sender's outbox and window and the receiver's store-then-ack work unchanged, plus
``reject_many`` (dead-letter without requeue), which our own broker does not need.

How CipherMQ's promises map onto RabbitMQ:

* ``ACK <id>`` is a **publisher confirm**.  Every publish is ``mandatory``: a message
  no queue would take comes back as an error (ServerError), never a silent drop.
  A nack ends the connection: the nacked message's reply raises Nacked (a
  ConnectionLost), and the sender reconnects and sends it again, on a fresh channel
  (see ``_publish`` for why).
* The envelope JSON is the message body byte for byte; its id is also the AMQP
  ``message_id``; delivery mode 2 (persistent).
* ``ACK_CONFIRMED <id>`` means the ``basic.ack`` has been written to the socket.
  AMQP does not confirm acks: if the connection ends first, RabbitMQ delivers the
  message again and the receiver's store recognises the duplicate.
* The topology (:class:`Topology`) is declared by both sides on every connection,
  idempotently: the exchange, a durable **quorum** queue whose ``x-delivery-limit``
  makes a message delivered ``max_deliveries`` times go to ``<queue>.dead`` (a
  quorum queue too), and the binding.

Threads: pika's BlockingConnection may only be used by one thread, so each client
has one, ``ciphermq-amqp-<host:port>``, which opens the connection, runs every
command and receives every delivery.  Callers queue commands (closures) and wake
it with pika's one thread-safe call, ``add_callback_threadsafe``; each command
resolves its :class:`Reply` objects, which callers wait on.  While the thread
waits in a blocking publish for its confirm, deliveries and heartbeats are still
read by pika, and a later command waits its turn.

Failover is one level up: :func:`connect` tries the URLs of a
:class:`~ciphermq.urls.Failover` list in turn; a lost connection ends the client
(``lost`` is true, ``None`` goes into :attr:`deliveries`), and the script connects
again, to the next URL.  The sender resends what was not confirmed, the receiver's
store absorbs what comes twice.

Lock: ``AmqpClient._mutex`` guards ``_commands``, ``_error`` and ``_pending`` (the
replies not yet resolved).  It is never held across pika calls or waits.  Only the
I/O thread touches the pika objects and ``_tags``.

pika is imported only here, and only when an AMQP client is made:
:func:`require_pika` says how to install it when it is missing.
"""
import collections
import json
import logging
import queue
import threading
from typing import NamedTuple

from .client import Delivery, envelope_bytes
from .errors import ConnectionLost, MissingDependency, Nacked, ServerError

log = logging.getLogger(__name__)

EXCHANGE_TYPES = ("direct", "fanout", "topic")
#: Longest the I/O thread waits in pika before looking at its command queue again
#: (it is woken at once when a command arrives; this only bounds a lost wake-up).
IDLE_WAIT = 1.0


def require_pika():
    """Import and return pika; raises MissingDependency with the install command."""
    try:
        import pika
    except ImportError:
        raise MissingDependency("amqp:// URLs need pika: pip install -e '.[amqp]'") from None
    return pika


class Topology(NamedTuple):
    """What both scripts declare on RabbitMQ before using it."""

    exchange: str = "default_exchange"
    exchange_type: str = "direct"
    queue: str = "default_queue"
    routing_key: str = "default_key"
    max_deliveries: int = 10        # deliveries before a message goes to <queue>.dead

    @property
    def dead_queue(self):
        return self.queue + ".dead"

    def check(self):
        """Raise ValueError unless RabbitMQ could be given this topology."""
        if self.exchange_type not in EXCHANGE_TYPES:
            raise ValueError("exchange type must be one of %s, not %r"
                             % (", ".join(EXCHANGE_TYPES), self.exchange_type))
        if not isinstance(self.max_deliveries, int) or self.max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        if not self.exchange or not self.queue:
            raise ValueError("the exchange and the queue need names")
        return self

    def queue_arguments(self):
        """The quorum queue's arguments: delivery limit and dead-letter target, at least once.

        RabbitMQ counts a delivery against ``x-delivery-limit`` when it comes
        back unacked, and dead-letters it once that count *exceeds* the limit:
        a limit of ``max_deliveries - 1`` allows exactly ``max_deliveries``
        deliveries, as our broker's ``--max-deliveries`` does.
        """
        return {"x-queue-type": "quorum",
                "x-delivery-limit": self.max_deliveries - 1,
                "x-dead-letter-exchange": "",           # the default exchange: by queue name
                "x-dead-letter-routing-key": self.dead_queue,
                # RabbitMQ's default drops a dead-letter the target cannot take at once
                # (at-most-once); at-least-once keeps it until <queue>.dead confirms it,
                # and needs reject-publish for when the queue is full.
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish"}


class Reply:
    """The outcome of one command: a small future the I/O thread resolves.

    Same contract as :class:`ciphermq.client.Reply`: :meth:`done` and
    :meth:`result`, which returns the line our broker would have sent
    (``ACK <id>``, ``ACK_CONFIRMED <id>``...).
    """

    __slots__ = ("command", "_arrived", "_text", "_error")

    def __init__(self, command):
        self.command = command
        self._arrived = threading.Event()
        self._text = None
        self._error = None

    def done(self):
        """True once resolved.  Does not block."""
        return self._arrived.is_set()

    def result(self, timeout=None):
        """Block up to ``timeout`` seconds for the outcome; return it as str.

        Raises TimeoutError if it has not come in time, ServerError if RabbitMQ
        refused the command, ConnectionLost if the connection ended first.
        """
        if not self._arrived.wait(timeout):
            raise TimeoutError("no reply to %s within %.1f s" % (self.command, timeout))
        if self._error is not None:
            raise self._error
        return self._text

    def _resolve(self, text=None, error=None):
        """First outcome wins; later ones are ignored.  Any thread."""
        if not self._arrived.is_set():
            self._text, self._error = text, error
            self._arrived.set()


class AmqpClient:
    """One AMQP connection and channel to RabbitMQ.  Connects in the constructor.

    ``url`` is an ``amqp``/``amqps`` :class:`~ciphermq.urls.BrokerUrl`.
    ``topology`` (a :class:`Topology`, or None) is declared before the
    constructor returns.  ``timeout`` bounds connecting and is the default wait
    of the blocking calls; ``heartbeat`` (seconds, None: off) is negotiated with
    RabbitMQ, which then notices a dead peer as our heartbeat does.
    ``tls_context`` (an ssl.SSLContext) is used for ``amqps`` (default: the
    system's trusted CAs), checking the certificate against ``server_hostname``
    (default: the URL's host).

    Raises MissingDependency without pika, ConnectionLost if RabbitMQ cannot be
    reached, ServerError if it refuses the login, the virtual host or the
    topology (e.g. a queue of that name exists with other arguments).
    """

    def __init__(self, url, *, topology=None, timeout=5.0, heartbeat=5.0, tls_context=None,
                 server_hostname=None):
        self._pika = require_pika()
        if url.kind != "amqp":
            raise ValueError("AmqpClient needs an amqp:// or amqps:// URL, not %s" % url)
        self.url = url
        self.peer = url.peer
        self.timeout = timeout
        self.topology = topology.check() if topology is not None else None
        #: Deliveries in arrival order; ``None`` once the connection has ended.
        self.deliveries = queue.Queue()
        self._mutex = threading.Lock()          # see the module docstring
        self._commands = collections.deque()    # (function, replies), oldest first
        self._pending = set()                   # Replies not yet resolved
        self._error = None                      # why the client ended (str), or None
        # Owned by the I/O thread:
        self._connection = self._channel = None
        self._tags = {}                         # message id -> deque of delivery tags
        self._unacked = set()                   # delivery tags not yet acked or rejected
        self._params = self._parameters(heartbeat, tls_context, server_hostname)
        self._started = threading.Event()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name="ciphermq-amqp-%s" % self.peer,
                                        daemon=True)
        self._thread.start()
        # pika bounds the TCP connect (socket_timeout) and the AMQP handshake
        # (stack_timeout); the declarations add a few round trips.
        if not self._started.wait(timeout * 3 + 1):
            self._fail("no answer from %s within %.0f s" % (self.peer, timeout * 3 + 1))
            raise ConnectionLost("cannot connect to %s: no answer" % self.peer)
        if self._start_error is not None:
            raise self._start_error

    def _parameters(self, heartbeat, tls_context, server_hostname):
        pika, url = self._pika, self.url
        ssl_options = None
        if url.tls:
            if tls_context is None:
                import ssl
                tls_context = ssl.create_default_context()
            ssl_options = pika.SSLOptions(tls_context, server_hostname or url.host)
        return pika.ConnectionParameters(
            host=url.host, port=url.port, virtual_host=url.vhost,
            credentials=pika.PlainCredentials(url.username, url.password),
            heartbeat=0 if heartbeat is None else max(1, int(round(heartbeat))),
            connection_attempts=1, socket_timeout=self.timeout, stack_timeout=self.timeout * 2,
            blocked_connection_timeout=self.timeout, ssl_options=ssl_options,
            client_properties={"connection_name": "ciphermq"})

    # -- state ---------------------------------------------------------------------

    @property
    def lost(self):
        """True once the connection has ended (lost or closed).  Does not block."""
        with self._mutex:
            return self._error is not None

    def close(self):
        """Close the connection; replies still awaited raise ConnectionLost.

        Safe to call twice and from any thread.  Joins the I/O thread for up
        to ``timeout`` seconds: a thread stuck in a publish whose confirm never
        comes is left to pika's heartbeat (it is a daemon thread).
        """
        self._fail("connection closed by the client", quiet=True)
        if threading.current_thread() is not self._thread:
            self._thread.join(self.timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- commands (any thread) ---------------------------------------------------------

    def declare(self, topology, timeout=None):
        """Declare ``topology`` (idempotent) and remember it for this connection.  Blocks."""
        topology.check()
        reply = Reply("declare %s" % topology.queue)
        self._submit(lambda: self._declare(topology, reply), [reply])
        reply.result(self._wait(timeout))

    def publish_many(self, messages):
        """Queue several publishes; return their Replies (``ACK <id>``), in order.

        ``messages`` holds ``(exchange, routing_key, envelope)`` tuples; an
        envelope is a dict or its JSON text with a string ``message_id``.
        Raises ConnectionLost if the connection has ended, ValueError for an
        envelope without an id.
        """
        items = []
        for exchange, routing_key, envelope in messages:
            message_id, body = envelope_bytes(envelope)
            items.append((Reply("publish %s" % message_id), exchange, routing_key, message_id,
                          body))
        replies = [item[0] for item in items]
        self._submit(lambda: self._publish(items), replies)
        return replies

    def publish_async(self, exchange, routing_key, envelope):
        return self.publish_many([(exchange, routing_key, envelope)])[0]

    def publish(self, exchange, routing_key, envelope, timeout=None):
        """Publish and block until the confirm; raises like :meth:`Reply.result`."""
        self.publish_async(exchange, routing_key, envelope).result(self._wait(timeout))

    def consume(self, queue_name, prefetch=None, timeout=None):
        """Subscribe to ``queue_name``; block until RabbitMQ has said yes.

        ``prefetch`` is the most unacked deliveries in flight (None: leave
        RabbitMQ's default; 0: no limit).  Deliveries then arrive in
        :attr:`deliveries`.
        """
        reply = Reply("consume %s" % queue_name)
        self._submit(lambda: self._consume(queue_name, prefetch, reply), [reply])
        reply.result(self._wait(timeout))

    def ack_many(self, message_ids):
        """Ack deliveries by message id; return Replies (``ACK_CONFIRMED <id>``), in order.

        One id acks the oldest unacked delivery of that id on this connection
        (a duplicate delivered twice is acked twice).  When the acks cover
        every unacked delivery up to the newest one named, one ``multiple``
        ack goes out for all of them.
        """
        return self._settle(message_ids, "ack")

    def ack_async(self, message_id):
        return self.ack_many([message_id])[0]

    def ack(self, message_id, timeout=None):
        self.ack_async(message_id).result(self._wait(timeout))

    def reject_many(self, refusals):
        """Reject ``(id, reason)`` deliveries without requeue (RabbitMQ: on to ``<queue>.dead``).

        The same call as :meth:`ciphermq.client.Client.reject_many`; AMQP's
        ``basic.reject`` carries no reason, so the reason stays in the
        receiver's rejects file.  Returns Replies (``REJECTED <id>``), in order.
        """
        return self._settle([message_id for message_id, _ in refusals], "reject")

    def reject(self, message_id, timeout=None, reason=""):
        self.reject_many([(message_id, reason)])[0].result(self._wait(timeout))

    def _settle(self, message_ids, how):
        replies = [(Reply("%s %s" % (how, message_id)), message_id)
                   for message_id in message_ids]
        self._submit(lambda: self._settle_now(replies, how), [r for r, _ in replies])
        return [r for r, _ in replies]

    def _wait(self, timeout):
        return self.timeout if timeout is None else timeout

    def _submit(self, function, replies):
        with self._mutex:
            if self._error is not None:
                raise ConnectionLost(self._error)
            self._commands.append((function, replies))
            self._pending.update(replies)
        self._wake()

    def _wake(self):
        try:
            self._connection.add_callback_threadsafe(_nothing)
        except self._pika.exceptions.AMQPError:
            pass                        # closing: the I/O thread resolves what is pending

    # -- the I/O thread ------------------------------------------------------------------

    def _run(self):
        pika = self._pika
        try:
            self._open()
        except BaseException as exc:   # handed to the constructor, which raises it
            self._start_error = exc
            self._fail(str(exc), quiet=True)
            self._started.set()
            self._close_connection()
            return
        self._started.set()
        reason = None
        try:
            while self._next_commands():
                self._connection.process_data_events(time_limit=IDLE_WAIT)
        except ConnectionLost as exc:
            reason = str(exc)
        except pika.exceptions.AMQPError as exc:
            reason = "connection to %s lost: %s" % (self.peer, _describe(exc))
        except OSError as exc:
            reason = "connection to %s lost: %s" % (self.peer, exc)
        except Exception:
            log.exception("Unexpected error in the AMQP client for %s", self.peer)
            reason = "connection to %s ended by an internal error" % self.peer
        finally:
            self._fail(reason or "connection closed by the client", quiet=reason is None)
            self._close_connection()

    def _next_commands(self):
        """Run the queued commands; False once the client has ended.  I/O thread only."""
        while True:
            with self._mutex:
                if self._error is not None:
                    return False
                if not self._commands:
                    return True
                function, replies = self._commands.popleft()
            try:
                function()
            except self._pika.exceptions.ChannelClosedByBroker as exc:
                reason = "RabbitMQ closed the channel: %s %s" % (exc.reply_code, exc.reply_text)
                for reply in replies:
                    reply._resolve(error=ServerError(reason))
                raise ConnectionLost(reason) from None
            finally:
                with self._mutex:
                    self._pending.difference_update(r for r in replies if r.done())

    def _open(self):
        pika = self._pika
        try:
            self._connection = pika.BlockingConnection(self._params)
        except (pika.exceptions.ProbableAuthenticationError,
                pika.exceptions.AuthenticationError) as exc:
            raise ServerError("RabbitMQ at %s refused the login of %s: %s"
                              % (self.peer, self.url.username, _describe(exc))) from None
        except pika.exceptions.ProbableAccessDeniedError as exc:
            raise ServerError("RabbitMQ at %s refused access to virtual host %r: %s"
                              % (self.peer, self.url.vhost, _describe(exc))) from None
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise ConnectionLost("cannot connect to %s: %s" % (self.peer, _describe(exc))) from None
        try:
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            if self.topology is not None:
                self._declare_now(self.topology)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise ServerError("RabbitMQ at %s refused the topology: %s %s"
                              % (self.peer, exc.reply_code, exc.reply_text)) from None
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise ConnectionLost("connection to %s lost while declaring: %s"
                                 % (self.peer, _describe(exc))) from None

    def _declare(self, topology, reply):
        self._declare_now(topology)
        reply._resolve("Declared %s" % topology.queue)

    def _declare_now(self, topology):
        """Exchange, quorum queue, dead-letter queue, binding.  I/O thread only."""
        channel = self._channel
        channel.exchange_declare(topology.exchange, topology.exchange_type, durable=True)
        channel.queue_declare(topology.dead_queue, durable=True,
                              arguments={"x-queue-type": "quorum"})
        channel.queue_declare(topology.queue, durable=True,
                              arguments=topology.queue_arguments())
        channel.queue_bind(topology.queue, topology.exchange, routing_key=topology.routing_key)

    def _publish(self, items):
        pika = self._pika
        for reply, exchange, routing_key, message_id, body in items:
            properties = pika.BasicProperties(message_id=message_id, delivery_mode=2,
                                              content_type="application/json")
            try:
                self._channel.basic_publish(exchange, routing_key, body, properties,
                                            mandatory=True)
            except pika.exceptions.UnroutableError:
                reply._resolve(error=ServerError(
                    "message %s is unroutable: exchange %s has no queue for routing key %s"
                    % (message_id, exchange, routing_key)))
            except pika.exceptions.NackError:
                # Seen on RabbitMQ 3.10: a channel that publishes while a quorum queue
                # elects a new leader goes on nacking after the election.  A fresh
                # channel does not, so a nack ends the connection and the sender,
                # reconnecting, sends the message again.
                # Its reply says Nacked, the others' the plain ConnectionLost that follows.
                reason = ("RabbitMQ nacked message %s; reconnecting to send it again on a "
                          "fresh channel" % message_id)
                reply._resolve(error=Nacked(reason))
                raise ConnectionLost(reason) from None
            else:
                reply._resolve("ACK %s" % message_id)

    def _consume(self, queue_name, prefetch, reply):
        if prefetch is not None:
            self._channel.basic_qos(prefetch_count=prefetch)
        self._channel.basic_consume(queue_name, self._on_message)
        reply._resolve("Subscribed to queue")

    def _on_message(self, channel, method, properties, body):
        """pika's consumer callback, in the I/O thread: hand the delivery over."""
        message_id = properties.message_id or _id_in(body)
        if not message_id:
            log.warning("Message without a message_id from %s: dead-lettered", self.peer)
            channel.basic_reject(method.delivery_tag, requeue=False)
            return
        self._tags.setdefault(message_id, collections.deque()).append(method.delivery_tag)
        self._unacked.add(method.delivery_tag)
        self.deliveries.put(Delivery(message_id, body))

    def _settle_now(self, replies, how):
        settled = []                    # (delivery tag, reply, message id)
        for reply, message_id in replies:
            tags = self._tags.get(message_id)
            if not tags:
                reply._resolve(error=ServerError(
                    "no unacked delivery of message %s on this connection" % message_id))
                continue
            tag = tags.popleft()
            if not tags:
                del self._tags[message_id]
            settled.append((tag, reply, message_id))
        if not settled:
            return
        tags = {tag for tag, _, _ in settled}
        newest = max(tags)
        if how == "ack" and all(tag in tags for tag in self._unacked if tag <= newest):
            self._channel.basic_ack(newest, multiple=True)
        else:
            for tag in sorted(tags):
                if how == "ack":
                    self._channel.basic_ack(tag)
                else:
                    self._channel.basic_reject(tag, requeue=False)
        self._unacked.difference_update(tags)
        word = "ACK_CONFIRMED" if how == "ack" else "REJECTED"
        for _, reply, message_id in settled:
            reply._resolve("%s %s" % (word, message_id))

    def _close_connection(self):
        connection = self._connection
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except (self._pika.exceptions.AMQPError, OSError) as exc:
                log.debug("Closing the connection to %s: %s", self.peer, exc)

    def _fail(self, reason, quiet=False):
        """End the client once: fail every pending reply, end the deliveries.  Any thread."""
        with self._mutex:
            if self._error is not None:
                return
            self._error = reason
            pending, self._pending = self._pending, set()
            self._commands.clear()
        for reply in pending:
            reply._resolve(error=ConnectionLost(reason))
        self.deliveries.put(None)
        if self._connection is not None and threading.current_thread() is not self._thread:
            self._wake()
        if not quiet:
            log.info("Connection to %s ended: %s", self.peer, reason)


def connect(failover, *, attempts=None, retry_interval=1.0, stop=None, on_retry=None,
            **options):
    """Open an :class:`AmqpClient` to the first URL of ``failover`` that answers.

    Each try is one round over the list (:meth:`~ciphermq.urls.Failover.round`:
    it starts after the URL used last, so a lost node is tried last).  Up to
    ``attempts`` rounds (None: until ``stop``, a threading.Event, is set),
    waiting ``retry_interval`` seconds on ``stop`` between rounds;
    ``on_retry(tries, error)`` is called before each wait.  ``options`` go to
    :class:`AmqpClient`.  Blocks; raises ConnectionLost when it gives up or is
    stopped, ServerError at once if RabbitMQ refuses the login or topology.
    """
    return failover.connect(lambda url: AmqpClient(url, **options), attempts=attempts,
                            retry_interval=retry_interval, stop=stop, on_retry=on_retry)


# -- helpers -------------------------------------------------------------------------

def _id_in(body):
    """The envelope's message_id, for a delivery published without an AMQP message_id."""
    try:
        envelope = json.loads(body)
    except ValueError:
        return None
    message_id = envelope.get("message_id") if isinstance(envelope, dict) else None
    return message_id if isinstance(message_id, str) and message_id else None


def _describe(exc):
    return str(exc) or repr(exc)


def _nothing():
    """The wake-up callback: running it makes process_data_events return."""
