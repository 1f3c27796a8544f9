"""ciphermq.store: the receiver's output file as a crash-safe dedup store."""
import json

import pytest

from ciphermq.store import CorruptFile, JsonLinesFile, MessageStore


def record(message_id, message="m"):
    return json.dumps({"message_id": message_id, "message": message, "timestamp": "t"}) + "\n"


def test_processed_ids_are_rebuilt_from_the_file(tmp_path):
    """Reopening the output file restores the set of processed ids."""
    path = tmp_path / "out.json"
    with MessageStore(path) as store:
        store.add("a", "first", "t")
        store.add("b", "second", "t")
        store.sync()
    with MessageStore(path) as store:
        assert "a" in store and "b" in store and "c" not in store
        assert len(store) == 2


def test_an_id_counts_as_processed_only_after_sync(tmp_path):
    """Until its record is fsynced, a message is not marked processed."""
    with MessageStore(tmp_path / "out.json") as store:
        store.add("a", "first", "t")
        assert "a" not in store
        store.sync()
        assert "a" in store


@pytest.mark.parametrize("tail", [b'{"message_id": "torn", "mess',          # killed mid-write
                                  b'{"message_id": "x"}',                   # newline not yet out
                                  b"\x00\x00\x00\x00",                      # power-loss zeros
                                  b"garbage\n"])                            # a bad last line
def test_a_torn_last_line_is_cut_off_and_appending_goes_on_cleanly(tail, tmp_path):
    """A crash artefact at the end is removed (its message was never acked) and the next
    record starts on a line of its own."""
    path = tmp_path / "out.json"
    path.write_bytes(record("a").encode() + tail)
    with MessageStore(path) as store:
        assert store.torn_bytes == len(tail)
        assert "a" in store and len(store) == 1
        store.add("b", "second", "t")
        store.sync()
    assert path.read_bytes() == (record("a") + record("b", "second")).encode()


def test_a_bad_line_before_the_last_is_corruption_and_nothing_is_cut(tmp_path):
    """Only the last line can be torn; a bad line earlier refuses the file and leaves it as is."""
    path = tmp_path / "out.json"
    content = (record("a") + "[1, 2]\n" + record("b")).encode()
    path.write_bytes(content)
    with pytest.raises(CorruptFile, match="line 2 is not a JSON object"):
        MessageStore(path)
    assert path.read_bytes() == content


def test_rewrite_replaces_the_whole_file_atomically(tmp_path):
    """rewrite() leaves exactly the new records and no temporary file behind."""
    path = tmp_path / "log.json"
    with JsonLinesFile(path) as log:
        log.append({"n": 1})
        log.sync()
        log.rewrite([{"n": 2}, {"n": 3}])
        log.append({"n": 4})
        log.sync()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"n": 2}, {"n": 3}, {"n": 4}]
    assert [p.name for p in tmp_path.iterdir()] == ["log.json"]
