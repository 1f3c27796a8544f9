"""The wire protocol: line framing, command parsing, envelope validation, replies.

Pure functions and one small stateful framer -- no sockets, no threads -- so
every rule of the protocol can be read (and tested) in one place.

The protocol is UTF-8 text, one command per line.  A line ends in ``\\n``
(``\\r\\n`` is accepted).  Framing is by newline only: one ``recv`` may hold
many commands, and one command may arrive in many ``recv`` calls.
"""
import collections
import json
import math
import re

from .errors import ProtocolError

#: Default limit on one command line (bytes, terminator excluded).
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024

#: Queue, exchange and message-id names: echoed into replies and log lines,
#: so nothing but these characters may pass.
NAME_PATTERN = rb"[A-Za-z0-9._:-]{1,128}"
_NAME = re.compile(NAME_PATTERN)
#: Routing keys as published: dot-separated words.
_ROUTING_KEY = re.compile(rb"[A-Za-z0-9._:-]{1,255}")
#: Binding keys may also use the topic wildcards ``*`` (one word) and ``#`` (zero or more).
_BINDING_KEY = re.compile(rb"[A-Za-z0-9._:*#-]{1,255}")

EXCHANGE_TYPES = ("direct", "fanout", "topic")
#: The fields every envelope must carry, all strings (see docs/PROTOCOL.md).
ENVELOPE_FIELDS = ("message_id", "enc_session_key", "nonce", "tag", "ciphertext")
#: Added by the broker to every pushed copy; never accepted from a publisher.
_REQUIRED = frozenset(ENVELOPE_FIELDS)
DELIVERY_COUNT = "delivery_count"
MAX_PREFETCH = 65535


class LineTooLong:
    """Marker yielded by :class:`LineFramer` in place of a line over the limit."""

    def __init__(self, limit):
        self.limit = limit


class LineFramer:
    """Turns a byte stream into complete lines.

    ``feed(data)`` returns the lines completed by ``data`` (without the
    terminator).  A line longer than the limit is replaced by one
    :class:`LineTooLong` marker as soon as the limit is crossed, and the rest
    of it is discarded up to its newline -- so memory stays bounded and the
    connection stays usable.  Not thread-safe: one framer per connection,
    used by that connection's reader only.
    """

    def __init__(self, max_line_bytes=DEFAULT_MAX_LINE_BYTES):
        self.max_line_bytes = max_line_bytes
        self._parts = []        # pieces of the unfinished line
        self._size = 0          # total bytes in _parts
        self._discarding = False

    @property
    def buffered(self):
        """Bytes of an unfinished line held in memory."""
        return self._size

    @property
    def in_line(self):
        """True from a line's first byte to its newline, also while discarding an over-long one."""
        return self._discarding or self._size > 0

    def feed(self, data):
        """Add received bytes; return the lines they complete, in order."""
        if (data.endswith(b"\n") and not self._parts and not self._discarding
                and len(data) <= self.max_line_bytes and b"\r" not in data):
            # The common case -- whole lines, nothing pending -- without a call per line.
            lines = data.split(b"\n")
            lines.pop()
            return lines
        pieces = data.split(b"\n")
        if len(pieces) == 1:                    # no newline: the line goes on
            self._add_partial(data)
            return self._take_overflow()
        first = pieces[0]
        lines = []
        if self._discarding:                    # the over-long line ends here
            self._discarding = False
        else:
            if self._parts:
                self._parts.append(first)
                first = b"".join(self._parts)
            lines.append(self._checked(first))
        self._parts, self._size = [], 0
        for line in pieces[1:-1]:
            lines.append(self._checked(line))
        self._add_partial(pieces[-1])
        lines.extend(self._take_overflow())
        return lines

    def _checked(self, line):
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line_bytes:
            return LineTooLong(self.max_line_bytes)
        return line

    def _add_partial(self, data):
        if data and not self._discarding:
            self._parts.append(data)
            self._size += len(data)

    def _take_overflow(self):
        # An unfinished line already over the limit (+1 for a possible "\r").
        if self._size > self.max_line_bytes + 1:
            self._parts, self._size = [], 0
            self._discarding = True
            return [LineTooLong(self.max_line_bytes)]
        return []


# -- parsing ---------------------------------------------------------------

