"""What the dashboard reports: rates sampled once a second, and Prometheus text.

Two pieces, both about numbers and neither about HTTP:

* :class:`RateSampler` keeps a bounded ring of ``(time, totals)`` samples,
  one a second, taken by the thread ``ciphermq-metrics``; rates are the
  differences between neighbouring samples.  The thread only calls
  :meth:`RateSampler.sample`, which tests call directly with a fake clock.
* :func:`exposition` renders a stats snapshot in the Prometheus text
  exposition format 0.0.4 (``# HELP``, ``# TYPE``, escaped label values).

A snapshot is ``Broker.stats()`` plus ``"connections"``: counters and
gauges only, never a message id or a byte of a message.
"""
import collections
import logging
import threading
import time

log = logging.getLogger(__name__)

#: Broker.stats()["totals"] key -> (Prometheus counter name, help text).
COUNTERS = {
    "published": ("ciphermq_messages_published_total",
                  "Messages accepted by a publish (a duplicate publish is not counted)."),
    "duplicates": ("ciphermq_messages_duplicates_total",
                   "Publishes of an already accepted message id, acknowledged but not stored."),
    "delivered": ("ciphermq_messages_delivered_total",
                  "Messages handed to a consumer or fetched, redeliveries included."),
    "acked": ("ciphermq_messages_acked_total",
              "Messages acknowledged by a receiver (gone from the broker for good)."),
    "redelivered": ("ciphermq_messages_redelivered_total",
                    "Deliveries of a message that had been delivered before."),
    "dead_lettered": ("ciphermq_messages_dead_lettered_total",
                      "Messages moved to <queue>.dead after too many deliveries."),
}

#: Broker.stats()["queues"][name] key -> (Prometheus gauge name, help text).
QUEUE_GAUGES = {
    "ready": ("ciphermq_queue_messages_ready", "Messages waiting in a queue for a consumer."),
    "unacked": ("ciphermq_queue_messages_unacked",
                "Messages delivered from a queue and not yet acknowledged."),
    "consumers": ("ciphermq_queue_consumers", "Consumers subscribed to a queue."),
}

CONNECTIONS = ("ciphermq_connections", "Open client connections to the broker.")

#: Broker-wide gauges: (stats key, sub-key or None) -> (Prometheus gauge name, help text).
BROKER_GAUGES = {
    ("memory", "queued_bytes"): ("ciphermq_queued_bytes",
                                 "Envelope bytes of every queued or unacked copy (--max-memory "
                                 "bounds it)."),
    ("memory", "max_memory"): ("ciphermq_max_memory_bytes", "The --max-memory limit."),
    ("queue_count", None): ("ciphermq_queues",
                            "Queues that exist (the per-queue gauges list at most 100)."),
}

#: The rates the dashboard draws (totals keys), in legend order.
RATES = ("published", "delivered", "acked", "redelivered", "dead_lettered")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RateSampler:
    """A ring of the last ``keep`` samples of the broker's totals, one every ``interval`` s.

    ``read_totals`` returns the totals dict (it takes the broker mutex the way
    ``stats`` does).  ``start()`` launches ``ciphermq-metrics`` (non-daemon:
    always stopped explicitly); ``stop()`` sets its Event and joins, bounded.
    """

    def __init__(self, read_totals, clock=time.monotonic, interval=1.0, keep=300):
        self._read_totals = read_totals
        self._clock = clock
        self.interval = interval
        #: Guards _samples: appended by the sampler thread, read by HTTP handler
        #: threads.  Held only to append or copy; never while reading the broker.
        self._lock = threading.Lock()
        self._samples = collections.deque(maxlen=keep)     # (clock time, totals dict)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ciphermq-metrics")

    def sample(self):
        """Take one sample now.  Does not block beyond the broker mutex."""
        totals = self._read_totals()
        now = self._clock()
        with self._lock:
            self._samples.append((now, totals))

    def history(self):
        """Rates between neighbouring samples, oldest first.

        A list of dicts: ``"t"`` (seconds before the newest sample, <= 0) and,
        for each name in :data:`RATES`, events per second.  Does not block.
        """
        with self._lock:
            samples = list(self._samples)
        if not samples:
            return []
        newest = samples[-1][0]
        points = []
        for (t0, before), (t1, after) in zip(samples, samples[1:]):
            span = t1 - t0
            if span <= 0:
                continue
            point = {"t": round(t1 - newest, 3)}
            for name in RATES:
                point[name] = round((after.get(name, 0) - before.get(name, 0)) / span, 3)
            points.append(point)
        return points

    def rates(self):
        """The latest rates (per second, over the last interval); zeros until two samples."""
        history = self.history()
        if not history:
            return dict.fromkeys(RATES, 0.0)
        return {name: history[-1][name] for name in RATES}

    def start(self):
        self.sample()
        self._thread.start()
        return self

    def stop(self, timeout=5.0):
        """Stop the thread; safe twice, and before start()."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:           # a bug: log it, keep sampling
                log.exception("metrics sample failed")


def escape_label_value(value):
    r"""A label value as the exposition format wants it: ``\`` ``"`` and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text):
    r"""HELP text: ``\`` and newline escaped (quotes are left alone)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def exposition(snapshot):
    """The snapshot (stats + connections) as Prometheus text format 0.0.4."""
    lines = []

    def family(name, kind, help_text, samples):
        lines.append("# HELP %s %s" % (name, escape_help(help_text)))
        lines.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            if labels:
                label_text = ",".join('%s="%s"' % (key, escape_label_value(str(val)))
                                      for key, val in labels)
                lines.append("%s{%s} %s" % (name, label_text, value))
            else:
                lines.append("%s %s" % (name, value))

    totals = snapshot["totals"]
    for key, (name, help_text) in COUNTERS.items():
        family(name, "counter", help_text, [((), totals.get(key, 0))])
    queues = sorted(snapshot["queues"].items())
    for key, (name, help_text) in QUEUE_GAUGES.items():
        family(name, "gauge", help_text,
               [((("queue", queue),), counts[key]) for queue, counts in queues])
    family(CONNECTIONS[0], "gauge", CONNECTIONS[1], [((), snapshot.get("connections", 0))])
    for (key, sub_key), (name, help_text) in BROKER_GAUGES.items():
        value = snapshot.get(key)
        if sub_key is not None and value is not None:
            value = value.get(sub_key)
        if value is not None:
            family(name, "gauge", help_text, [((), value)])
    return "\n".join(lines) + "\n"
