"""Hybrid envelopes: RSA-OAEP wraps a fresh AES key, AES-GCM seals the message.

A sender holds the receiver's RSA public key and turns each message into an
*envelope* -- a small JSON object of base64 strings -- with a :class:`Sealer`.
The receiver holds the private key and turns envelopes back into messages
with an :class:`Opener`.  The broker only routes envelopes: it never imports
this module and never holds a key or a plaintext.

Two formats exist; docs/CRYPTO.md describes them field by field.

* **v1** is what the original ``Sender.py`` produced: RSA-OAEP with SHA-1, a
  16-byte GCM nonce, no ``v`` field and nothing bound to the tag but the
  ciphertext.  It still opens, unless the Opener is ``strict``.
* **v2**, the default, uses RSA-OAEP with SHA-256, a 12-byte nonce and a send
  timestamp ``ts``, and binds ``v``, ``message_id``, ``ts`` and ``sender`` to
  the GCM tag as associated data.  It may carry an Ed25519 signature.

Every way an envelope can fail to open raises :class:`DecryptionError` with
one and the same message, so that a receiver cannot be used as an oracle.
The specific cause travels in the exception's ``reason`` attribute, which is
meant for the receiver's private rejects file and nowhere else.

Key files are :mod:`ciphermq.keys`' business: a Sealer or Opener given a
path asks it for the key.  Options that do not fit together raise
:class:`~ciphermq.errors.UsageError` (a ValueError).
"""
import base64
import json
import os
import threading
import time
import uuid
from collections import OrderedDict

from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA1, SHA256
from Crypto.Random import get_random_bytes
from Crypto.Signature import eddsa

from . import keys
from .errors import DecryptionError, UsageError

#: The one message every refused envelope raises, whatever the cause.
REJECTED = "envelope rejected"

SESSION_KEY_BYTES = 16                  # AES-128, as in the original design
TAG_BYTES = 16
NONCE_BYTES = {1: 16, 2: 12}            # v1: pycryptodome's GCM default; v2: GCM's native 96 bits
SIGNATURE_BYTES = 64                    # Ed25519
MAX_CIPHERTEXT_BYTES = 16 * 1024 * 1024
#: Up to this many messages under one key, random 96-bit nonces all differ
#: with probability at least 1 - 2**-57 (docs/CRYPTO.md, "Session-key reuse").
MAX_KEY_REUSE = 2 ** 20
_MAX_TS = 2 ** 63                       # milliseconds; keeps ``ts`` a sane JSON integer

_OAEP_HASH = {1: SHA1, 2: SHA256}       # MGF1 uses the same hash
#: Domain-separation prefixes: associated data and signed bytes can never be
#: mistaken for each other, nor for another protocol's.
AD_CONTEXT = b"ciphermq-v2\x00"
SIGNATURE_CONTEXT = b"ciphermq-sig-v2\x00"
#: The fields a signature covers, in this order (``sig`` itself, the broker's
#: ``delivery_count`` and any other field are outside it).
SIGNED_FIELDS = ("v", "message_id", "ts", "sender", "enc_session_key", "nonce", "tag",
                 "ciphertext")


# -- canonical bytes -------------------------------------------------------

