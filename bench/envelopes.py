"""The 537-byte envelopes both brokers carry, built before the clock starts.

Every envelope is a JSON object with CipherMQ's five string fields (``message_id``,
``enc_session_key``, ``nonce``, ``tag``, ``ciphertext``) plus ``sent_at``, a fixed-width
``time.monotonic()`` stamp for the latency scenarios.  Field sizes are those of a real v2
envelope (RSA-2048 key, 12-byte nonce, 16-byte tag, base64); the ciphertext is filler that
pads the whole object to exactly ``SIZE`` bytes.  The RabbitMQ side sends the same bytes.

Message ids are ``<run token>-<10-digit sequence>``: the token is fresh for every run,
because CipherMQ remembers ids for an hour and would re-ACK a reused one without
delivering it.

``time.monotonic()`` is ``CLOCK_MONOTONIC`` on Linux, one clock for every process on the
machine, so a stamp taken in a publisher process can be compared with a reading taken in a
consumer process.
"""
import os

SIZE = 537
ID_DIGITS = 10

_TEMPLATE = ('{"message_id":"%s","enc_session_key":"%s","nonce":"%s","tag":"%s",'
             '"ciphertext":"%s","sent_at":"%s"}')
_STAMP = "%020.9f"                  # 20 characters for any uptime below 300 years
_SENT_AT = b'"sent_at":"'
_FILLER = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo"   # base64-looking text


def _filler(length):
    """A base64-looking string of exactly ``length`` characters."""
    return (_FILLER * (length // len(_FILLER) + 1))[:length]


def new_run_token():
    """Eight hex digits, fresh for each run: the prefix that keeps message ids unique."""
    return os.urandom(4).hex()


def message_id(token, seq):
    return f"{token}-{seq:0{ID_DIGITS}d}"


_ID_LENGTH = len(message_id(new_run_token(), 0))
_STAMP_LENGTH = len(_STAMP % 0.0)
_KEY, _NONCE, _TAG = _filler(344), _filler(16), _filler(24)
_CIPHERTEXT = _filler(SIZE - len(_TEMPLATE % ("x" * _ID_LENGTH, _KEY, _NONCE, _TAG, "",
                                              "x" * _STAMP_LENGTH)))


def envelope(token, seq, sent_at=0.0):
    """The envelope of message ``seq`` of run ``token``, as exactly SIZE bytes of JSON."""
    body = (_TEMPLATE % (message_id(token, seq), _KEY, _NONCE, _TAG, _CIPHERTEXT,
                         _STAMP % sent_at)).encode("ascii")
    assert len(body) == SIZE, len(body)
    return body


def envelopes(token, first_seq, count):
    """``count`` envelopes numbered from ``first_seq`` (stamp 0: for throughput runs)."""
    return [envelope(token, seq) for seq in range(first_seq, first_seq + count)]


def sent_at(data):
    """The ``sent_at`` stamp in ``data``: an envelope, or a line holding one."""
    at = data.index(_SENT_AT) + len(_SENT_AT)
    return float(data[at:at + _STAMP_LENGTH])
