"""The hybrid envelope: what opens, what is refused, and what refusals cost."""
import base64
import json
import os
import stat
import uuid

import pytest
from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.PublicKey import ECC, RSA
from Crypto.Random import get_random_bytes
from Crypto.Signature import eddsa

from ciphermq import crypto
from ciphermq import keys as keyfiles
from ciphermq.crypto import REJECTED, Opener, Sealer
from ciphermq.errors import DecryptionError, KeyFileError

# 1024-bit keys keep the suite fast; OAEP-SHA256 still fits a 16-byte key in them.
BITS = 1024
NOW = 1_700_000_000.0           # a fixed clock, in seconds


@pytest.fixture(scope="module")
def rsa_key():
    return RSA.generate(BITS)


@pytest.fixture(scope="module")
def other_rsa_key():
    return RSA.generate(BITS)


@pytest.fixture(scope="module")
def signers():
    """Ed25519 keys: alice and bob are trusted by the receiver, mallory is not."""
    return {name: ECC.generate(curve="Ed25519") for name in ("alice", "bob", "mallory")}


@pytest.fixture(scope="module")
def trusted(signers):
    return {name: signers[name].public_key() for name in ("alice", "bob")}


def clock():
    return NOW


def sealer(rsa_key, **options):
    options.setdefault("clock", clock)
    return Sealer(rsa_key.public_key(), **options)


def opener(rsa_key, **options):
    options.setdefault("clock", clock)
    return Opener(rsa_key, **options)


def rejection(opener, envelope, expected_id=None):
    """Open ``envelope``, expecting refusal; return the DecryptionError."""
    with pytest.raises(DecryptionError) as caught:
        opener.open(envelope, expected_id)
    assert caught.value.args == (REJECTED,)
    return caught.value


def flipped(envelope, field, index=0):
    """A copy of ``envelope`` with one bit flipped in the decoded bytes of ``field``."""
    raw = bytearray(base64.b64decode(envelope[field]))
    raw[index % len(raw)] ^= 0x01
    return dict(envelope, **{field: base64.b64encode(bytes(raw)).decode("ascii")})


def resigned(envelope, name, key):
    """A copy of ``envelope`` claiming ``name`` and signed with ``key``."""
    changed = dict(envelope, sender=name)
    changed["sig"] = base64.b64encode(
        eddsa.new(key, "rfc8032").sign(crypto.signed_bytes(changed))).decode("ascii")
    return changed


def seed_document_envelope(message, public_key):
    """Build a v1 envelope exactly as the original Sender.py did (§3.2, §3.4)."""
    cipher_rsa = PKCS1_OAEP.new(public_key)
    session_key = get_random_bytes(16)
    enc_session_key = cipher_rsa.encrypt(session_key)
    cipher_aes = AES.new(session_key, AES.MODE_GCM)
    ciphertext, tag = cipher_aes.encrypt_and_digest(message.encode("utf-8"))
    return {
        "message_id": str(uuid.uuid4()),
        "enc_session_key": base64.b64encode(enc_session_key).decode("utf-8"),
        "nonce": base64.b64encode(cipher_aes.nonce).decode("utf-8"),
        "tag": base64.b64encode(tag).decode("utf-8"),
        "ciphertext": base64.b64encode(ciphertext).decode("utf-8"),
    }


# -- round trips -----------------------------------------------------------

def test_v2_round_trip(rsa_key):
    """A v2 envelope carries v, ts, a 12-byte nonce, and opens to the same text."""
    envelope = sealer(rsa_key).seal("héllo, wörld ✓", "m-1")
    assert set(envelope) == {"v", "message_id", "ts", "enc_session_key", "nonce", "tag",
                             "ciphertext"}
    assert envelope["v"] == 2 and envelope["message_id"] == "m-1"
    assert envelope["ts"] == int(NOW * 1000)
    assert len(base64.b64decode(envelope["nonce"])) == 12
    json.dumps(envelope)                        # publishable as it is
    assert opener(rsa_key).open(envelope, "m-1") == "héllo, wörld ✓"


