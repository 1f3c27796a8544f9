"""Private RabbitMQ nodes and clusters on loopback, for tests, benchmarks and demos.

A :class:`Cluster` of one or more nodes runs Debian's ``rabbitmq-server`` without
systemd and shares nothing with a system RabbitMQ or with our broker (which owns
port 5672):

* its state lives under one directory: the shared HOME (hence one Erlang cookie,
  which every member of a cluster needs), and per node its config, Mnesia
  database, logs and pid file; ``cluster.json`` there records the nodes, ports and
  every process id we started;
* its own ``epmd`` on its own port, so nothing of anyone else's is touched;
* node names ``<prefix><n>@localhost``; AMQP and Erlang distribution ports on
  127.0.0.1, chosen by the caller or picked free below the kernel's ephemeral range.

Nodes after the first join it at boot (peer discovery from the config file), so
the cluster forms without ``rabbitmqctl join_cluster``.  Started again on the same
directory, the nodes boot together from their databases: queues and messages
survive a stop and start.  It works as root: the
``/usr/sbin`` wrapper would ``su`` to the ``rabbitmq`` user, so the real script in
``/usr/lib/rabbitmq/bin`` is run directly with HOME in our directory.

Stopping is by process id only: ``rabbitmqctl stop`` for a graceful stop of our
node name, then SIGKILL to the pids recorded in ``cluster.json`` -- each checked to
still be the process we started (its command line names our directory) -- so a
recycled pid or a system RabbitMQ is never touched.

Readiness is an AMQP login through pika (so pika must be installed) answered by
the node's own process: the one holding the socket that listens on its port.
"""
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

from .errors import RabbitMQUnavailable
from .ports import free_ports

log = logging.getLogger(__name__)

SCRIPTS_DIR = "/usr/lib/rabbitmq/bin"
SERVER_SCRIPT = os.path.join(SCRIPTS_DIR, "rabbitmq-server")
CTL_SCRIPT = os.path.join(SCRIPTS_DIR, "rabbitmqctl")
EPMD = shutil.which("epmd") or "/usr/bin/epmd"
INSTALL_HINT = ("install it with 'make cluster' or, as root, "
                "'apt-get install -y rabbitmq-server' and 'pip install -e .[amqp]'")

START_TIMEOUT = 90.0    # seconds for a node to accept an AMQP login
STOP_TIMEOUT = 30.0     # seconds for a graceful stop before SIGKILL
READY_POLL = 0.2        # seconds between login attempts, spent waiting on the node's exit
STATE_FILE = "cluster.json"

CONFIG_TEMPLATE = """\
listeners.tcp.1 = 127.0.0.1:{port}
loopback_users.guest = true
log.console = false
log.file.level = warning
cluster_formation.peer_discovery_backend = classic_config
{peers}
"""


def check_installed():
    """Raise :class:`RabbitMQUnavailable` unless rabbitmq-server, epmd and pika are present."""
    for path in (SERVER_SCRIPT, CTL_SCRIPT, EPMD):
        if not os.access(path, os.X_OK):
            raise RabbitMQUnavailable("%s not found: %s" % (path, INSTALL_HINT))
    try:
        import pika  # noqa: F401  (only checking that it is importable)
    except ImportError:
        raise RabbitMQUnavailable("pika is not installed: %s" % INSTALL_HINT) from None


