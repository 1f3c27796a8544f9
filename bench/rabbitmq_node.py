"""Start and stop a private RabbitMQ node for the benchmark comparison (peer mode).

``private_rabbitmq()`` runs Debian's ``rabbitmq-server`` as a throw-away node that shares
nothing with a system RabbitMQ or with CipherMQ (which owns port 5672):

* its own node name (``bench<pid>@localhost``), AMQP port, distribution port and epmd port,
  all on 127.0.0.1 and all picked free by binding to port 0;
* its own HOME (so its own Erlang cookie), Mnesia, log, config and plugin files in a temporary
  directory that is removed afterwards;
* its own ``epmd``, started here as a child process, so stopping it cannot disturb anyone else.

It works as root: the ``/usr/sbin/rabbitmq-server`` wrapper would ``su`` to the ``rabbitmq``
user, so the real script in ``/usr/lib/rabbitmq/bin`` is run directly with HOME pointing at the
temporary directory; no ``RABBITMQ_ALLOW_INPUT`` and no cookie permission changes are needed.

Install on a fresh Debian machine with::

    DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server

(in a container ``policy-rc.d`` stops the package from starting the system node; elsewhere
the system node on 5672 should be stopped with ``systemctl stop rabbitmq-server`` first).
Readiness is checked with a real AMQP login through pika, so pika must be installed.
"""

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from processes import free_port

log = logging.getLogger(__name__)

SCRIPTS_DIR = "/usr/lib/rabbitmq/bin"
SERVER_SCRIPT = os.path.join(SCRIPTS_DIR, "rabbitmq-server")
CTL_SCRIPT = os.path.join(SCRIPTS_DIR, "rabbitmqctl")
EPMD = shutil.which("epmd") or "/usr/bin/epmd"

START_TIMEOUT = 60.0  # seconds for the node to accept an AMQP login
STOP_TIMEOUT = 30.0  # seconds for a graceful stop before SIGKILL
POLL_INTERVAL = 0.2  # seconds between readiness attempts (spent waiting on the server process)

# Loopback only; the default guest/guest login works because clients connect via 127.0.0.1.
CONFIG_TEMPLATE = """\
listeners.tcp.1 = 127.0.0.1:{port}
loopback_users.guest = true
log.console = false
log.file.level = warning
"""


class RabbitMQUnavailable(RuntimeError):
    """RabbitMQ (or pika, needed to talk to it) is not installed or did not start."""


def check_installed():
    """Raise :class:`RabbitMQUnavailable` unless rabbitmq-server, epmd and pika are present."""
    for path in (SERVER_SCRIPT, CTL_SCRIPT, EPMD):
        if not os.access(path, os.X_OK):
            raise RabbitMQUnavailable(
                f"{path} not found: run 'make bench-peer-install' (as root: apt-get install "
                "rabbitmq-server, pip install pika)")
    try:
        import pika  # noqa: F401  (only checking that it is importable)
    except ImportError:
        raise RabbitMQUnavailable(
            "pika is not installed: run 'make bench-peer-install'") from None


