"""The clients' durability order, checked against a spied fsync and a spied broker.

The scripts say "fsync before send" (the outbox) and "fsync before ack" (the
receiver's store).  A test that only looks at the files afterwards cannot see
the order -- the bytes are there whether or not they were fsynced first -- so
these tests replace ``os.fsync`` with a spy that notes what each file held when
it was fsynced, and wrap the in-process broker so that each publish or ack, as
it arrives, is checked against what had been made durable by then.  Turn
either client fsync into a no-op (or move it after the send) and they fail.
"""
import json
import os
import threading

from conftest import envelope, publish_line

from ciphermq.outbox import Outbox
from ciphermq.receiver import Receiver
from ciphermq.sender import Sender
from ciphermq.store import MessageStore


class FsyncSpy:
    """Stands in for ``os.fsync``: runs the real one, then notes the ids the file holds."""

    def __init__(self, real_fsync):
        self.real_fsync = real_fsync
        self.lock = threading.Lock()        # guards durable: fsyncs and broker threads race
        self.durable = {}                   # file name -> ids in it at its last fsync

    def __call__(self, fd):
        self.real_fsync(fd)
        path = os.readlink("/proc/self/fd/%d" % fd)
        if not os.path.isfile(path):
            return                          # a directory fsync
        with open(path, "rb") as file:
            ids = {json.loads(line).get("message_id") for line in file if line.endswith(b"\n")}
        with self.lock:
            self.durable[os.path.basename(path)] = ids

    def ids(self, name):
        with self.lock:
            return set(self.durable.get(name, ()))


def test_the_outbox_is_fsynced_before_the_first_send(server, monkeypatch, tmp_path):
    """Every publish reaches the broker only after an fsync of the outbox that holds it."""
    spy = FsyncSpy(os.fsync)
    monkeypatch.setattr(os, "fsync", spy)
    early = []                              # ids the broker saw before the outbox held them
    published = []
    real_publish_many = server.broker.publish_many

    def publish_many(publishes):
        durable = spy.ids("pending.json")
        for _exchange, _key, message_id, _body in publishes:
            published.append(message_id)
            if message_id not in durable:
                early.append(message_id)
        return real_publish_many(publishes)
    monkeypatch.setattr(server.broker, "publish_many", publish_many)

    host, port = server.address
    with Outbox(tmp_path / "pending.json") as outbox:
        sender = Sender(outbox, exchange="default_exchange", routing_key="default_key",
                        window=4, ack_timeout=5.0, stop=threading.Event(),
                        connect_options={"host": host, "port": port})
        sender.accept(["one", "two", "three"], lambda text: envelope())
        assert sender.deliver() == 0
        assert len(outbox) == 0
    assert len(published) == 3, published
    assert early == []


def test_the_receivers_store_is_fsynced_before_the_ack(server, connect, monkeypatch, tmp_path):
    """Every ack reaches the broker only after an fsync of the output file that holds it."""
    spy = FsyncSpy(os.fsync)
    monkeypatch.setattr(os, "fsync", spy)
    early, acked = [], []
    real_acknowledge_many = server.broker.acknowledge_many

    def acknowledge_many(session, message_ids):
        durable = spy.ids("out.json")
        acked.extend(message_ids)
        early.extend(m for m in message_ids if m not in durable)
        return real_acknowledge_many(session, message_ids)
    monkeypatch.setattr(server.broker, "acknowledge_many", acknowledge_many)

    publisher = connect()
    ids = ["fs-%d" % n for n in range(5)]
    for message_id in ids:
        assert publisher.call(publish_line(message_id)) == "ACK %s" % message_id

    host, port = server.address
    receiver = Receiver(lambda delivery: ("plain " + delivery.message_id, None),
                        MessageStore(tmp_path / "out.json"), queue_name="default_queue",
                        connect_options={"host": host, "port": port}, stop=threading.Event(),
                        ack_batch=2, max_messages=len(ids))
    try:
        while not receiver.finished():
            if receiver.connection is None:
                assert receiver.connect()
            batch = receiver.next_batch()
            if batch:
                receiver.store_then_ack(batch)
            receiver.tend_acks()
    finally:
        receiver.finish()
    assert sorted(acked) == ids
    assert early == []


def test_the_spy_sees_an_ack_that_comes_before_its_fsync(server, monkeypatch, tmp_path):
    """Positive control: the spy above reports an id acked while its record is not yet
    fsynced, so the two tests above can fail."""
    spy = FsyncSpy(os.fsync)
    monkeypatch.setattr(os, "fsync", spy)
    with MessageStore(tmp_path / "out.json") as store:
        store.add("early", "m", "t")
        store.flush()
        assert "early" not in spy.ids("out.json")
        store.sync()
        assert "early" in spy.ids("out.json")