class Node:
    """One member: its name, ports, files and processes.  Started by its :class:`Cluster`."""

    def __init__(self, cluster, index, port, dist_port):
        self.cluster = cluster
        self.index = index
        self.name = "%s%d@localhost" % (cluster.prefix, index)
        self.port = port
        self.dist_port = dist_port
        self.directory = os.path.join(cluster.directory, "node%d" % index)
        self.pid_file = os.path.join(self.directory, "beam.pid")
        self.server = None          # the Popen of the rabbitmq-server script, when ours
        self.wrapper_pid = None
        self.beam_pid = None

    @property
    def url(self):
        return "amqp://guest:guest@127.0.0.1:%d/" % self.port

    def env(self):
        """The environment for rabbitmq-server and rabbitmqctl aimed at this node."""
        env = dict(os.environ)
        env.update({
            "HOME": self.cluster.home,
            "ERL_EPMD_PORT": str(self.cluster.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.directory, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(self.directory, "log"),
            "RABBITMQ_CONFIG_FILE": os.path.join(self.directory, "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(self.directory, "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.directory, "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(self.directory, "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": self.pid_file,
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def write_files(self):
        for sub in ("mnesia", "log"):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        peers = "\n".join("cluster_formation.classic_config.nodes.%d = %s" % (i, node.name)
                          for i, node in enumerate(self.cluster.nodes, 1))
        with open(os.path.join(self.directory, "rabbitmq.conf"), "w") as conf:
            conf.write(CONFIG_TEMPLATE.format(port=self.port, peers=peers))
        with open(os.path.join(self.directory, "enabled_plugins"), "w") as plugins:
            plugins.write("[].\n")

    def launch(self):
        """Start the node's process (does not wait for it)."""
        self.write_files()
        with open(os.path.join(self.directory, "server.out"), "ab") as out:
            self.server = subprocess.Popen(
                [SERVER_SCRIPT], cwd=self.directory, env=self.env(), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.wrapper_pid = self.server.pid

    def wait_ready(self, timeout=START_TIMEOUT):
        """Block until this node answers an AMQP login; raises RabbitMQUnavailable if the
        node exits first or ``timeout`` passes.

        A login counts only when the process that answered it is this node's: the
        Erlang VM named by its pid file holds the socket listening on its port.  A
        port another server holds would otherwise pass for this node being up.
        """
        import pika
        logging.getLogger("pika").setLevel(logging.CRITICAL)    # refusals while it boots
        params = pika.ConnectionParameters(
            host="127.0.0.1", port=self.port, connection_attempts=1, socket_timeout=2,
            blocked_connection_timeout=2)
        deadline = time.monotonic() + timeout
        while True:
            if _answers_login(params):
                beam_pid = self._recorded_pid()
                if beam_pid and _holds_listener(beam_pid, self.port):
                    self.beam_pid = beam_pid
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RabbitMQUnavailable("RabbitMQ node %s did not accept AMQP on port %d "
                                          "within %.0f s:\n%s"
                                          % (self.name, self.port, timeout, self.tail_output()))
            try:
                code = self.server.wait(timeout=min(READY_POLL, remaining))
            except subprocess.TimeoutExpired:
                continue
            raise RabbitMQUnavailable("RabbitMQ node %s exited with %s during start:\n%s"
                                      % (self.name, code, self.tail_output()))

    def _recorded_pid(self):
        """The Erlang VM's pid from the node's pid file (written early in its boot), or None."""
        try:
            with open(self.pid_file) as pid_file:
                return int(pid_file.read().strip())
        except (OSError, ValueError):
            return None

    def tail_output(self, limit=2000):
        try:
            with open(os.path.join(self.directory, "server.out"), "rb") as out:
                return out.read()[-limit:].decode(errors="replace")
        except OSError:
            return "(no output)"

    def kill(self):
        """SIGKILL the node's Erlang VM: a crash, no goodbye to clients or peers."""
        _kill_ours(self.beam_pid, self.cluster.directory)
        if self.server is not None:
            self.server.wait(STOP_TIMEOUT)
        _wait_gone(self.beam_pid, STOP_TIMEOUT)

    def stop(self):
        """Graceful stop via rabbitmqctl, waiting for our recorded pids to end; SIGKILL
        whichever of them is still there after STOP_TIMEOUT."""
        beam_pid = self.beam_pid or self._recorded_pid()    # a start that failed: its file
        alive = [pid for pid in (beam_pid, self.wrapper_pid)
                 if _is_ours(pid, self.cluster.directory)]
        if not alive:
            return
        try:
            subprocess.run([CTL_SCRIPT, "-n", self.name, "stop"], env=self.env(),
                           timeout=STOP_TIMEOUT, check=False, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            log.warning("rabbitmqctl could not stop node %s in time", self.name)
        if self.server is not None:         # ours since this process started it: reap it
            try:
                self.server.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        for pid in alive:
            if not _wait_gone(pid, STOP_TIMEOUT):
                log.warning("RabbitMQ node %s (pid %d) did not stop; killing it", self.name, pid)
                _kill_ours(pid, self.cluster.directory)
                _wait_gone(pid, STOP_TIMEOUT)
        if self.server is not None:
            self.server.wait(STOP_TIMEOUT)


class Cluster:
    """``size`` RabbitMQ nodes clustered on loopback, state under ``directory``.

    ``base_port`` gives node n the AMQP port ``base_port + n - 1``, and
    ``dist_base_port`` its Erlang distribution port likewise; ports not given
    are picked free, all different (:mod:`ciphermq.ports`).
    Use :meth:`start` and :meth:`stop`, or the :func:`running` context manager.
    """

    def __init__(self, directory, size=3, base_port=None, epmd_port=None, prefix="ciphermq",
                 dist_base_port=None):
        self.directory = os.path.abspath(directory)
        self.home = os.path.join(self.directory, "home")
        self.prefix = prefix
        fixed = [port for first, count in ((epmd_port, 1), (base_port, size),
                                           (dist_base_port, size))
                 if first for port in range(first, first + count)]
        if len(set(fixed)) < len(fixed):
            raise RabbitMQUnavailable("the ports given overlap: %s" % sorted(fixed))
        needed = (not epmd_port) + size * ((not base_port) + (not dist_base_port))
        picked = iter(free_ports(needed, taken=fixed))      # all different (ports.py)
        self.epmd_port = epmd_port or next(picked)
        self.epmd = None
        self.epmd_pid = None
        self.nodes = []
        for index in range(1, size + 1):
            port = base_port + index - 1 if base_port else next(picked)
            dist_port = dist_base_port + index - 1 if dist_base_port else next(picked)
            self.nodes.append(Node(self, index, port, dist_port))

    @property
    def urls(self):
        return [node.url for node in self.nodes]

    def start(self):
        """Start epmd, the first node, then the others in parallel; block until all log in.

        Raises RabbitMQUnavailable if anything is missing or a node does not
        come up within START_TIMEOUT (what was started is stopped again).
        """
        check_installed()
        if os.path.exists(os.path.join(self.directory, STATE_FILE)):
            raise RabbitMQUnavailable("%s already holds a cluster: stop it first"
                                      % self.directory)
        os.makedirs(self.home, exist_ok=True)
        cookie = os.path.join(self.home, ".erlang.cookie")
        if not os.path.exists(cookie):      # one cookie for all members, made before any boots
            with open(os.open(cookie, os.O_WRONLY | os.O_CREAT, 0o400), "w") as file:
                file.write(os.urandom(16).hex().upper())
        try:
            self._start_epmd()
            first, rest = self.nodes[0], self.nodes[1:]
            first.launch()
            if not self._restarting():      # a fresh first node forms the cluster alone
                first.wait_ready()
            for node in rest:
                node.launch()
            for node in self.nodes:
                node.wait_ready()
            self.save()
        except BaseException:
            self.stop()
            raise
        return self

    def revive(self):
        """Start again every node that is not running (one SIGKILLed, say); block until
        each logs in, then record the new pids.  Returns the nodes started.

        A member started again boots from its database and rejoins the others.
        Raises RabbitMQUnavailable if one does not come up within START_TIMEOUT.
        """
        dead = [node for node in self.nodes if not _is_ours(node.beam_pid, self.directory)]
        for node in dead:
            node.launch()
        for node in dead:
            node.wait_ready()
        if dead:
            self.save()
        return dead

    def _restarting(self):
        """True if the nodes have a database from an earlier run.

        Then they are all launched at once: a member that was not the last to
        stop waits at boot for the others, so starting it alone would hang.
        """
        return any(os.path.isdir(os.path.join(node.directory, "mnesia", node.name))
                   for node in self.nodes)

    def _start_epmd(self):
        self.epmd = subprocess.Popen(
            [EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, cwd=self.directory)
        self.epmd_pid = self.epmd.pid
        deadline = time.monotonic() + START_TIMEOUT
        while True:                 # wait for it to listen, so no node starts an epmd of its own
            try:
                socket.create_connection(("127.0.0.1", self.epmd_port), timeout=1).close()
                return
            except OSError:
                pass
            try:
                code = self.epmd.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise RabbitMQUnavailable(
                        "epmd did not listen on %d" % self.epmd_port) from None
                continue
            raise RabbitMQUnavailable("epmd exited with %s (port %d taken?)"
                                      % (code, self.epmd_port))

    def members(self):
        """The running members as the first node sees them (a rabbitmqctl call, ~1 s)."""
        node = self.nodes[0]
        out = subprocess.run([CTL_SCRIPT, "-n", node.name, "cluster_status", "--formatter",
                              "json"], env=node.env(), capture_output=True, text=True,
                             timeout=STOP_TIMEOUT, check=True).stdout
        return sorted(json.loads(out)["running_nodes"])

    def save(self):
        """Write ``cluster.json``: what :meth:`load` needs to stop exactly these processes."""
        state = {"directory": self.directory, "epmd_port": self.epmd_port,
                 "epmd_pid": self.epmd_pid, "prefix": self.prefix,
                 "nodes": [{"name": n.name, "port": n.port, "dist_port": n.dist_port,
                            "url": n.url, "wrapper_pid": n.wrapper_pid,
                            "beam_pid": n.beam_pid} for n in self.nodes]}
        path = os.path.join(self.directory, STATE_FILE)
        with open(path + ".tmp", "w") as file:
            json.dump(state, file, indent=2)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, directory):
        """The cluster recorded in ``directory/cluster.json`` (to stop it); OSError if none."""
        with open(os.path.join(directory, STATE_FILE)) as file:
            state = json.load(file)
        cluster = cls.__new__(cls)
        cluster.directory = state["directory"]
        cluster.home = os.path.join(cluster.directory, "home")
        cluster.prefix = state["prefix"]
        cluster.epmd_port, cluster.epmd_pid, cluster.epmd = state["epmd_port"], \
            state["epmd_pid"], None
        cluster.nodes = []
        for index, entry in enumerate(state["nodes"], 1):
            node = Node(cluster, index, entry["port"], entry["dist_port"])
            node.wrapper_pid, node.beam_pid = entry["wrapper_pid"], entry["beam_pid"]
            cluster.nodes.append(node)
        return cluster

    def stop(self, remove=False):
        """Stop every node (in parallel), then epmd; only our recorded pids are touched.

        Safe to call twice and after a failed start.  ``remove`` deletes the
        directory afterwards; otherwise only ``cluster.json`` goes.
        """
        threads = [threading.Thread(target=node.stop, name="stop-%s" % node.name)
                   for node in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(STOP_TIMEOUT * 2)
        _kill_ours(self.epmd_pid, self.directory, sig=signal.SIGTERM)
        if self.epmd is not None:
            try:
                self.epmd.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill_ours(self.epmd_pid, self.directory)
        _wait_gone(self.epmd_pid, STOP_TIMEOUT)
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.directory, STATE_FILE))


@contextlib.contextmanager
def running(directory, size=1, **options):
    """A started :class:`Cluster` for the ``with`` block; stopped and removed afterwards."""
    cluster = Cluster(directory, size, **options)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop(remove=True)


# -- process ids ------------------------------------------------------------------------

def _is_ours(pid, directory):
    """True if ``pid`` is alive and was started by us: it runs in ``directory``."""
    if not pid:
        return False
    try:
        cwd = os.readlink("/proc/%d/cwd" % pid)
        with open("/proc/%d/environ" % pid, "rb") as file:
            environ = file.read()
    except OSError:
        return False
    return cwd.startswith(directory) or directory.encode() in environ


def _answers_login(params):
    import pika
    try:
        pika.BlockingConnection(params).close()
    except pika.exceptions.AMQPError:
        return False
    return True


def _holds_listener(pid, port):
    """True if process ``pid`` holds the socket listening on 127.0.0.1:``port``.

    Linux lists every TCP socket in /proc/net/tcp, a listening one (state 0A)
    with its inode; /proc/<pid>/fd links to ``socket:[inode]`` for each socket
    the process holds.  The address there is in the machine's byte order.
    """
    address = "%08X:%04X" % (struct.unpack("=I", socket.inet_aton("127.0.0.1"))[0], port)
    try:
        with open("/proc/net/tcp") as table:
            listening = {"socket:[%s]" % fields[9] for fields in map(str.split, table)
                         if fields[1] == address and fields[3] == "0A"}
        descriptors = os.listdir("/proc/%d/fd" % pid)
    except OSError:                     # no /proc, or the process is gone
        return False
    for descriptor in descriptors:
        with contextlib.suppress(OSError):      # closed since the listing
            if os.readlink("/proc/%d/fd/%s" % (pid, descriptor)) in listening:
                return True
    return False


def _kill_ours(pid, directory, sig=signal.SIGKILL):
    if _is_ours(pid, directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pid, timeout):
    """Block until process ``pid`` (not necessarily our child) has exited, up to ``timeout``."""
    if not pid:
        return True
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, AttributeError, OSError):
        return True         # gone already (or no pidfd: nothing better than not waiting)
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)
