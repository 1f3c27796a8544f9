"""Start and stop a private redis-server for the benchmark comparison (the second peer).

``private_redis(durable)`` runs Debian's ``redis-server`` as a throw-away process that shares
nothing with a system Redis: its own port on 127.0.0.1 (picked free by binding to port 0), its
own working directory in a temporary directory that is removed afterwards, no RDB snapshots, and
either no append-only file (``durable=False``) or ``appendonly yes`` with ``appendfsync always``
(``durable=True``: every write is fsynced before Redis answers it, the like-for-like setting for
CipherMQ's journal).  It is started as a child process (``--daemonize no``) and stopped by its
PID: SIGTERM, then SIGKILL after STOP_TIMEOUT.

Install with ``make bench-peer-install`` (``apt-get install redis-server``; redis-py from the
``bench`` extra).  In a container ``policy-rc.d`` stops the package from starting the system
server; elsewhere the system one keeps port 6379 and does not disturb this one.
"""
import contextlib
import os
import shutil
import subprocess
import tempfile
import time

from ciphermq.ports import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 30.0        # seconds for the server to answer PING
STOP_TIMEOUT = 10.0         # seconds for SIGTERM before SIGKILL
POLL_INTERVAL = 0.05        # seconds between PING attempts (spent waiting on the process)


class RedisUnavailable(RuntimeError):
    """redis-server (or redis-py, needed to talk to it) is missing or did not start."""


def check_installed():
    """Raise :class:`RedisUnavailable` unless redis-server and redis-py are present."""
    if not os.access(REDIS_SERVER, os.X_OK):
        raise RedisUnavailable(f"{REDIS_SERVER} not found: run 'make bench-peer-install' "
                               "(as root: apt-get install redis-server)")
    try:
        import redis  # noqa: F401  (only checking that it is importable)
    except ImportError:
        raise RedisUnavailable("redis-py is not installed: run 'make bench-peer-install'") \
            from None


def version():
    """``redis-server --version``'s ``v=`` field, or None."""
    try:
        out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return None


def _arguments(port, directory, durable):
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
            "--daemonize", "no", "--save", "", "--protected-mode", "yes",
            "--logfile", os.path.join(directory, "redis.log"), "--loglevel", "warning",
            "--maxclients", "4096"]
    if durable:
        args += ["--appendonly", "yes", "--appendfsync", "always"]
    else:
        args += ["--appendonly", "no"]
    return args


def _wait_ready(server, port):
    """PING until it answers; between tries, wait on the server's exit.  Raises RedisUnavailable."""
    import redis

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with contextlib.closing(redis.Redis(host="127.0.0.1", port=port,
                                                socket_timeout=2)) as client:
                client.ping()
            return
        except redis.exceptions.ConnectionError:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RedisUnavailable(f"redis-server did not answer PING on {port}")
        try:
            code = server.wait(timeout=min(POLL_INTERVAL, remaining))
        except subprocess.TimeoutExpired:
            continue
        raise RedisUnavailable(f"redis-server exited with {code} during start")


def _stop(server):
    """SIGTERM the server by its PID, SIGKILL it if it outlives STOP_TIMEOUT; safe if gone."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def private_redis(durable=False):
    """Run a private redis-server for the duration of the ``with`` block.

    Yields ``{"host", "port", "pid", "durable"}``; ``pid`` is the redis-server process (for
    ``processes.rss_mib``).  Blocks up to START_TIMEOUT while starting; raises
    :class:`RedisUnavailable` if it is missing or fails to start.  The process and its files
    are gone when the block exits, however it exits.
    """
    check_installed()
    directory = tempfile.mkdtemp(prefix="bench-redis-")
    port = free_port()
    server = None
    try:
        server = subprocess.Popen(_arguments(port, directory, durable), cwd=directory,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_ready(server, port)
        yield {"host": "127.0.0.1", "port": port, "pid": server.pid, "durable": durable}
    finally:
        if server is not None:
            _stop(server)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    from processes import rss_mib

    with private_redis() as info:
        print("Redis up:", info, f"RSS {rss_mib(info['pid']):.1f} MiB")