def test_seal_defaults_to_a_fresh_uuid4_id(rsa_key):
    """Without an id, every envelope gets a distinct uuid4 message_id."""
    seal = sealer(rsa_key)
    ids = {seal.seal("x")["message_id"] for _ in range(3)}
    assert len(ids) == 3
    assert all(uuid.UUID(one).version == 4 for one in ids)


def test_empty_message_round_trips(rsa_key):
    """The empty string is a message like any other."""
    assert opener(rsa_key).open(sealer(rsa_key).seal("")) == ""


def test_v1_sealer_round_trip(rsa_key):
    """Sealer(version=1) writes the original format, which a default Opener opens."""
    envelope = sealer(rsa_key, version=1).seal("old style")
    assert set(envelope) == {"message_id", "enc_session_key", "nonce", "tag", "ciphertext"}
    assert len(base64.b64decode(envelope["nonce"])) == 16
    assert opener(rsa_key).open(envelope) == "old style"


def test_seed_document_v1_envelope_opens(rsa_key):
    """An envelope built with the seed document's own pycryptodome calls still opens."""
    envelope = seed_document_envelope("This is a test hybrid message.", rsa_key.public_key())
    assert opener(rsa_key).open(envelope) == "This is a test hybrid message."


def test_strict_mode_refuses_v1_before_rsa(rsa_key):
    """A strict Opener refuses the original format, without touching the private key."""
    strict = opener(rsa_key, strict=True)
    error = rejection(strict, seed_document_envelope("old", rsa_key.public_key()))
    assert "strict" in error.reason
    assert strict.rsa_operations == 0


def test_document_named_functions_take_key_paths(rsa_key, tmp_path):
    """encrypt/decrypt_message_hybrid accept PEM paths and default to v2."""
    private_path, public_path = keyfiles.write_rsa_key_pair(tmp_path, bits=BITS)
    envelope = crypto.encrypt_message_hybrid("via paths", public_path, "id-7")
    assert envelope["v"] == 2 and envelope["message_id"] == "id-7"
    assert crypto.decrypt_message_hybrid(envelope, private_path) == "via paths"
    v1 = seed_document_envelope("legacy", keyfiles.load_public_key(public_path))
    assert crypto.decrypt_message_hybrid(v1, str(private_path)) == "legacy"


def test_broker_added_fields_are_ignored(rsa_key, signers, trusted):
    """delivery_count and unknown extra fields neither break the tag nor the signature."""
    envelope = sealer(rsa_key, sender="alice", signing_key=signers["alice"]).seal("hi")
    delivered = dict(envelope, delivery_count=3, routed_by="broker-1")
    assert opener(rsa_key, trusted_senders=trusted, require_signature=True).open(delivered) == "hi"


# -- tampering -------------------------------------------------------------

@pytest.mark.parametrize("field", ["enc_session_key", "nonce", "tag", "ciphertext"])
@pytest.mark.parametrize("version", [1, 2])
def test_flipped_bit_in_any_field_is_rejected(rsa_key, field, version):
    """One flipped bit in any encrypted field makes the envelope unopenable."""
    envelope = sealer(rsa_key, version=version).seal("secret")
    rejection(opener(rsa_key), flipped(envelope, field))


@pytest.mark.parametrize("field, value", [
    ("message_id", "another-id"),
    ("ts", int(NOW * 1000) + 1),
    ("sender", "bob"),
])
def test_changed_bound_field_breaks_the_tag(rsa_key, field, value):
    """The tag binds message_id, ts and sender: changing any of them is refused."""
    envelope = sealer(rsa_key, sender="alice").seal("secret")
    plain_opener = opener(rsa_key)              # no trust list: only the AEAD protects
    rejection(plain_opener, dict(envelope, **{field: value}))
    assert plain_opener.open(envelope) == "secret"


def test_adding_a_sender_breaks_the_tag(rsa_key):
    """An anonymous envelope cannot be re-labelled with a sender name."""
    envelope = sealer(rsa_key).seal("secret")
    rejection(opener(rsa_key), dict(envelope, sender="alice"))


