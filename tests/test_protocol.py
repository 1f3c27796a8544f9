"""The wire protocol's pure parts: framing, parsing, replies."""
import base64
import json
import random
import tracemalloc

import pytest

from ciphermq import envelope, protocol
from ciphermq.errors import ProtocolError


def feed_all(framer, chunks):
    lines = []
    for chunk in chunks:
        lines.extend(framer.feed(chunk))
    return lines


def test_several_commands_in_one_chunk_are_several_lines():
    """Framing is by newline: one recv holding three commands yields three lines."""
    framer = protocol.LineFramer()
    assert framer.feed(b"ping\nstats\r\nping\n") == [b"ping", b"stats", b"ping"]


def test_one_command_split_into_single_bytes_is_one_line():
    """A command arriving one byte per recv is reassembled exactly once."""
    framer = protocol.LineFramer()
    data = b"declare_queue q1\n"
    assert feed_all(framer, [data[i:i + 1] for i in range(len(data))]) == [b"declare_queue q1"]
    assert framer.buffered == 0


def test_long_line_within_limit_passes():
    """Lines far longer than 1024 bytes are fine up to the configured limit."""
    framer = protocol.LineFramer(max_line_bytes=100_000)
    line = b"x" * 100_000
    assert feed_all(framer, [line[:70_000], line[70_000:] + b"\n"]) == [line]


def test_over_long_line_reported_once_then_framing_resumes():
    """An over-long line yields one LineTooLong, is discarded, and the next line is intact."""
    framer = protocol.LineFramer(max_line_bytes=10)
    out = feed_all(framer, [b"a" * 8, b"a" * 8, b"a" * 50, b"aaa\nping\n"])
    assert len(out) == 2
    assert isinstance(out[0], protocol.LineTooLong)
    assert out[1] == b"ping"
    assert framer.buffered == 0


def test_over_long_line_in_one_chunk_is_reported():
    """A complete over-long line inside one chunk is refused too, neighbours untouched."""
    framer = protocol.LineFramer(max_line_bytes=4)
    out = framer.feed(b"ping\n123456789\nping\n")
    assert out[0] == b"ping" and out[2] == b"ping"
    assert isinstance(out[1], protocol.LineTooLong)


def test_publish_names_are_checked_every_time_and_remembered_within_a_bound():
    """The cache of checked (exchange, key) pairs never passes a bad name and stays bounded."""
    body = b'{"message_id": "m1"}'
    for number in range(1000):
        protocol._publish_address(b"ex%d" % number, b"key")
    assert protocol._publish_address.cache_info().currsize <= 256
    for _ in range(2):      # refused again, not remembered
        with pytest.raises(ProtocolError, match="invalid exchange name"):
            protocol.parse_publish(b"bad/name key " + body)
        with pytest.raises(ProtocolError, match="invalid routing key"):
            protocol.parse_publish(b"ex1 bad/key " + body)


def test_whole_lines_before_an_unfinished_one_are_checked_too():
    """A chunk ending mid-line: its whole lines lose their \\r, an over-long one is refused."""
    framer = protocol.LineFramer(max_line_bytes=4)
    assert framer.feed(b"ping\nping\npi") == [b"ping", b"ping"]
    out = framer.feed(b"ng\n123456789\nstat\r\nping\npi")
    assert out[0] == b"ping" and out[2] == b"stat" and out[3] == b"ping" and len(out) == 4
    assert isinstance(out[1], protocol.LineTooLong)
    assert framer.feed(b"ng\n") == [b"ping"]


def test_memory_stays_bounded_while_discarding():
    """While an endless line streams in, the framer holds no more than the limit."""
    framer = protocol.LineFramer(max_line_bytes=1000)
    for _ in range(1000):
        framer.feed(b"z" * 999)
        assert framer.buffered <= 1001


