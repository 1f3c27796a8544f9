"""Crypto negatives end to end: tampered envelopes through a real broker to a real Receiver."""
import base64
import random

from scripts import (
    PATIENCE,
    assert_exactly_once,
    publish_sealed,
    queue_stats,
    read_records,
    receiver_args,
)

from ciphermq import crypto
from ciphermq import keys as keyfiles
from ciphermq.client import Client


def _flip(text):
    """The same base64 field with one bit of its bytes flipped: still well-formed."""
    raw = bytearray(base64.b64decode(text))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def _truncate(text):
    return base64.b64encode(base64.b64decode(text)[:-1]).decode()


def tampered_envelopes(sealer, stranger, count, rng):
    """``count`` envelopes that must all be refused, a mix of every kind of tampering."""
    kinds = [
        lambda env: dict(env, ciphertext=_flip(env["ciphertext"])),
        lambda env: dict(env, tag=_flip(env["tag"])),
        lambda env: dict(env, nonce=_flip(env["nonce"])),
        lambda env: dict(env, enc_session_key=_flip(env["enc_session_key"])),
        lambda env: dict(env, ts=env["ts"] + 1),
        lambda env: dict(env, message_id=env["message_id"] + "-replayed"),   # new id, old body
        lambda env: dict(env, ciphertext=_truncate(env["ciphertext"])),
        lambda env: dict(env, tag=_truncate(env["tag"])),
        lambda env: stranger.seal("sealed for somebody else"),               # wrong key
    ]
    envelopes = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        envelopes.append(kind(sealer.seal("tampered %d" % i)))
    rng.shuffle(envelopes)
    return envelopes


def test_tampered_envelopes_are_all_refused_and_the_queue_drains(server, keys, spawn, tmp_path):
    """300 envelopes tampered field by field, replayed under a new id, truncated or sealed for
    another key: 0 accepted, the receiver survives, each lands in the rejects file, and the
    queue drains."""
    _, other_public = keyfiles.write_rsa_key_pair(tmp_path / "other", bits=1024)
    sealer, stranger = crypto.Sealer(keys[1]), crypto.Sealer(other_public)
    bad = tampered_envelopes(sealer, stranger, 300, random.Random(5))
    with Client(*server.address, timeout=PATIENCE) as client:
        for reply in client.publish_many([("default_exchange", "default_key", env)
                                          for env in bad]):
            reply.result(PATIENCE)
    genuine = ["genuine %d" % i for i in range(20)]
    publish_sealed(server.address, keys, genuine)                # queued behind the bad ones
    output = tmp_path / "out.json"
    receiver = spawn(receiver_args(server.address[1], keys, output, "--max-messages", "20"))
    assert receiver.wait() == 0, receiver.stderr
    assert_exactly_once(read_records(output), genuine)
    rejects = read_records(tmp_path / "out.rejects.json")
    assert sorted(r["message_id"] for r in rejects) == sorted(env["message_id"] for env in bad)
    stats = queue_stats(server)         # every ack was confirmed before the receiver exited
    assert (stats["ready"], stats["unacked"]) == (0, 0)