def split_command(line):
    """Split a line into ``(verb, args)``; ``verb`` is a str, ``args`` the raw rest.

    Returns ``(None, b"")`` for a blank line.  Raises :class:`ProtocolError`
    for NUL bytes and invalid UTF-8 in the verb.
    """
    if b"\x00" in line:
        raise ProtocolError("NUL byte in command")
    parts = line.split(None, 1)
    if not parts:
        return None, b""
    verb = parts[0]
    try:
        verb_text = verb.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("invalid UTF-8 in command") from None
    return verb_text, parts[1] if len(parts) > 1 else b""


def split_args(args, usage, minimum, maximum=None):
    """Split plain (non-JSON) arguments on whitespace and check their count."""
    words = args.split()
    if not minimum <= len(words) <= (minimum if maximum is None else maximum):
        raise ProtocolError("usage: %s" % usage)
    return words


def parse_name(raw, what):
    """Validate a queue, exchange or message-id name and return it as str."""
    if not _NAME.fullmatch(raw):
        raise ProtocolError("invalid %s name %s (1-128 of A-Z a-z 0-9 . _ : -)"
                            % (what, quote(raw)))
    return raw.decode("ascii")


def parse_routing_key(raw, binding=False):
    pattern = _BINDING_KEY if binding else _ROUTING_KEY
    if not pattern.fullmatch(raw):
        raise ProtocolError("invalid routing key %s" % quote(raw))
    return raw.decode("ascii")


def parse_exchange_type(raw):
    kind = raw.decode("ascii", "replace")
    if kind not in EXCHANGE_TYPES:
        raise ProtocolError("unknown exchange type %s (direct, fanout or topic)" % quote(raw))
    return kind


def parse_prefetch(raw):
    if not raw.isdigit() or len(raw) > 5 or int(raw) > MAX_PREFETCH:
        raise ProtocolError("prefetch must be an integer from 0 to %d" % MAX_PREFETCH)
    return int(raw)


def parse_publish(args, limits=None):
    """Parse ``<exchange> <routing_key> <json>``; return (exchange, key, message_id, body).

    ``body`` is the envelope's JSON object as bytes, exactly as received
    (unless it carried a ``delivery_count``, which only the broker may set),
    so delivery never re-serialises the publisher's JSON.  ``limits`` bounds
    the envelope's extra fields (default :data:`DEFAULT_ENVELOPE_LIMITS`).
    """
    parts = args.split(None, 2)
    if len(parts) < 3:
        raise ProtocolError("usage: publish <exchange> <routing_key> <json>")
    exchange = parse_name(parts[0], "exchange")
    routing_key = parse_routing_key(parts[1])
    message_id, body = parse_envelope(parts[2].rstrip(), limits)
    return exchange, routing_key, message_id, body


def _unique_keys(pairs):
    """JSON object hook: a key given twice is refused (parsers disagree on which wins)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return obj


def _no_constants(name):
    raise ValueError("%s is not valid JSON" % name)


#: Longest JSON integer accepted (CPython's own default, enforced here on every version).
MAX_INT_DIGITS = 4300


def _bounded_int(text):
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError("integer longer than %d digits" % MAX_INT_DIGITS)
    return int(text)


def _finite_float(text):
    value = float(text)
    if math.isinf(value):           # 1e999 is Infinity by another name
        raise ValueError("number out of range: %s" % text[:40])
    return value


_ENVELOPE_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constants,
                                     parse_int=_bounded_int, parse_float=_finite_float)
#: Everything base64 text may hold ("=" only as padding, checked separately).
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


class EnvelopeLimits(collections.namedtuple("EnvelopeLimits", "max_extra_fields max_json_depth")):
    """Extra envelope fields are forwarded untouched, within these bounds."""


DEFAULT_ENVELOPE_LIMITS = EnvelopeLimits(max_extra_fields=32, max_json_depth=8)


def parse_envelope(raw, limits=None):
    """Validate an envelope's JSON text; return ``(message_id, body_bytes)``.

    Refused: anything but one JSON object; duplicate keys; NaN/Infinity;
    missing or non-string required fields; crypto fields that are not
    base64 text; extra fields nested deeper than ``limits.max_json_depth``,
    more than ``limits.max_extra_fields`` of them, or holding lone surrogates.
    """
    if not (raw.startswith(b"{") and raw.endswith(b"}")):
        raise ProtocolError("envelope must be a JSON object")
    try:
        envelope = _ENVELOPE_DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("invalid UTF-8 in envelope") from None
    except RecursionError:
        raise ProtocolError("invalid JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        reason = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg   # "... starting at"
        raise ProtocolError("invalid JSON: %s at position %d" % (reason, exc.pos)) from None
    except ValueError as exc:           # from the hooks
        raise ProtocolError("invalid JSON: %s" % exc) from None
    if not isinstance(envelope, dict):
        raise ProtocolError("envelope must be a JSON object")
    values = [envelope.get(field) for field in ENVELOPE_FIELDS]
    if not all(type(value) is str for value in values):
        _refuse_required_fields(values)
    message_id = values[0]
    if not _NAME.fullmatch(message_id.encode("utf-8", "replace")):
        raise ProtocolError("invalid message_id (1-128 of A-Z a-z 0-9 . _ : -)")
    crypto_text = values[1:]
    # One pass over all four fields for the alphabet, then padding only at their ends.
    if "".join(crypto_text).encode("utf-8", "replace").translate(None, _BASE64_ALPHABET):
        _refuse_base64(crypto_text)
    for text in crypto_text:
        if "=" in text.rstrip("=") or text.endswith("==="):
            _refuse_base64(crypto_text)
    if len(envelope) > len(ENVELOPE_FIELDS):
        _check_extra_fields(envelope, limits or DEFAULT_ENVELOPE_LIMITS)
    if DELIVERY_COUNT in envelope:
        del envelope[DELIVERY_COUNT]
        raw = json.dumps(envelope, separators=(", ", ": ")).encode("utf-8")
    return message_id, raw


def _refuse_required_fields(values):
    for field, value in zip(ENVELOPE_FIELDS, values):
        if value is None:
            raise ProtocolError("missing field '%s'" % field)
        if not isinstance(value, str):
            raise ProtocolError("field '%s' must be a string" % field)


def _refuse_base64(crypto_text):
    """Name the field that failed the fast check (the slow, obvious way)."""
    for field, text in zip(ENVELOPE_FIELDS[1:], crypto_text):
        if not re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", text):
            raise ProtocolError("field '%s' must be base64 text" % field)
    raise ProtocolError("crypto fields must be base64 text")


def _check_extra_fields(envelope, limits):
    if len(envelope) - len(ENVELOPE_FIELDS) > limits.max_extra_fields:
        raise ProtocolError("too many fields (at most %d extra)" % limits.max_extra_fields)
    _check_text("".join(envelope))         # every key at once
    for key, value in envelope.items():
        if key not in _REQUIRED:
            _check_value(value, 1, limits.max_json_depth)


def _check_value(value, depth, max_depth):
    if isinstance(value, str):
        _check_text(value)
    elif isinstance(value, (dict, list)):
        if depth >= max_depth:
            raise ProtocolError("JSON nested deeper than %d levels" % max_depth)
        for key in value if isinstance(value, dict) else ():
            _check_text(key)
        for item in value.values() if isinstance(value, dict) else value:
            _check_value(item, depth + 1, max_depth)


def _check_text(text):
    if text.isascii():
        return                      # no surrogate can hide in ASCII
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("invalid string in envelope (lone surrogate)") from None


def quote(raw, limit=40):
    """A short, printable rendering of untrusted bytes for an error message."""
    text = raw[:limit].decode("utf-8", "replace")
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return "'%s%s'" % (text, "..." if len(raw) > limit else "")


# -- replies ---------------------------------------------------------------

QUEUE_DECLARED = b"Queue declared\n"
EXCHANGE_DECLARED = b"Exchange declared\n"
QUEUE_BOUND = b"Queue bound\n"
SUBSCRIBED = b"Subscribed to queue\n"
NO_MESSAGES = b"No messages\n"
PONG = b"PONG\n"
AUTH_OK = b"AUTH_OK\n"


def ack_reply(message_id):
    return b"ACK %s\n" % message_id.encode("ascii")


def ack_confirmed_reply(message_id):
    return b"ACK_CONFIRMED %s\n" % message_id.encode("ascii")


def nack_confirmed_reply(message_id):
    return b"NACK_CONFIRMED %s\n" % message_id.encode("ascii")


def error_reply(text):
    """``Error: <text>`` -- one line, whatever the text holds."""
    return b"Error: %s\n" % " ".join(str(text).split()).encode("utf-8", "replace")


def message_line(message_id, body, delivery_count):
    """``Message: <id> <json>`` with ``delivery_count`` added to the envelope.

    ``body`` is a JSON object ending in ``}``; the field is spliced in before
    that brace instead of parsing and re-serialising the envelope.
    """
    return b"Message: %s %s, \"delivery_count\": %d}\n" % (
        message_id.encode("ascii"), body[:-1], delivery_count)


def stats_reply(stats):
    return json.dumps(stats, separators=(",", ":"), sort_keys=True).encode("ascii") + b"\n"