def test_unfinished_line_costs_about_its_own_size_whatever_the_segmenting():
    """Memory per byte: a 200 kB unfinished line fed 1 byte at a time costs under 2 bytes a byte."""
    size = 200_000
    framer = protocol.LineFramer(max_line_bytes=1_000_000)
    pieces = [b"x"] * size          # the same one-byte object: the pieces themselves cost nothing
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for piece in pieces:
            framer.feed(piece)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert framer.buffered == size
    assert held < 2 * size, "%d bytes held for a %d-byte unfinished line" % (held, size)
    assert framer.feed(b"\n") == [b"x" * size]


def test_publish_keeps_raw_json_bytes():
    """The envelope is forwarded byte for byte as published (parsed only to validate)."""
    raw = b'{"message_id": "m-1", "enc_session_key": "k", "nonce": "n", "tag": "t", ' \
          b'"ciphertext": "c", "extra": {"kept": [1, 2]}}'
    exchange, key, message_id, body = protocol.parse_publish(b"ex rk " + raw + b"  ")
    assert (exchange, key, message_id, body) == ("ex", "rk", "m-1", raw)


def test_publisher_cannot_set_delivery_count():
    """delivery_count belongs to the broker: a published one is removed."""
    raw = json.dumps({"message_id": "m", "enc_session_key": "k", "nonce": "n", "tag": "t",
                      "ciphertext": "c", "delivery_count": 99}).encode()
    _, _, _, body = protocol.parse_publish(b"ex rk " + raw)
    assert "delivery_count" not in json.loads(body)


@pytest.mark.parametrize("raw, message", [
    (b'[1, 2]', "JSON object"),
    (b'{"message_id": "m"', "JSON object"),
    (b'{"message_id": "m",}', "invalid JSON"),
    (b'{"enc_session_key": "k", "nonce": "n", "tag": "t", "ciphertext": "c"}',
     "missing field 'message_id'"),
    (b'{"message_id": 7, "enc_session_key": "k", "nonce": "n", "tag": "t", "ciphertext": "c"}',
     "field 'message_id' must be a string"),
    (b'{"message_id": "m", "enc_session_key": ["k"], "nonce": "n", "tag": "t", "ciphertext": "c"}',
     "field 'enc_session_key' must be a string"),
    (b'{"message_id": "a b", "enc_session_key": "k", "nonce": "n", "tag": "t", "ciphertext": "c"}',
     "invalid message_id"),
    (b'{"message_id": "m\xff", "enc_session_key": "k", "nonce": "n", "tag": "t", '
     b'"ciphertext": "c"}',
     "invalid UTF-8"),
    (b'{"a": ' * 100_000 + b'1' + b'}' * 100_000, "invalid JSON"),
    (b'{"message_id": "m"} {"nonce": "n"}', "invalid JSON: Extra data at position 20"),
    (b'{"message_id": "m\\u00e9", "enc_session_key": "k", "nonce": "n", "tag": "t", '
     b'"ciphertext": "c"}', "invalid message_id"),
    (b'{"message_id": "m", "enc_session_key": "k", "nonce": "n", "tag": "t", "ciphertext": "c", '
     b'"note": "\\ud800"}', "lone surrogate"),
    (b'{"message_id": "m", "enc_session_key": "k", "nonce": "n", "tag": "t", "ciphertext": "c", '
     b'"n": 1, "b": true, "x": [[[[[[[[1]]]]]]]]}', "nested deeper than 8 levels"),
])
def test_bad_envelopes_are_refused_with_a_reason(raw, message):
    """Each malformed envelope gets a ProtocolError that says what is wrong."""
    with pytest.raises(ProtocolError, match=message):
        protocol.parse_publish(b"ex rk " + raw)


@pytest.mark.parametrize("line, message", [
    (b"publish ex", "usage: publish"),
    (b"ping\x00", "NUL"),
    (b"\xff\xfe", "invalid UTF-8"),
])
def test_malformed_commands(line, message):
    """NUL bytes, invalid UTF-8 and missing arguments are clear errors."""
    with pytest.raises(ProtocolError, match=message):
        verb, args = protocol.split_command(line)
        if verb == "publish":
            protocol.parse_publish(args)


