"""Every exception CipherMQ raises on purpose, each a subclass of :class:`CipherMQError`.

The classes are defined here and nowhere else; the modules that raise them
import them from here (and keep the old names, e.g. ``store.CorruptFile``,
importable).  Broker-side errors carry the text sent to the client after
``Error: ``.  The client translates socket failures into
:class:`ConnectionLost` and :class:`TransportError` at its boundary, and
``crypto`` turns every way an envelope can fail into :class:`DecryptionError`.
A few standard exceptions still cross the library's edge where they are the
natural answer: ``OSError`` for a data file (store, outbox, journal) that
cannot be read or written or a key file that already exists, ``TypeError``
and ``ValueError`` for a wrong argument in code, ``TimeoutError`` when a
reply does not come in time.
"""


class CipherMQError(Exception):
    """Base class for all CipherMQ errors."""


# -- the line protocol and the broker ------------------------------------------

class ProtocolError(CipherMQError):
    """A command line is malformed: unknown verb, bad usage, invalid JSON, too long."""


class BrokerError(CipherMQError):
    """A well-formed command that the broker refuses (unknown queue, full, not allowed)."""


class NotAllowed(BrokerError):
    """The connection's principal may not perform this command."""


class JournalError(CipherMQError):
    """The journal cannot be read, locked or written; the broker must not go on."""


class JournalDamaged(JournalError):
    """Damaged bytes with intact records after them: not a torn write, so nothing is cut."""

    def __init__(self, path, damaged, intact_after, saved_as="journal.damaged"):
        self.path, self.damaged, self.intact_after = path, damaged, intact_after
        start, end = damaged[0]
        more = ""
        if len(damaged) > 1:
            more = " (and %d more damaged stretch(es))" % (len(damaged) - 1)
        super().__init__(
            "journal %s is damaged at offset %d: %d byte(s) fail their checksum%s, and %d intact "
            "record(s) follow. This is not a torn write, so nothing was cut and the broker did "
            "not start. To keep every intact record and move the damaged bytes aside into a new "
            "%s.* file, start it again with --repair."
            % (path, start, end - start, more, intact_after, saved_as))


class JournalWriteFailed(JournalError, BrokerError):
    """A journal write or fsync failed (full disk, I/O error): refuse what needs the disk.

    Its text is the client's ``Error:`` line: ``journal write failed: <reason>``.
    """

    def __init__(self, cause):
        self.cause = cause
        super().__init__("journal write failed: %s" % describe_os_error(cause))


def describe_os_error(exc):
    """An OSError as a short reason: its strerror, without errno or path."""
    return getattr(exc, "strerror", None) or str(exc)


class ChaosSpecError(CipherMQError, ValueError):
    """The --chaos text does not parse (a ValueError too, for argparse and older callers)."""


# -- the client side -------------------------------------------------------------

class ConnectionLost(CipherMQError):
    """Client side: the connection to the broker failed or closed."""


class Nacked(ConnectionLost):
    """RabbitMQ nacked a publish: send it again, on a fresh connection (see amqp.py).

    Not the message's fault -- a quorum queue electing a new leader nacks a
    burst of publishes -- so the sender waits a moment instead of counting an
    attempt for each nack.
    """


class TransportError(CipherMQError):
    """The TLS handshake failed or timed out."""


class ServerError(CipherMQError):
    """Client side: the broker answered a command with an ``Error: ...`` line."""


class DecryptionError(CipherMQError):
    """An envelope could not be opened: tampered, wrong key, malformed or refused.

    Every cause raises this one class with the same message, so that a
    caller cannot be used as an oracle that tells the causes apart.
    """


# -- what a script is given ------------------------------------------------------

class UsageError(CipherMQError, ValueError):
    """Options that cannot be used together, or a token or TLS file that cannot be read.

    A ValueError too, as the standard library's own argument errors are.
    """


class UrlError(UsageError):
    """A --url value that cannot be used; the message says why."""


class KeyFileError(UsageError):
    """A key file cannot be read, or holds no usable key of the kind asked for."""


# -- files and tools ---------------------------------------------------------------

class CorruptFile(CipherMQError):
    """A line other than the last is not a valid record: not a crash artefact, so
    nothing is cut off and the owner refuses to go on (the file needs a human)."""


class OutputWriteFailed(CipherMQError):
    """The receiver could not write or fsync its output (or rejects) file: full disk, I/O
    error.  What that write covered was not acked; the receiver stops."""

    def __init__(self, path, cause):
        self.path, self.cause = path, cause
        super().__init__("cannot write %s: %s" % (path, describe_os_error(cause)))


class CheckError(CipherMQError):
    """An input the checker cannot use: unreadable, corrupt, or missing its records."""


class MissingDependency(CipherMQError):
    """An optional dependency (pika, for amqp:// URLs) is not installed; says how to install it."""


class RabbitMQUnavailable(CipherMQError, RuntimeError):
    """RabbitMQ (or pika, needed to talk to it) is not installed or did not start."""
