"""Client processes, pacing and process measurements shared by both brokers' scenarios.

Every benchmark client runs in a process of its own (``multiprocessing``, spawn), so that
no client shares an interpreter -- or a GIL -- with another client or with the harness.
A scenario starts its clients, waits until each reports ready (connected, subscribed,
envelopes built), then sets one ``go`` event: the clock starts at the first publish, not
at process start-up.
"""
import multiprocessing
import queue
import threading
import time

CLIENT_TIMEOUT = 60.0       # seconds any one client process may take before the run fails
READY_TICK = 0.5            # seconds between checks that no client died while we wait


def rss_mib(pid):
    """Resident set size of process ``pid`` in MiB, from ``/proc/<pid>/status`` (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"process {pid} has no VmRSS (exited?)")


def wait_until(deadline):
    """Block until ``time.monotonic()`` reaches ``deadline``: pacing, not synchronisation."""
    pause = threading.Event()       # never set: its wait is a timed wait
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        pause.wait(remaining)


def ready_then_go(ready, go, role):
    """A client process says it is ready (as ``role``) and waits for the start signal."""
    ready.put(role)
    if not go.wait(CLIENT_TIMEOUT):
        raise RuntimeError("never told to go")


def split(total, parts):
    """Split ``total`` into ``parts`` near-equal counts."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an ascending list."""
    index = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def latency_figures(latencies, msgs, rate, idle_clients, extra):
    """One latency run's figures: p50/p99/max in ms from latencies in seconds, plus ``extra``."""
    lat_ms = sorted(value * 1000.0 for value in latencies)
    figures = {"msgs": msgs, "rate": rate, "idle_clients": idle_clients,
               "p50_ms": round(percentile(lat_ms, 0.50), 3),
               "p99_ms": round(percentile(lat_ms, 0.99), 3),
               "max_ms": round(lat_ms[-1], 3)}
    figures.update(extra)
    return figures


def _client_main(target, args, results):
    """Child-process entry: run ``target(*args)`` and put its dict (or its error) on results."""
    try:
        results.put(target(*args))
    except BaseException as exc:    # reported to the parent, which fails the scenario
        results.put({"error": f"{target.__name__}: {exc!r}"})
        raise


class ClientProcesses:
    """Client processes sharing one ``ready`` queue, one ``go`` event and one results queue.

    Use as a context manager: leaving the block ends every client (see ``close``), so no
    client process survives its scenario, failed or not.
    """

    def __init__(self):
        self.ctx = multiprocessing.get_context("spawn")
        self.ready = self.ctx.Queue()
        self.results = self.ctx.Queue()
        self.go = self.ctx.Event()
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc_info):
        self.close(kill=exc_type is not None)

    def start(self, target, *args):
        """Start ``target(*args, ready, go)`` in a new process; it must return a dict.

        The client puts something on ``ready`` when it is set up, then waits for ``go``
        (idle holders treat ``go`` as "stop").
        """
        proc = self.ctx.Process(target=_client_main, daemon=True,
                                args=(target, args + (self.ready, self.go), self.results))
        proc.start()
        self.procs.append(proc)

    def wait_ready(self, count):
        """Block until ``count`` more clients reported ready.

        Raises RuntimeError with the client's error if one dies first, or after
        CLIENT_TIMEOUT.
        """
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while count:
            try:
                self.ready.get(timeout=READY_TICK)
                count -= 1
                continue
            except queue.Empty:
                pass
            if any(proc.exitcode not in (None, 0) for proc in self.procs):
                self.collect(len(self.procs))   # raises with the failed client's error
            if time.monotonic() > deadline:
                raise RuntimeError(f"a client did not get ready in {CLIENT_TIMEOUT:.0f} s")

    def collect(self, count):
        """Block until ``count`` results arrived; raises RuntimeError on a client error/timeout."""
        results = []
        for _ in range(count):
            try:
                result = self.results.get(timeout=CLIENT_TIMEOUT)
            except queue.Empty:
                raise RuntimeError(f"a client did not finish in {CLIENT_TIMEOUT:.0f} s") from None
            if "error" in result:
                raise RuntimeError(result["error"])
            results.append(result)
        return results

    def close(self, kill=False):
        """End every client process; safe to call twice.

        Normally sets ``go`` (which releases idle holders) and joins each client, killing
        any that outlives CLIENT_TIMEOUT.  With ``kill`` (a scenario failed), kills them at
        once instead: clients still waiting for ``go`` must not start publishing.
        """
        if not kill:
            self.go.set()
        for proc in self.procs:
            if kill and proc.is_alive():
                proc.kill()
            proc.join(CLIENT_TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs = []
