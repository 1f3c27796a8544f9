"""The envelope: what a ``publish`` carries, and the rules it must meet to be stored.

The broker never decrypts an envelope (see docs/CRYPTO.md for what its fields
mean); it only checks that it is one well-formed JSON object with the five
required string fields, base64 crypto fields and bounded extra fields, so that
every receiver can parse what it is handed.  The envelope is then stored and
forwarded byte for byte as published.

Pure functions, no sockets, no threads.  :mod:`ciphermq.protocol` calls
:func:`parse_envelope` from its ``publish`` parser.
"""
import collections
import json
import math
import operator
import re

from .errors import ProtocolError

#: Message ids -- and, in :mod:`ciphermq.protocol`, queue and exchange names --
#: are echoed into replies and log lines, so nothing but these characters may pass.
NAME_PATTERN = rb"[A-Za-z0-9._:-]{1,128}"
#: The same rule for the decoded id (str), so checking it needs no encoding.
_MESSAGE_ID = re.compile(NAME_PATTERN.decode("ascii"))

#: The fields every envelope must carry, all strings (see docs/PROTOCOL.md).
ENVELOPE_FIELDS = ("message_id", "enc_session_key", "nonce", "tag", "ciphertext")
_REQUIRED = frozenset(ENVELOPE_FIELDS)
_REQUIRED_VALUES = operator.itemgetter(*ENVELOPE_FIELDS)
_ONLY_STR = {str}
#: Added by the broker to every pushed copy; never accepted from a publisher.
DELIVERY_COUNT = "delivery_count"


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
#: The decoder's scanner called directly: text that starts with "{" and ends
#: with "}" has no whitespace around the value for ``decode`` to skip.
_SCAN_ONCE = _ENVELOPE_DECODER.scan_once
#: Everything base64 text may hold ("=" only as padding, checked separately).
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_BASE64_VALUE = {char: value for value, char in enumerate(_BASE64_ALPHABET[:64].decode())}


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
        json_text = raw.decode("utf-8")
        try:
            envelope, end = _SCAN_ONCE(json_text, 0)
        except StopIteration:
            end = None
        if end != len(json_text):   # not one whole object: decode() raises its error
            envelope = _ENVELOPE_DECODER.decode(json_text)
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
    try:
        values = _REQUIRED_VALUES(envelope)
    except KeyError:
        values = [envelope.get(field) for field in ENVELOPE_FIELDS]     # None where missing
    if set(map(type, values)) != _ONLY_STR:
        _refuse_required_fields(values)
    message_id = values[0]
    if not _MESSAGE_ID.fullmatch(message_id):
        raise ProtocolError("invalid message_id (1-128 of A-Z a-z 0-9 . _ : -)")
    crypto_text = values[1:]
    # One pass over all four fields for the alphabet, then padding only at their ends.
    if "".join(crypto_text).encode("utf-8", "replace").translate(None, _BASE64_ALPHABET):
        _refuse_base64(crypto_text)
    for text in crypto_text:
        padding = text.find("=")    # "=" only as the last one or two characters
        if padding >= 0 and (text[padding:] not in ("=", "==") or not canonical_padding(text)):
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


def canonical_padding(text):
    """True if base64 ``text`` is whole quanta whose padding bits are zero.

    ``QQ==`` and ``QR==`` decode to the same byte; only the first is what
    an encoder writes.  Accepting both would let an envelope's bytes change
    while its decoded value stays the same, so only the canonical form
    passes.  O(1): it looks at the last quantum only.  Assumes the alphabet
    and the place of ``=`` were checked already.  (Text whose length is not
    a multiple of four is left to the receiver, whose strict decoder refuses
    it; tests here use such one-letter stand-ins for the crypto fields.)
    """
    if not text.endswith("="):
        return True
    data = text.rstrip("=")
    if not data:                    # padding with nothing to pad
        return False
    mask = 0x0F if len(text) - len(data) == 2 else 0x03
    return not _BASE64_VALUE[data[-1]] & mask


def _refuse_base64(crypto_text):
    """Name the field that failed the fast check (the slow, obvious way)."""
    for field, text in zip(ENVELOPE_FIELDS[1:], crypto_text):
        if not re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", text) or not canonical_padding(text):
            raise ProtocolError("field '%s' must be base64 text" % field)
    raise ProtocolError("crypto fields must be base64 text")


def _check_extra_fields(envelope, limits):
    if len(envelope) - len(ENVELOPE_FIELDS) > limits.max_extra_fields:
        raise ProtocolError("too many fields (at most %d extra)" % limits.max_extra_fields)
    _check_text("".join(envelope))         # every key at once
    for key, value in envelope.items():
        if key in _REQUIRED or type(value) is int or type(value) is str and value.isascii():
            continue                # nothing to bound in an integer or an ASCII string
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

