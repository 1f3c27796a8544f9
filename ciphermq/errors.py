"""Every exception CipherMQ raises on purpose derives from :class:`CipherMQError`.

Broker-side errors carry the text sent to the client after ``Error: ``; the
client and crypto layers translate socket and cryptography failures into the
classes below at their boundary, so callers never catch ``OSError`` or
``ValueError`` from deep inside the library.
"""


class CipherMQError(Exception):
    """Base class for all CipherMQ errors."""


class ProtocolError(CipherMQError):
    """A command line is malformed: unknown verb, bad usage, invalid JSON, too long."""


class BrokerError(CipherMQError):
    """A well-formed command that the broker refuses (unknown queue, full, not allowed)."""


class NotAllowed(BrokerError):
    """The connection's principal may not perform this command."""


class ConnectionLost(CipherMQError):
    """Client side: the connection to the broker failed or closed."""


class ServerError(CipherMQError):
    """Client side: the broker answered a command with an ``Error: ...`` line."""


class DecryptionError(CipherMQError):
    """An envelope could not be opened: tampered, wrong key, malformed or refused.

    Every cause raises this one class with the same message, so that a
    caller cannot be used as an oracle that tells the causes apart.
    """


class MissingDependency(CipherMQError):
    """An optional dependency (pika, for amqp:// URLs) is not installed; says how to install it."""