def test_names_are_restricted():
    """Only [A-Za-z0-9._:-]{1,128} names pass: they are echoed into replies and logs."""
    assert protocol.parse_name(b"orders.eu-1:x_y", "queue") == "orders.eu-1:x_y"
    for bad in (b"a/b", b"x" * 129, b"caf\xc3\xa9", b"a\rb"):
        with pytest.raises(ProtocolError, match="invalid queue name"):
            protocol.parse_name(bad, "queue")


def test_message_line_adds_delivery_count_without_reserialising():
    """Pushed lines carry the publisher's bytes plus delivery_count, as valid JSON."""
    body = b'{"message_id": "m", "x": "\\u00e9"}'
    line = protocol.message_line("m", body, 3)
    assert line == b'Message: m {"message_id": "m", "x": "\\u00e9", "delivery_count": 3}\n'
    assert json.loads(line.split(b" ", 2)[2])["delivery_count"] == 3


def test_error_reply_is_always_one_line():
    """Whatever an error text holds, the reply is exactly one Error: line."""
    assert protocol.error_reply("bad\nthing\r here") == b"Error: bad thing here\n"


@pytest.mark.parametrize("text, ok", [
    ("", True), ("QUJD", True), ("QUI=", True), ("QQ==", True), ("QQ===", False),
    ("Q=Q=", False), ("QU J", False), ("QUJ\u00e9", False), ("QU\ud800", False),
    ("a+/b", True), ("a-_b", False), ("=", False), ("==", False),
    ("QR==", False), ("QZ==", False), ("QUJ=", False), ("QUL=", False), ("QUM=", True),
])
def test_base64_check_agrees_with_the_plain_rule(text, ok):
    """The fast base64 check accepts exactly [A-Za-z0-9+/]*={0,2} with zero padding bits."""
    env = {"message_id": "m", "enc_session_key": "QUJD", "nonce": "QUJD", "tag": text,
           "ciphertext": "QUJD"}
    raw = json.dumps(env).encode()
    if ok:
        assert envelope.parse_envelope(raw)[0] == "m"
    else:
        with pytest.raises(ProtocolError, match="field 'tag' must be base64 text"):
            envelope.parse_envelope(raw)


def test_only_canonical_base64_passes_on_random_fields():
    """For random byte strings, the encoder's text passes and every other padding-bit
    variant of it (the same decoded bytes) is refused."""
    rng = random.Random(6)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for _ in range(300):
        text = base64.b64encode(rng.randbytes(rng.randint(1, 40))).decode()
        assert envelope.canonical_padding(text)
        if text.endswith("="):
            data = text.rstrip("=")
            for char in alphabet:
                variant = data[:-1] + char + text[len(data):]
                same = base64.b64decode(variant) == base64.b64decode(text)
                if variant != text and same:
                    with pytest.raises(ProtocolError, match="must be base64 text"):
                        envelope.parse_envelope(json.dumps(
                            {"message_id": "m", "enc_session_key": variant, "nonce": "QUJD",
                             "tag": "QUJD", "ciphertext": "QUJD"}).encode())


def test_stats_reply_is_exactly_json_dumps_with_sorted_keys():
    """stats_reply, which formats the queue rows itself, gives the same bytes as
    json.dumps(sort_keys=True) for random stats, names needing escapes included."""
    rng = random.Random(11)
    alphabet = 'ab.Z_:-09"\\\u00e9\u2603\n'
    for _ in range(200):
        stats = {
            "queues": {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))): {
                "ready": rng.randint(0, 10 ** 7), "unacked": rng.randint(0, 10 ** 4),
                "consumers": rng.randint(0, 9)} for _ in range(rng.randint(0, 120))},
            "queue_count": rng.randint(0, 20_000),
            "totals": {key: rng.randint(0, 10 ** 9) for key in (
                "published", "duplicates", "delivered", "redelivered", "acked",
                "dead_lettered")},
            "memory": {"queued_bytes": rng.randint(0, 2 ** 30), "max_memory": 2 ** 29},
        }
        expected = json.dumps(stats, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        assert protocol.stats_reply(stats) == expected
