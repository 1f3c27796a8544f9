"""bin/cluster.py (make cluster / cluster-stop) as a process, on one node to stay quick."""
import json
import os
import subprocess
import sys

import pytest
from rabbitmq import unavailable
from scripts import REPO

from ciphermq import rabbitmq_nodes
from ciphermq.ports import free_ports

SCRIPT = str(REPO / "bin" / "cluster.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=240)


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"      # a zombie has exited
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stop_ends_exactly_the_processes_start_recorded(tmp_path):
    """start leaves a node running with its pids in cluster.json; stop ends those and only
    those -- a stranger's pid written into the file survives."""
    try:
        rabbitmq_nodes.check_installed()
    except rabbitmq_nodes.RabbitMQUnavailable as exc:
        unavailable(str(exc))
    directory = tmp_path / "cluster"
    base, dist, epmd = free_ports(3)
    started = run("start", "--dir", str(directory), "--size", "1", "--base-port", str(base),
                  "--dist-port", str(dist), "--epmd-port", str(epmd))
    assert started.returncode == 0, started.stdout + started.stderr
    assert "amqp://guest:guest@127.0.0.1:%d/" % base in started.stdout
    state = json.loads((directory / "cluster.json").read_text())
    ours = [state["epmd_pid"], state["nodes"][0]["beam_pid"], state["nodes"][0]["wrapper_pid"]]
    assert all(alive(pid) for pid in ours)
    stranger = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                stdin=subprocess.PIPE)
    try:
        state["nodes"][0]["beam_pid"] = stranger.pid        # a recycled pid, say
        (directory / "cluster.json").write_text(json.dumps(state))
        stopped = run("stop", "--dir", str(directory))
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert stranger.poll() is None, "stop killed a process it had not started"
        assert not any(alive(pid) for pid in ours if pid != stranger.pid)
    finally:
        stranger.stdin.close()
        stranger.wait(30)
    again = run("stop", "--dir", str(directory))
    assert again.returncode == 1 and "no cluster recorded" in again.stderr
    assert not os.path.exists(directory / "cluster.json")
