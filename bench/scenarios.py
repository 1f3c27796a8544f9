"""What the benchmark runs, which figures it reports, and the targets of issue 6.

``SCENARIOS`` lists each scenario once, in run order: its CipherMQ function (``sizes`` ->
one run's figures), the name of its RabbitMQ function in rabbitmq_scenarios.py (``info,
sizes`` -> the same figures) or None, the same for Redis in redis_scenarios.py, and the
table rows it produces.  Targets are judged against RabbitMQ; Redis is a column to compare.
A row names one figure of the run dicts, which way is better, and the target it is judged
against.
``SIZES`` holds the quick and full sizes.
"""
from __future__ import annotations  # ``X | None`` annotations on Python 3.9

import dataclasses
from collections.abc import Callable

import ciphermq_scenarios as ours
import e2e

SIZES = {                       # (quick, full)
    "msgs": (5000, 20000),      # per throughput run
    "latency_seconds": (2.0, 5.0),
    "queued_msgs": (100000, 100000),
    "e2e_rsa_msgs": (300, 2000),
    "e2e_reuse_msgs": (2000, 20000),
    "rsa_seconds": (1.0, 2.0),
}

#: 120 MB as the issue writes it, in MiB (RSS is read from /proc in KiB).
RSS_TARGET_MIB = 120e6 / 2 ** 20


def sizes_for(quick):
    return {key: value[0 if quick else 1] for key, value in SIZES.items()}


@dataclasses.dataclass
class Target:
    """A target of the issue.  ``kind``: what ``value`` bounds.

    ``ratio_min`` / ``ratio_max``: ours / RabbitMQ (medians); ``min`` / ``max``: ours
    itself; ``fraction_of``: ours / the median of row ``ref`` (the RSA bound).
    """

    text: str
    kind: str
    value: float
    ref: str | None = None

    def judge(self, ours_median, rabbit_median, medians):
        """True/False, or None when the figure it needs is missing (e.g. no peer)."""
        if ours_median is None:
            return None
        if self.kind in ("ratio_min", "ratio_max"):
            if not rabbit_median:
                return None
            ratio = ours_median / rabbit_median
            return ratio >= self.value if self.kind == "ratio_min" else ratio <= self.value
        if self.kind == "fraction_of":
            reference = medians.get(self.ref)
            return None if not reference else ours_median / reference >= self.value
        return ours_median >= self.value if self.kind == "min" else ours_median <= self.value


@dataclasses.dataclass
class Row:
    """One line of the results table: one figure of one scenario."""

    key: str                    # unique, e.g. "4.p99"
    label: str                  # e.g. "p99 publish->deliver, ms"
    figure: str                 # key in the run dicts, e.g. "p99_ms"
    higher_is_better: bool
    target: Target | None = None


@dataclasses.dataclass
class Scenario:
    number: str                 # as numbered in the issue
    title: str
    ours: Callable
    rabbit: str | None          # name of a function in rabbitmq_scenarios, or None
    rows: list
    skip_reason: Callable = lambda: None   # a reason to skip it on this checkout, or None
    calibration: bool = False   # the harness's own ceiling, not a CipherMQ figure
    redis: str | None = None    # name of a function in redis_scenarios, or None
    max_repeats: int | None = None  # fewer runs than --repeats (a slow, demonstrative one)


def _throughput_row(key, target=None):
    return Row(key, "msg/s", "msg_per_s", True, target)