def _malformed(envelope):
    """(label, envelope) pairs that are wrong in shape, base64 or length."""
    cases = [("not a dict", [envelope]), ("none", None)]
    for field in ("message_id", "enc_session_key", "nonce", "tag", "ciphertext", "ts"):
        cases.append(("drop " + field, {k: v for k, v in envelope.items() if k != field}))
        cases.append(("int " + field, dict(envelope, **{field: 7 if field != "ts" else "7"})))
    for field in ("enc_session_key", "nonce", "tag", "ciphertext"):
        text = envelope[field]
        cases += [
            ("bad char " + field, dict(envelope, **{field: "!" + text[1:]})),
            ("newline " + field, dict(envelope, **{field: text[:4] + "\n" + text[4:]})),
            ("non-ascii " + field, dict(envelope, **{field: "é" + text[1:]})),
            ("no padding " + field, dict(envelope, **{field: text.rstrip("=")[:-1]})),
        ]
    for field in ("enc_session_key", "nonce", "tag"):
        raw = base64.b64decode(envelope[field])
        for wrong in (raw[:-1], raw + b"\x00", raw[:-3]):
            cases.append(("length %d %s" % (len(wrong), field),
                          dict(envelope, **{field: base64.b64encode(wrong).decode()})))
    huge = "A" * (4 * (crypto.MAX_CIPHERTEXT_BYTES // 3 + 2))
    cases += [
        ("huge ciphertext", dict(envelope, ciphertext=huge)),
        ("v 3", dict(envelope, v=3)),
        ("v '2'", dict(envelope, v="2")),
        ("v true", dict(envelope, v=True)),
        ("ts bool", dict(envelope, ts=True)),
        ("ts negative", dict(envelope, ts=-1)),
        ("ts enormous", dict(envelope, ts=10 ** 5000)),
        ("empty id", dict(envelope, message_id="")),
        ("sender int", dict(envelope, sender=5)),
        ("sender bad name", dict(envelope, sender="../alice")),
    ]
    return cases


def test_malformed_envelopes_are_refused_before_rsa(rsa_key):
    """Missing fields, wrong types, bad base64 and wrong lengths never reach the private key."""
    envelope = sealer(rsa_key).seal("secret")
    cases = _malformed(envelope)
    assert len(cases) > 40
    for label, bad in cases:
        fresh = opener(rsa_key)
        error = rejection(fresh, bad)
        assert fresh.rsa_operations == 0, label
        assert error.reason, label


def test_non_canonical_base64_padding_is_refused_before_rsa(rsa_key):
    """A tag re-encoded with non-zero padding bits (same decoded bytes) is refused
    before any RSA work; the canonical envelope opens."""
    envelope = sealer(rsa_key).seal("secret")
    tag = envelope["tag"]
    assert tag.endswith("==")               # 16 bytes: one byte in the last quantum
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = alphabet.index(tag[-3])
    assert not value & 0x0F, "the sealer wrote canonical base64"
    variant = tag[:-3] + alphabet[value | 0x01] + "=="
    assert base64.b64decode(variant) == base64.b64decode(tag)
    fresh = opener(rsa_key)
    error = rejection(fresh, dict(envelope, tag=variant))
    assert fresh.rsa_operations == 0
    assert "padding bits" in error.reason
    assert opener(rsa_key).open(envelope) == "secret"


def test_every_refusal_says_the_same_thing(rsa_key, other_rsa_key, signers, trusted):
    """Refusals differ only in their private reason: same class, same message, same repr."""
    envelope = sealer(rsa_key, sender="alice", signing_key=signers["alice"]).seal("s", "id-1")
    receiver = opener(rsa_key, trusted_senders=trusted, max_age_seconds=60)
    errors = [
        rejection(receiver, dict(envelope, nonce="!!!!")),                      # base64
        rejection(receiver, flipped(envelope, "sig")),                          # signature
        rejection(receiver, resigned(envelope, "mallory", signers["mallory"])),  # stranger
        rejection(receiver, envelope, expected_id="id-2"),                      # wrong id
        rejection(opener(rsa_key, trusted_senders=trusted, max_age_seconds=60,
                         clock=lambda: NOW + 3600), envelope),                  # too old
        rejection(opener(other_rsa_key), envelope),                             # wrong key
        rejection(opener(rsa_key), flipped(envelope, "tag")),                   # tampered tag
    ]
    assert {(type(e), e.args, str(e), repr(e)) for e in errors} == {
        (DecryptionError, (REJECTED,), REJECTED, repr(DecryptionError(REJECTED)))}
    assert len({e.reason for e in errors}) == len(errors)
    assert all(e.__suppress_context__ and e.__cause__ is None for e in errors)


def test_wrong_private_key_is_rejected(rsa_key, other_rsa_key):
    """An envelope sealed for one key does not open with another (v1 or v2)."""
    for version in (1, 2):
        envelope = sealer(rsa_key, version=version).seal("secret")
        wrong = opener(other_rsa_key)
        rejection(wrong, envelope)
        assert wrong.rsa_operations == 1


def test_wrong_key_and_forged_tag_take_the_same_path(rsa_key, other_rsa_key, monkeypatch):
    """A failed RSA decryption still runs the GCM check (implicit rejection), reason kept."""
    envelope = sealer(rsa_key).seal("secret")
    gcm_checks = []
    real_new = AES.new

    def spy(key, mode, *args, **kwargs):
        if mode == AES.MODE_GCM:
            gcm_checks.append(key)
        return real_new(key, mode, *args, **kwargs)

    monkeypatch.setattr(AES, "new", spy)
    assert "session key" in rejection(opener(other_rsa_key), envelope).reason
    assert "tag" in rejection(opener(rsa_key), flipped(envelope, "tag")).reason
    assert len(gcm_checks) == 2


def test_expected_id_must_match(rsa_key):
    """The id in the broker's Message line must equal the envelope's, checked before RSA."""
    envelope = sealer(rsa_key).seal("secret", "id-1")
    receiver = opener(rsa_key)
    rejection(receiver, envelope, expected_id="id-2")
    assert receiver.rsa_operations == 0
    assert receiver.open(envelope, expected_id="id-1") == "secret"


def test_v2_envelope_stripped_to_v1_is_refused_before_rsa(rsa_key):
    """Deleting "v" cannot downgrade a v2 envelope: its 12-byte nonce fails the v1 length."""
    envelope = sealer(rsa_key).seal("secret")
    receiver = opener(rsa_key)
    rejection(receiver, {k: v for k, v in envelope.items() if k not in ("v", "ts")})
    assert receiver.rsa_operations == 0


# -- signatures ------------------------------------------------------------

def test_signed_envelope_from_trusted_sender_opens(rsa_key, signers, trusted):
    """A signature by a trusted sender verifies and the envelope opens."""
    envelope = sealer(rsa_key, sender="alice", signing_key=signers["alice"]).seal("hi")
    assert envelope["sender"] == "alice"
    assert len(base64.b64decode(envelope["sig"])) == 64
    receiver = opener(rsa_key, trusted_senders=trusted, require_signature=True)
    assert receiver.open(envelope) == "hi"


@pytest.mark.parametrize("claimed", ["alice", "mallory"])
def test_stranger_resigning_is_rejected_before_rsa(rsa_key, signers, trusted, claimed):
    """A stranger who re-signs an envelope, under any name, is refused without RSA work."""
    envelope = sealer(rsa_key, sender="alice", signing_key=signers["alice"]).seal("hi")
    receiver = opener(rsa_key, trusted_senders=trusted)
    rejection(receiver, resigned(envelope, claimed, signers["mallory"]))
    assert receiver.rsa_operations == 0


def test_trusted_insider_cannot_claim_anothers_envelope(rsa_key, signers, trusted):
    """Bob may sign, but re-signing Alice's envelope as his own breaks the tag (sender is AD)."""
    envelope = sealer(rsa_key, sender="alice", signing_key=signers["alice"]).seal("hi")
    rejection(opener(rsa_key, trusted_senders=trusted), resigned(envelope, "bob", signers["bob"]))


def test_require_signature_refuses_unsigned_before_rsa(rsa_key, trusted):
    """With require_signature, unsigned v2 and v1 envelopes are refused without RSA work."""
    receiver = opener(rsa_key, trusted_senders=trusted, require_signature=True)
    rejection(receiver, sealer(rsa_key).seal("hi"))
    rejection(receiver, sealer(rsa_key, version=1).seal("hi"))
    assert receiver.rsa_operations == 0


def test_unsigned_envelope_may_not_claim_a_trusted_name(rsa_key, trusted):
    """Without require_signature, unsigned mail opens, but not under a trusted sender's name."""
    receiver = opener(rsa_key, trusted_senders=trusted)
    assert receiver.open(sealer(rsa_key, sender="carol").seal("hi")) == "hi"
    rejection(receiver, sealer(rsa_key, sender="alice").seal("hi"))
    assert receiver.rsa_operations == 1


def test_opener_without_trust_list_ignores_signatures(rsa_key, signers):
    """An Opener with no trusted senders cannot check a signature and does not try."""
    envelope = sealer(rsa_key, sender="mallory", signing_key=signers["mallory"]).seal("hi")
    assert opener(rsa_key).open(envelope) == "hi"


def test_require_signature_needs_trusted_senders(rsa_key):
    """require_signature without anyone to trust is a configuration error, not a silent no-op."""
    with pytest.raises(ValueError):
        opener(rsa_key, require_signature=True)
    with pytest.raises(ValueError):
        opener(rsa_key, trusted_senders={}, require_signature=True)


def test_trusted_senders_load_from_pub_files(rsa_key, tmp_path):
    """Signing pairs are NAME.key (0600) + NAME.pub; a directory of .pub files is a trust list."""
    key_path, pub_path = keyfiles.write_signing_key_pair(tmp_path, "alice")
    assert (key_path.name, pub_path.name) == ("alice.key", "alice.pub")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert set(keyfiles.load_trusted_senders(tmp_path)) == {"alice"}
    envelope = sealer(rsa_key, sender="alice", signing_key=key_path).seal("hi")
    receiver = opener(rsa_key, trusted_senders=tmp_path, require_signature=True)
    assert receiver.open(envelope) == "hi"
    with pytest.raises(FileExistsError):
        keyfiles.write_signing_key_pair(tmp_path, "alice")
    with pytest.raises(ValueError):
        keyfiles.write_signing_key_pair(tmp_path, "../evil")


def test_sealer_refuses_inconsistent_options(rsa_key, signers):
    """Options that cannot produce a valid envelope fail at construction."""
    public = rsa_key.public_key()
    for options in ({"version": 3}, {"key_reuse": 0}, {"key_reuse": crypto.MAX_KEY_REUSE + 1},
                    {"sender": "bad name"}, {"signing_key": signers["alice"]},
                    {"version": 1, "sender": "alice"}):
        with pytest.raises(ValueError):
            Sealer(public, **options)
    with pytest.raises(TypeError):
        Sealer(public).seal(b"bytes are not a message")


# -- replay window ---------------------------------------------------------

def test_replay_window_with_injected_clock(rsa_key):
    """max_age_seconds refuses old and far-future envelopes, to the millisecond, before RSA."""
    sent_at = {"now": NOW}
    envelope = Sealer(rsa_key.public_key(), clock=lambda: sent_at["now"]).seal("hi")

    def receiver_at(seconds_after):
        return opener(rsa_key, max_age_seconds=30, clock=lambda: NOW + seconds_after)

    assert receiver_at(30).open(envelope) == "hi"                   # exactly max age: fine
    late = receiver_at(30.001)
    assert "older" in rejection(late, envelope).reason
    future_limit = -Opener.clock_skew_seconds
    assert receiver_at(future_limit).open(envelope) == "hi"         # within the skew
    early = receiver_at(future_limit - 0.001)
    assert "future" in rejection(early, envelope).reason
    assert late.rsa_operations == early.rsa_operations == 0


def test_replay_window_refuses_v1(rsa_key):
    """A v1 envelope has no timestamp, so an Opener with a replay window refuses it."""
    receiver = opener(rsa_key, max_age_seconds=30)
    rejection(receiver, seed_document_envelope("old", rsa_key.public_key()))
    assert receiver.rsa_operations == 0


# -- session-key reuse and the cache ----------------------------------------

def test_key_reuse_shares_one_rsa_operation(rsa_key):
    """key_reuse=N: N envelopes share enc_session_key, never a nonce, and cost one RSA."""
    seal, receiver = sealer(rsa_key, key_reuse=50), opener(rsa_key)
    envelopes = [seal.seal("m%d" % i) for i in range(51)]
    assert len({e["enc_session_key"] for e in envelopes[:50]}) == 1
    assert envelopes[50]["enc_session_key"] != envelopes[0]["enc_session_key"]
    assert len({e["nonce"] for e in envelopes}) == 51
    assert [receiver.open(e) for e in envelopes[:50]] == ["m%d" % i for i in range(50)]
    assert receiver.rsa_operations == 1


def test_without_key_reuse_every_envelope_has_its_own_key(rsa_key):
    """The default key_reuse=1 gives every envelope a fresh session key."""
    seal = sealer(rsa_key)
    assert len({seal.seal("x")["enc_session_key"] for _ in range(5)}) == 5


def test_session_cache_is_a_bounded_lru(rsa_key):
    """The cache holds session_cache_size keys and evicts the least recently used one."""
    def three_under_one_key():
        seal = sealer(rsa_key, key_reuse=3)
        return [seal.seal("x") for _ in range(3)]

    a, b, c = three_under_one_key(), three_under_one_key(), three_under_one_key()
    receiver = opener(rsa_key, session_cache_size=2)
    steps = [(a[0], 1), (b[0], 2), (a[1], 2),   # a hit: a is now the most recent
             (c[0], 3),                         # evicts b, the least recently used
             (a[2], 3),                         # still cached (FIFO would have evicted a)
             (b[1], 4)]                         # b was evicted: RSA again
    for envelope, expected_operations in steps:
        receiver.open(envelope)
        assert receiver.rsa_operations == expected_operations


def test_session_cache_can_be_disabled(rsa_key):
    """session_cache_size=0 decrypts the session key for every envelope."""
    seal, receiver = sealer(rsa_key, key_reuse=3), opener(rsa_key, session_cache_size=0)
    for _ in range(3):
        receiver.open(seal.seal("x"))
    assert receiver.rsa_operations == 3


def test_only_authenticated_session_keys_are_cached(rsa_key):
    """A session key enters the cache only after it has opened a genuine message."""
    seal, receiver = sealer(rsa_key, key_reuse=2), opener(rsa_key)
    forged, genuine = flipped(seal.seal("x"), "tag"), seal.seal("y")
    rejection(receiver, forged)
    assert receiver.open(genuine) == "y"
    assert receiver.rsa_operations == 2


# -- key files --------------------------------------------------------------

def test_private_key_file_is_0600_even_with_umask_0(tmp_path):
    """The private key is created 0600 from its first byte, whatever the umask."""
    old_umask = os.umask(0)
    try:
        private_path, public_path = keyfiles.write_rsa_key_pair(tmp_path / "keys", bits=BITS)
    finally:
        os.umask(old_umask)
    assert private_path.name == "receiver_private.pem"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    assert keyfiles.load_private_key(private_path).has_private()
    assert not keyfiles.load_public_key(public_path).has_private()


def test_key_pair_is_not_overwritten_without_force(tmp_path):
    """write_rsa_key_pair refuses to replace keys unless forced; forced, it recreates 0600."""
    private_path, _ = keyfiles.write_rsa_key_pair(tmp_path, bits=BITS)
    before = private_path.read_bytes()
    with pytest.raises(FileExistsError):
        keyfiles.write_rsa_key_pair(tmp_path, bits=BITS)
    assert private_path.read_bytes() == before
    private_path.chmod(0o644)                   # an old, too-open file...
    keyfiles.write_rsa_key_pair(tmp_path, bits=BITS, force=True)
    assert private_path.read_bytes() != before
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600     # ...is not reused


def test_existing_public_key_alone_blocks_writing(tmp_path):
    """Either file of the pair existing is enough to refuse, so a pair is never half-replaced."""
    (tmp_path / "receiver_public.pem").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        keyfiles.write_rsa_key_pair(tmp_path, bits=BITS)
    assert not (tmp_path / "receiver_private.pem").exists()


def test_key_loaders_reject_the_wrong_kind_of_key(tmp_path):
    """Loading a public key as private, garbage or a missing file as a key, is a clear
    KeyFileError (a ValueError), never an OSError or a pycryptodome exception."""
    private_path, public_path = keyfiles.write_rsa_key_pair(tmp_path, bits=BITS)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key")
    for load, path in ((keyfiles.load_private_key, public_path),
                       (keyfiles.load_public_key, garbage),
                       (keyfiles.load_public_key, tmp_path / "missing.pem"),
                       (keyfiles.load_signing_key, private_path)):
        with pytest.raises(KeyFileError, match=str(path.name)):
            load(path)
    with pytest.raises(KeyFileError):
        Opener(keyfiles.load_public_key(public_path))


# -- the negatives run --------------------------------------------------------

def test_thousand_crypto_negatives_are_all_refused(rsa_key, signers, trusted):
    """1,000 tampered, truncated, re-signed, re-labelled or replayed envelopes: none opens."""
    seal = sealer(rsa_key, sender="alice", signing_key=signers["alice"])
    receiver = opener(rsa_key, trusted_senders=trusted, require_signature=True,
                      max_age_seconds=300, strict=True)
    originals = [seal.seal("message %d" % i, "id-%d" % i) for i in range(10)]
    for envelope in originals:                  # genuine ones open (and warm the cache)
        assert receiver.open(envelope, envelope["message_id"]).startswith("message")
    five_minutes_ago = sealer(rsa_key, sender="alice", signing_key=signers["alice"],
                              clock=lambda: NOW - 301)
    stale = [five_minutes_ago.seal("old %d" % i, "id-%d" % i) for i in range(10)]
    fields = ["enc_session_key", "nonce", "tag", "ciphertext", "sig"]

    def mutations(i):
        envelope = originals[i % len(originals)]
        field = fields[i % len(fields)]
        text = envelope[field]
        new_id = "replay-%d" % i
        return [
            ("flip", flipped(envelope, field, index=i), None),
            ("truncate", dict(envelope, **{field: text[:-4]}), None),
            ("drop", {k: v for k, v in envelope.items() if k != field}, None),
            ("new id", dict(envelope, message_id=new_id), new_id),
            ("stranger", resigned(dict(envelope, message_id=new_id), "alice",
                                  signers["mallory"]), new_id),
            ("insider", resigned(envelope, "bob", signers["bob"]), None),
            ("other delivery", envelope, new_id),
            ("stale", stale[i % len(stale)], None),
            ("v1", {k: v for k, v in envelope.items() if k not in ("v", "ts")}, None),
            ("ts", dict(envelope, ts=envelope["ts"] + 1), None),
        ]

    attempts, kinds = 0, set()
    for i in range(100):
        for kind, bad, expected_id in mutations(i):
            with pytest.raises(DecryptionError, match="^envelope rejected$"):
                receiver.open(bad, expected_id)
            attempts += 1
            kinds.add(kind)
    assert attempts == 1000 and len(kinds) == 10
    assert receiver.rsa_operations == len(originals)    # no forgery cost an RSA operation


def test_one_opener_serves_several_threads_at_once(rsa_key):
    """The Receiver decrypts a batch on a thread pool: one Opener gives every thread its own
    message back, with and without the session-key cache."""
    import concurrent.futures
    plain, reused = sealer(rsa_key), sealer(rsa_key, key_reuse=10)
    envelopes = [plain.seal("plain %d" % i) for i in range(12)]
    envelopes += [reused.seal("reused %d" % i) for i in range(12)]
    shared = opener(rsa_key)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        opened = list(pool.map(lambda env: shared.open(env, env["message_id"]), envelopes))
    assert opened == ["plain %d" % i for i in range(12)] + ["reused %d" % i for i in range(12)]
