"""Fuzzing: seeded random and mutated lines beside a well-behaved publisher and consumer.

This is the CI slice of ``make fuzz``: it reuses bench/fuzz.py's generator
(``LineFuzzer``, seeded ``random.Random``), its well-behaved clients and its
``Watchdog``, with ~10,000 lines in one process instead of 100,000 from fuzzer
processes.  It asserts no timings; bench/fuzz.py measures latency.
"""
import importlib.util
import threading
from pathlib import Path

from conftest import Wire

BENCH_FUZZ = Path(__file__).resolve().parent.parent / "bench" / "fuzz.py"
_spec = importlib.util.spec_from_file_location("ciphermq_bench_fuzz", BENCH_FUZZ)
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

SEED = 5
LINES = 10_000
FUZZERS = 3


class FuzzerThreads:
    """``count`` fuzzing connections, each in a thread; ``done`` is set when all have finished."""

    def __init__(self, address, seed, lines, count):
        self.done = threading.Event()
        self.counts = []                # one dict per finished fuzzer (list.append is atomic)
        shares = [lines // count + (index < lines % count) for index in range(count)]
        self._threads = [
            threading.Thread(target=self._fuzz, name="fuzzer-%d" % index,
                             args=(address, fuzz.fuzz_batches(seed + index, share)))
            for index, share in enumerate(shares)]
        self._waiter = threading.Thread(target=self._wait_all, name="fuzzer-waiter")

    def start(self):
        for thread in self._threads:
            thread.start()
        self._waiter.start()

    def _fuzz(self, address, batches):
        self.counts.append(fuzz.fuzz_connection(address, batches))

    def _wait_all(self):
        for thread in self._threads:
            thread.join()
        self.done.set()

    def join(self, timeout):
        self._waiter.join(timeout)
        return not self._waiter.is_alive()

    def total(self, key):
        return sum(counts[key] for counts in self.counts)


def test_generator_is_reproducible_from_its_seed():
    """The same seed gives the same lines, so a failing run can be replayed with --seed."""
    assert fuzz.fuzz_batches(SEED, 500) == fuzz.fuzz_batches(SEED, 500)
    assert fuzz.fuzz_batches(SEED, 500) != fuzz.fuzz_batches(SEED + 1, 500)


def test_slice_uses_every_strategy():
    """Each kind of hostile line is in one fuzzer's share of the slice, so CI exercises them all."""
    fuzzer = fuzz.LineFuzzer(SEED)
    for _ in range(LINES // FUZZERS):
        fuzzer.line()
    assert set(fuzzer.made) == {"valid", "mutated", "jsonish_publish", "random_verb", "spliced",
                                "encoding_trick", "random_bytes", "oversized"}


def test_fuzzed_broker_keeps_every_promise(start_server):
    """Under 10,000 fuzzed lines the broker keeps answering, no thread dies, nothing is logged at
    ERROR, no fuzzing connection is dropped, and every well-behaved message arrives exactly once."""
    with fuzz.Watchdog() as watchdog:
        server = start_server(**fuzz.BROKER_LIMITS)
        good = fuzz.GoodClients(server.address)
        fuzzers = FuzzerThreads(server.address, SEED, LINES, FUZZERS)
        try:
            fuzzers.start()
            good.publish(count=50)                  # at least this many beside the fuzzers ...
            good.publish(until=fuzzers.done)        # ... and on until they are done
            assert fuzzers.join(fuzz.WAIT), "a fuzzer is stuck: the broker stopped answering"
            assert good.wait_for_all(), "the consumer never got: %s" % good.check()["lost"][:10]
            assert good.publisher.call(b"ping") == b"PONG"
            newcomer = Wire(server.address)
            assert newcomer.call("ping") == "PONG"
            newcomer.close()
        finally:
            good.close()
        server.stop()
    assert fuzzers.total("lines") == LINES
    assert fuzzers.total("closed") == fuzzers.total("stalled") == 0
    assert watchdog.thread_deaths == []
    assert watchdog.errors == []
    assert good.check() == {"lost": [], "duplicated": [], "strangers": [], "failures": []}
    assert len(good.published) >= 50