class _Node:
    """The files, ports and processes of one private node; ``start()`` then ``stop()``."""

    def __init__(self, port=None):
        self.tmpdir = tempfile.mkdtemp(prefix="bench-rabbitmq-")
        self.name = f"bench{os.getpid()}@localhost"
        self.port = port or free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.epmd = None
        self.server = None
        self.pid_file = os.path.join(self.tmpdir, "beam.pid")
        self.log_dir = os.path.join(self.tmpdir, "log")

    def env(self):
        """The environment for rabbitmq-server and rabbitmqctl (same HOME, so same cookie)."""
        home = os.path.join(self.tmpdir, "home")
        env = dict(os.environ)
        env.update({
            "HOME": home,
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.tmpdir, "mnesia"),
            "RABBITMQ_LOG_BASE": self.log_dir,
            "RABBITMQ_CONFIG_FILE": os.path.join(self.tmpdir, "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(self.tmpdir, "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.tmpdir, "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(self.tmpdir, "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": self.pid_file,
            # Keep Erlang distribution (used by rabbitmqctl) on loopback too.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def write_files(self):
        """Create HOME, the config (AMQP listener on loopback) and an empty plugin list."""
        for sub in ("home", "mnesia", "log"):
            os.makedirs(os.path.join(self.tmpdir, sub))
        with open(os.path.join(self.tmpdir, "rabbitmq.conf"), "w") as conf:
            conf.write(CONFIG_TEMPLATE.format(port=self.port))
        with open(os.path.join(self.tmpdir, "enabled_plugins"), "w") as plugins:
            plugins.write("[].\n")

    def start(self):
        """Start epmd and the node; return once an AMQP login succeeds.

        Blocks up to START_TIMEOUT; raises RabbitMQUnavailable if the node exits or times out.
        """
        self.write_files()
        env = self.env()
        self.epmd = subprocess.Popen(
            [EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        self.wait_epmd()
        with open(os.path.join(self.tmpdir, "server.out"), "wb") as out:
            self.server = subprocess.Popen(
                [SERVER_SCRIPT], cwd=self.tmpdir, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()

    def wait_epmd(self):
        """Block until our epmd accepts TCP connections, so the node registers with it.

        Without this the node could start a daemon epmd of its own on the same port. Between
        tries, waits on the epmd process's exit. Raises RabbitMQUnavailable after START_TIMEOUT.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.epmd_port), timeout=1).close()
                return
            except OSError:
                pass
            remaining = deadline - time.monotonic()
            try:
                code = self.epmd.wait(timeout=max(0.0, min(0.05, remaining)))
            except subprocess.TimeoutExpired:
                if remaining <= 0:
                    raise RabbitMQUnavailable(
                        f"epmd did not listen on {self.epmd_port}") from None
                continue
            raise RabbitMQUnavailable(f"epmd exited with {code}")

    def wait_ready(self):
        """Try an AMQP login until it works; between tries, wait on the server process's exit."""
        import pika

        params = pika.ConnectionParameters(
            host="127.0.0.1", port=self.port, connection_attempts=1, socket_timeout=2,
            blocked_connection_timeout=2)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                pika.BlockingConnection(params).close()
                return
            except pika.exceptions.AMQPError:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RabbitMQUnavailable(
                    f"RabbitMQ did not accept AMQP on port {self.port} within "
                    f"{START_TIMEOUT:.0f} s:\n{self.tail_output()}")
            try:
                code = self.server.wait(timeout=min(POLL_INTERVAL, remaining))
            except subprocess.TimeoutExpired:
                continue
            raise RabbitMQUnavailable(
                f"rabbitmq-server exited with {code} during start:\n{self.tail_output()}")

    def tail_output(self, limit=2000):
        """The last ``limit`` characters of the server's stdout/stderr, for error messages."""
        try:
            with open(os.path.join(self.tmpdir, "server.out"), "rb") as out:
                return out.read()[-limit:].decode(errors="replace")
        except OSError:
            return "(no output)"

    def beam_pid(self):
        """The pid of the Erlang VM (beam.smp), written by RabbitMQ to its pid file at boot."""
        with open(self.pid_file) as pid_file:
            return int(pid_file.read().strip())

    def stop(self):
        """Stop the node (rabbitmqctl stop, then SIGKILL), then epmd; remove the temp dir.

        Safe to call twice and after a failed start. Blocks up to about STOP_TIMEOUT * 2.
        """
        if self.server is not None and self.server.poll() is None:
            self.stop_server()
        self.server = None
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.terminate()
            try:
                self.epmd.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.epmd.kill()
                self.epmd.wait()
        self.epmd = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def stop_server(self):
        """Ask the node to halt via rabbitmqctl; kill its whole process group if that fails."""
        try:
            subprocess.run(
                [CTL_SCRIPT, "-n", self.name, "stop"], env=self.env(), timeout=STOP_TIMEOUT,
                check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            self.server.wait(timeout=STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            log.warning("RabbitMQ node %s did not stop in time; killing it", self.name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.server.pid, signal.SIGKILL)
        self.server.wait()


@contextlib.contextmanager
def private_rabbitmq(port=None):
    """Run a private RabbitMQ node for the duration of the ``with`` block.

    Yields a dict ``{"host", "port", "pid", "node", "wrapper_pid"}`` where ``pid`` is the
    beam.smp process (use it with ``processes.rss_mib``). Blocks up to START_TIMEOUT while
    starting; raises :class:`RabbitMQUnavailable` if RabbitMQ or pika is missing or the node
    fails to start. The node, its epmd and its files are gone when the block exits, however
    it exits.
    """
    check_installed()
    node = _Node(port)
    try:
        node.start()
        yield {"host": "127.0.0.1", "port": node.port, "pid": node.beam_pid(),
               "node": node.name, "wrapper_pid": node.server.pid}
    finally:
        node.stop()


if __name__ == "__main__":
    from processes import rss_mib

    with private_rabbitmq() as info:
        print("RabbitMQ up:", info, f"RSS {rss_mib(info['pid']):.1f} MiB")