SCENARIOS = [
    Scenario("0a", "clients vs trivial relay, 1 -> 1 pipelined", ours.relay_1to1, None,
             [_throughput_row("0a")], calibration=True),
    Scenario("0b", "clients vs trivial relay, publish-and-wait-each", ours.relay_publish_wait,
             None, [_throughput_row("0b")], calibration=True),
    Scenario("1", "1 -> 1 pipelined", ours.scenario_1to1, "scenario_1to1",
             [_throughput_row("1", Target("≥ 2.0× RabbitMQ", "ratio_min", 2.0))],
             redis="scenario_1to1"),
    Scenario("2", "3 -> 1 pipelined", ours.scenario_3to1, "scenario_3to1",
             [_throughput_row("2", Target("≥ 2.0× RabbitMQ", "ratio_min", 2.0))],
             redis="scenario_3to1"),
    Scenario("3", "publish-and-wait-each (window 1)", ours.scenario_publish_wait,
             "scenario_publish_wait",
             [_throughput_row("3", Target("≥ 3× RabbitMQ", "ratio_min", 3.0))],
             redis="scenario_publish_wait"),
    Scenario("9", "client libraries, 1 -> 1 pipelined: ciphermq.client / pika / redis-py",
             ours.library_1to1, "scenario_1to1",
             [_throughput_row("9", Target("≥ 2× pika+RabbitMQ", "ratio_min", 2.0))],
             redis="scenario_1to1"),
    Scenario("9b", "client libraries, publish-and-wait-each: ciphermq.client / pika / redis-py",
             ours.library_publish_wait, "scenario_publish_wait",
             [_throughput_row("9b")], redis="scenario_publish_wait"),
    Scenario("4", "latency at 1,000 msg/s", ours.scenario_latency, "scenario_latency", [
        Row("4.p50", "p50 ms", "p50_ms", False),
        Row("4.p99", "p99 ms", "p99_ms", False, Target("≤ RabbitMQ's", "ratio_max", 1.0)),
        Row("4.max", "max ms", "max_ms", False)], redis="scenario_latency"),
    Scenario("8", "latency at 1,000 msg/s, 1,000 idle clients", ours.scenario_idle_latency,
             "scenario_idle_latency", [
                 Row("8.p50", "p50 ms", "p50_ms", False),
                 Row("8.p99", "p99 ms", "p99_ms", False, Target("≤ RabbitMQ's", "ratio_max", 1.0)),
                 Row("8.max", "max ms", "max_ms", False),
                 Row("8.rss", "RSS added by the idle clients, MiB", "idle_rss_delta_mb",
                     False)], redis="scenario_idle_latency"),
    Scenario("7", "1 -> 1 pipelined, journal on (fsync before ACK) / persistent",
             ours.scenario_persistent, "scenario_persistent",
             [_throughput_row("7", Target("≥ 1.5× RabbitMQ persistent", "ratio_min", 1.5))],
             redis="scenario_persistent"),
    Scenario("7b", "journal on / persistent, no consumer", ours.scenario_persistent_no_consumer,
             "scenario_persistent_no_consumer",
             [_throughput_row("7b", Target("≥ 1.5× RabbitMQ persistent", "ratio_min", 1.5))],
             redis="scenario_persistent_no_consumer"),
    Scenario("5", "100,000 messages queued, no consumer", ours.scenario_queued_rss,
             "scenario_queued_rss", [
                 Row("5", "broker RSS, MiB", "rss_mb", False,
                     Target(f"≤ 120 MB ({RSS_TARGET_MIB:.1f} MiB)", "max", RSS_TARGET_MIB)),
                 Row("5.delta", "RSS growth, MiB", "rss_delta_mb", False)],
             redis="scenario_queued_rss"),
    Scenario("6", "receiver's bound: RSA-OAEP-2048 decrypts/s, one process",
             e2e.rsa_decrypt_bound, None,
             [Row("6", "decrypts/s", "decrypts_per_s", True)]),
    Scenario("6a", "e2e crypto, per-message RSA (Sender.py -> Receiver.py)",
             e2e.scenario_per_message_rsa, "scenario_e2e_rsa",
             [_throughput_row("6a", Target("≥ 90% of the RSA bound (6)", "fraction_of", 0.9,
                                           ref="6"))],
             skip_reason=e2e.missing_scripts),
    Scenario("6b", f"e2e crypto, session-key reuse (--key-reuse {e2e.KEY_REUSE})",
             e2e.scenario_key_reuse, "scenario_e2e_reuse",
             [_throughput_row("6b", Target("≥ 5,000 msg/s", "min", 5000))],
             skip_reason=e2e.missing_scripts),
    Scenario("6c", "e2e crypto, per-message RSA; RabbitMQ: a 3-node cluster, 3 --url",
             e2e.scenario_per_message_rsa, "scenario_e2e_cluster",
             [_throughput_row("6c")], skip_reason=e2e.missing_scripts, max_repeats=1),
]