def _canonical(values):
    """Compact JSON of a list: one spelling per value, so equal bytes mean equal values."""
    return json.dumps(values, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def associated_data(message_id, ts, sender=None):
    """The v2 associated data: what the GCM tag binds besides the ciphertext."""
    return AD_CONTEXT + _canonical([2, message_id, ts, sender])


def signed_bytes(envelope):
    """The bytes an Ed25519 signature covers: the fixed v2 fields, canonically."""
    return SIGNATURE_CONTEXT + _canonical([envelope[field] for field in SIGNED_FIELDS])


def _b64(raw):
    return base64.b64encode(raw).decode("ascii")


# -- sealing ---------------------------------------------------------------

class Sealer:
    """Seals messages for one receiver: the sender's half of the envelope.

    ``public_key`` is the receiver's RSA key (an ``RsaKey`` or a PEM path).
    ``version`` 1 writes the original format, for compatibility tests only.
    ``key_reuse=N`` keeps one session key for up to N messages, each with a
    fresh random nonce.  ``signing_key`` (an Ed25519 key or PEM path) signs
    every envelope as ``sender``; a ``sender`` without a key only names it.

    The RSA-OAEP cipher is built once here, not once per message.  Thread
    safe: ``_lock`` guards the current session key and its remaining uses,
    and is held only to pick or replace that key.
    """

    def __init__(self, public_key, *, version=2, key_reuse=1, signing_key=None, sender=None,
                 clock=time.time):
        if version not in (1, 2):
            raise UsageError("unsupported envelope version %r" % (version,))
        if not 1 <= key_reuse <= MAX_KEY_REUSE:
            raise UsageError("key_reuse must be from 1 to %d" % MAX_KEY_REUSE)
        if sender is not None:
            keys.check_sender_name(sender)
        if signing_key is not None and sender is None:
            raise UsageError("a signing key needs a sender name")
        if version == 1 and sender is not None:
            raise UsageError("v1 envelopes carry no sender and no signature")
        self.version = version
        self.key_reuse = key_reuse
        self.sender = sender
        self._clock = clock
        self._rsa = PKCS1_OAEP.new(keys.rsa_public_key(public_key),
                                   hashAlgo=_OAEP_HASH[version])
        self._signer = None
        if signing_key is not None:
            self._signer = eddsa.new(keys.ed25519_key(signing_key, private=True), "rfc8032")
        self._lock = threading.Lock()
        self._session = None        # (session_key, enc_session_key as base64 text)
        self._uses_left = 0

    def seal(self, message, message_id=None):
        """Return a new envelope (a dict ready for ``json.dumps``) holding ``message``.

        ``message_id`` defaults to a fresh uuid4.  Does not block (``_lock``
        is only ever held briefly).  Raises
        TypeError unless ``message`` is a str, ValueError if its UTF-8 form
        is over ``MAX_CIPHERTEXT_BYTES`` (no receiver would open it).
        """
        if not isinstance(message, str):
            raise TypeError("message must be a str, not %s" % type(message).__name__)
        plaintext = message.encode("utf-8")
        if len(plaintext) > MAX_CIPHERTEXT_BYTES:
            raise ValueError("message is over %d bytes" % MAX_CIPHERTEXT_BYTES)
        if message_id is None:
            message_id = str(uuid.uuid4())
        session_key, enc_session_key = self._next_session_key()
        nonce = get_random_bytes(NONCE_BYTES[self.version])
        cipher = AES.new(session_key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)
        if self.version == 1:
            envelope = {"message_id": message_id}
        else:
            envelope = {"v": 2, "message_id": message_id, "ts": int(self._clock() * 1000)}
            if self.sender is not None:
                envelope["sender"] = self.sender
            cipher.update(associated_data(message_id, envelope["ts"], self.sender))
        ciphertext, tag = cipher.encrypt_and_digest(plaintext)
        envelope.update(enc_session_key=enc_session_key, nonce=_b64(nonce), tag=_b64(tag),
                        ciphertext=_b64(ciphertext))
        if self._signer is not None:
            envelope["sig"] = _b64(self._signer.sign(signed_bytes(envelope)))
        return envelope

    def _next_session_key(self):
        with self._lock:
            if self._uses_left == 0:
                session_key = get_random_bytes(SESSION_KEY_BYTES)
                self._session = (session_key, _b64(self._rsa.encrypt(session_key)))
                self._uses_left = self.key_reuse
            self._uses_left -= 1
            return self._session


# -- opening ---------------------------------------------------------------

class _Refused(Exception):
    """Internal: why an envelope is refused.  :meth:`Opener.open` turns it into
    a :class:`DecryptionError` that carries the reason but not in its message."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class Opener:
    """Opens envelopes sealed for one RSA private key: the receiver's half.

    ``private_key`` is an ``RsaKey`` or a PEM path.  ``strict`` refuses v1.
    ``trusted_senders`` (``{name: Ed25519 public key}`` or a directory of
    ``<name>.pub`` files) makes the Opener verify signatures; with
    ``require_signature`` it refuses every envelope not signed by one of
    them.  ``max_age_seconds`` refuses v2 envelopes sent longer ago than that
    (or more than ``clock_skew_seconds`` in the future) and every v1 envelope,
    which has no timestamp to check.

    :meth:`open` checks from the cheapest test to the dearest -- shape,
    base64 and lengths, id, age, signature, then RSA, then the GCM tag -- so
    malformed, stale and forged envelopes never cost an RSA operation.
    Session keys that opened a message are kept in an LRU cache of
    ``session_cache_size`` entries (0 disables it), keyed by the exact
    ``enc_session_key`` text, so a sender's key reuse saves RSA work.

    Thread safe: ``_cache_lock`` guards ``_cache`` and ``rsa_operations``;
    it is never held during RSA or AES work.
    """

    #: How far ahead of our clock a v2 ``ts`` may be (checked with ``max_age_seconds``).
    clock_skew_seconds = 60

    def __init__(self, private_key, *, strict=False, trusted_senders=None, require_signature=False,
                 max_age_seconds=None, session_cache_size=1024, clock=time.time):
        key = keys.rsa_private_key(private_key)
        self._rsa = {version: PKCS1_OAEP.new(key, hashAlgo=hash_module)
                     for version, hash_module in _OAEP_HASH.items()}
        self._enc_key_bytes = key.size_in_bytes()
        if isinstance(trusted_senders, (str, os.PathLike)):
            trusted_senders = keys.load_trusted_senders(trusted_senders)
        self._verifiers = None      # None: no trust list, signatures cannot be checked
        if trusted_senders is not None:
            self._verifiers = {}
            for name, public_key in trusted_senders.items():
                keys.check_sender_name(name)
                public_key = keys.ed25519_key(public_key, private=False)
                self._verifiers[name] = eddsa.new(public_key, "rfc8032")
        if require_signature and not self._verifiers:
            raise UsageError("require_signature needs at least one trusted sender")
        self.strict = strict
        self.require_signature = require_signature
        self.max_age_seconds = max_age_seconds
        self.session_cache_size = session_cache_size
        self._clock = clock
        self._cache_lock = threading.Lock()
        self._cache = OrderedDict()     # (version, enc_session_key text) -> session key
        #: RSA decryptions attempted so far (cache hits and early refusals cost none).
        self.rsa_operations = 0

    def open(self, envelope, expected_id=None):
        """Return the message inside ``envelope`` (a dict parsed from the broker's JSON).

        ``expected_id`` is the id from the broker's ``Message: <id> ...``
        line; if given, the envelope must carry the same ``message_id``.
        Fields the broker adds (``delivery_count``) or forwards are ignored.
        Does not block.  Every failure raises :class:`DecryptionError` with the
        message ``"envelope rejected"``; its ``reason`` attribute names the
        cause and belongs in the receiver's private rejects file only.
        """
        try:
            return self._open(envelope, expected_id)
        except _Refused as refused:
            error = DecryptionError(REJECTED)
            error.reason = refused.reason
            raise error from None

    def _open(self, envelope, expected_id):
        if not isinstance(envelope, dict):
            raise _Refused("envelope is not a JSON object")
        version = envelope.get("v", 1)
        if type(version) is not int or version not in (1, 2):
            raise _Refused("unsupported version")
        if version == 1 and self.strict:
            raise _Refused("v1 envelope refused in strict mode")
        message_id = _text(envelope, "message_id")
        if not message_id:
            raise _Refused("empty message_id")
        if expected_id is not None and message_id != expected_id:
            raise _Refused("message_id does not match the delivery's id")
        enc_session_key = _text(envelope, "enc_session_key")
        enc_key_raw = _decoded(enc_session_key, "enc_session_key", size=self._enc_key_bytes)
        nonce = _decoded(_text(envelope, "nonce"), "nonce", size=NONCE_BYTES[version])
        tag = _decoded(_text(envelope, "tag"), "tag", size=TAG_BYTES)
        ciphertext = _decoded(_text(envelope, "ciphertext"), "ciphertext",
                              limit=MAX_CIPHERTEXT_BYTES)
        if version == 1:
            self._check_v1_allowed()
            ad = None
        else:
            ad = self._checked_v2_associated_data(envelope, message_id)

        # Only now, with everything public checked, does the private key do any work.
        cache_key = (version, enc_session_key)
        session_key, reason = self._session_key(cache_key, version, enc_key_raw)
        cipher = AES.new(session_key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)
        if ad is not None:
            cipher.update(ad)
        try:
            plaintext = cipher.decrypt_and_verify(ciphertext, tag)
        except ValueError:
            raise _Refused(reason or "authentication tag does not match") from None
        try:
            message = plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused("plaintext is not UTF-8") from None
        self._remember(cache_key, session_key)
        return message

    def _check_v1_allowed(self):
        if self.max_age_seconds is not None:
            raise _Refused("v1 envelope has no timestamp for the replay window")
        if self.require_signature:
            raise _Refused("v1 envelope cannot be signed")

    def _checked_v2_associated_data(self, envelope, message_id):
        """Check ``ts`` and the signature; return the associated data to verify."""
        ts = envelope.get("ts")
        if type(ts) is not int or not 0 <= ts < _MAX_TS:
            raise _Refused("'ts' is not a millisecond timestamp")
        self._check_age(ts)
        sender = self._checked_sender(envelope)
        return associated_data(message_id, ts, sender)

    def _check_age(self, ts):
        if self.max_age_seconds is None:
            return
        now_ms = self._clock() * 1000
        if ts < now_ms - self.max_age_seconds * 1000:
            raise _Refused("older than max_age_seconds")
        if ts > now_ms + self.clock_skew_seconds * 1000:
            raise _Refused("timestamp too far in the future")

    def _checked_sender(self, envelope):
        """Return the (possibly verified) sender name; verify the signature if we can.

        With no trust list, a signature cannot be checked and is ignored.
        With one, a present signature must verify against the named sender,
        and an envelope without one may not claim a trusted sender's name.
        """
        sender = envelope.get("sender")
        if sender is not None and (not isinstance(sender, str)
                                   or not keys.SENDER_NAME.fullmatch(sender)):
            raise _Refused("invalid sender name")
        if self._verifiers is None:
            return sender
        if "sig" not in envelope:
            if self.require_signature:
                raise _Refused("unsigned envelope")
            if sender in self._verifiers:
                raise _Refused("unsigned envelope claims a trusted sender")
            return sender
        verifier = self._verifiers.get(sender)
        if verifier is None:
            raise _Refused("signed by an unknown sender")
        signature = _decoded(_text(envelope, "sig"), "sig", size=SIGNATURE_BYTES)
        try:
            verifier.verify(signed_bytes(envelope), signature)
        except ValueError:
            raise _Refused("bad signature") from None
        return sender

    def _session_key(self, cache_key, version, enc_key_raw):
        """Return ``(session_key, reason)``: from the cache, or by one RSA decryption.

        If RSA-OAEP fails, a random key stands in and ``reason`` says why:
        the GCM check then fails as it would for a tampered tag, so a wrong
        key and a forged tag take the same path ("implicit rejection").
        """
        with self._cache_lock:
            session_key = self._cache.get(cache_key)
            if session_key is not None:
                return session_key, None
            self.rsa_operations += 1
        try:
            session_key = self._rsa[version].decrypt(enc_key_raw)
        except ValueError:
            return get_random_bytes(SESSION_KEY_BYTES), "session key does not decrypt"
        if len(session_key) != SESSION_KEY_BYTES:
            return get_random_bytes(SESSION_KEY_BYTES), "session key has the wrong length"
        return session_key, None

    def _remember(self, cache_key, session_key):
        """Cache, or mark as most recently used, a key that has just opened a message.

        Only successful opens insert or refresh entries, so forged envelopes
        can neither fill the cache nor keep an entry alive.
        """
        if self.session_cache_size <= 0:
            return
        with self._cache_lock:
            self._cache[cache_key] = session_key
            self._cache.move_to_end(cache_key)
            while len(self._cache) > self.session_cache_size:
                self._cache.popitem(last=False)


def _text(envelope, field):
    value = envelope.get(field)
    if not isinstance(value, str):
        raise _Refused("'%s' is missing or not a string" % field)
    return value


def _decoded(text, field, *, size=None, limit=None):
    """Strictly decode base64 ``text``: exactly ``size`` bytes, or at most ``limit``."""
    most = size if size is not None else limit
    if len(text) > 4 * ((most + 2) // 3):       # refuse before decoding anything big
        raise _Refused("'%s' is too long" % field)
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:                          # binascii.Error, or non-ASCII text
        raise _Refused("'%s' is not valid base64" % field) from None
    if text.endswith("=") and text[-4:] != _last_quantum(raw):
        raise _Refused("'%s' has non-zero base64 padding bits" % field)
    if size is not None and len(raw) != size:
        raise _Refused("'%s' has %d bytes, expected %d" % (field, len(raw), size))
    if limit is not None and len(raw) > limit:
        raise _Refused("'%s' is over %d bytes" % (field, limit))
    return raw


def _last_quantum(raw):
    """The canonical encoding of ``raw``'s last 1-3 bytes: what an encoder ends with.

    ``QQ==`` and ``QR==`` decode alike; refusing all but the canonical text
    means an envelope's bytes cannot change while its decoded value stays the same.
    """
    tail = len(raw) % 3 or 3
    return base64.b64encode(raw[-tail:]).decode("ascii")


# -- the design document's names -------------------------------------------

def encrypt_message_hybrid(message, public_key, message_id=None):
    """Seal one message for ``public_key`` (key or PEM path) as a v2 envelope.

    Builds a :class:`Sealer` per call; a sender of many messages should keep one.
    """
    return Sealer(public_key).seal(message, message_id)


def decrypt_message_hybrid(envelope, private_key):
    """Open one v1 or v2 envelope with ``private_key``; raises :class:`DecryptionError`.

    Builds an :class:`Opener` per call; a receiver of many messages should keep one.
    """
    return Opener(private_key).open(envelope)
