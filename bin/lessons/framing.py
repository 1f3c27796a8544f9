"""Lesson 11: framing -- why a reader that takes one recv for one line loses messages."""
import contextlib
import json
import queue

from ciphermq.legacy_reader import LegacyReader
from lessons.stage import PATIENCE, LessonFailed

#: Messages in each part.  The document's envelope (v1) makes a ``Message:`` line of
#: about 600 bytes: it fits one recv(1024), two do not, and in a burst of them no read
#: both starts and ends on a line boundary.
COUNT = 5


def _queue_up(stage, broker, public):
    """COUNT sealed messages in default_queue before anyone reads them."""
    stage.run("Sender.py", "--port", str(broker.port), "--public-key", str(public),
              "--envelope-version", "1", "--count", str(COUNT), show=False)


def _original_reader(broker):
    """The stand-in for the original Receiver, subscribed to default_queue; closes on exit."""
    return contextlib.closing(LegacyReader(("127.0.0.1", broker.port), PATIENCE).start())


def _next_read(stage, reader):
    """The reader's next recv(1024), shown as the student should see it: (kind, text)."""
    try:
        kind, text = reader.next_event()
    except queue.Empty:
        raise LessonFailed("the original reader read nothing for %.0f s" % PATIENCE) from None
    stage.say("recv(1024) -> %4d bytes, %d line end(s), %d 'Message:' -> %s"
              % (len(text), text.count("\n"), text.count("Message:"), kind))
    return kind, text


def _default_queue(stage, broker):
    """``(default_queue's counts, messages in default_queue.dead)`` from ``stats``."""
    with stage.client(broker) as client:
        queues = json.loads(client.call("stats"))["queues"]
    return queues["default_queue"], queues.get("default_queue.dead", {}).get("ready", 0)


def framing(stage):
    """11. Framing: a reader that takes one recv for one line loses messages."""
    private, public = stage.keys()
    broker = stage.broker()
    _queue_up(stage, broker, public)
    stage.say("%d messages wait; the original reader subscribes and the broker pushes them "
              "all at once (--prefetch 100, the default)" % COUNT)
    with _original_reader(broker) as reader:
        line_ends = 0
        while line_ends < 1 + COUNT:        # 'Subscribed to queue' and every Message: line
            line_ends += _next_read(stage, reader)[1].count("\n")
        held = _default_queue(stage, broker)[0]["unacked"]
        stage.proves(reader.stored == [] and held == COUNT,
                     "one recv is not one line: the original reader stored 0 of %d, and the "
                     "broker still holds all %d" % (COUNT, COUNT),
                     "the original reader stored %s; the broker holds %d" % (reader.stored, held))
    stage.say("it hangs up, the broker puts them back; now our Receiver, which frames by newline")
    stage.run("Receiver.py", "--port", str(broker.port), "--private-key", str(private),
              "--max-messages", str(COUNT), show=False)
    ids = [record["message_id"] for record in stage.stored()]
    stage.proves(len(ids) == len(set(ids)) == COUNT,
                 "our Receiver cuts the stream at newlines: all %d stored, each once" % COUNT,
                 "our Receiver stored %d message(s), %d distinct" % (len(ids), len(set(ids))))

    broker.stop()
    broker = stage.broker("--prefetch", "1", "--redelivery-interval", "1")
    _queue_up(stage, broker, public)
    stage.say("the same burst, from a broker that pushes one message and waits for its ack")
    redeliveries = 0
    with _original_reader(broker) as reader:
        replies = 0
        while replies < COUNT:              # every message parsed, acked and confirmed
            kind, text = _next_read(stage, reader)
            replies += kind == "reply"
            if text.count("Message:") > (kind == "message"):
                redeliveries += 1
                stage.say("   a Message: shared that read and is lost to the reader; the broker "
                          "still holds it, and pushes it again alone after 1 s")
        counts, dead = _default_queue(stage, broker)
    stored = reader.stored
    stage.proves(len(stored) == len(set(stored)) == COUNT and redeliveries <= COUNT
                 and counts["ready"] == counts["unacked"] == dead == 0,
                 "with --prefetch 1 the original reader stored all %d, each once, after %d "
                 "redelivery(ies)" % (COUNT, redeliveries),
                 "stored %s, %d redeliveries, left %s, %d dead" % (stored, redeliveries,
                                                                   counts, dead))
