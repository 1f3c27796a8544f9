"""bin/demo.py (make demo): the whole system end to end, and it cleans up after itself."""
import os
import re
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
from conftest import WAIT
from scripts import DEMO, load_script

MESSAGES = load_script("demo").MESSAGES


def test_demo_delivers_its_messages_and_leaves_nothing_behind(keys, spawn, tmp_path):
    """The demo exits 0 after printing every message it sent, and leaves no file in its
    working directory nor its temporary directory."""
    demo = spawn([sys.executable, DEMO, "--keys", str(keys[0].parent)], cwd=str(tmp_path))
    assert demo.wait() == 0, demo.stdout + demo.stderr
    stored = demo.stdout.split("📜 [DEMO]", 1)[1]
    for message in MESSAGES:
        assert message in stored
    assert list(tmp_path.iterdir()) == [], "nothing written where the demo was run"
    output = re.search(r"already in (\S+received_messages\.json)", demo.stdout).group(1)
    assert not Path(output).parent.exists(), "the temporary directory is removed"


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_ctrl_c_stops_everything_the_demo_started(keys, spawn, tmp_path):
    """On SIGINT the demo stops its broker, receiver and sender before it exits."""
    demo = spawn([sys.executable, DEMO, "--keys", str(keys[0].parent), "--keep"],
                 cwd=str(tmp_path))
    port = int(demo.wait_for("🟢 [DEMO] Broker listening").rsplit(":", 1)[1])
    demo.proc.send_signal(signal.SIGINT)
    assert demo.wait() == 130
    workdir = re.search(r"Files kept in (\S+)", demo.stdout).group(1)
    try:
        leftovers = [p.name for p in Path("/proc").iterdir() if _runs_in(p, workdir)]
        assert leftovers == [], "children still running"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    finally:
        shutil.rmtree(workdir)


def _runs_in(proc_dir, workdir):
    """True if /proc/<pid> is a process whose working directory is ``workdir``."""
    try:
        return proc_dir.name.isdigit() and os.readlink(proc_dir / "cwd") == workdir
    except OSError:
        return False


def test_the_chaos_demo_says_where_to_look_on_its_dashboard(keys, spawn, tmp_path):
    """With --http-port the demo prints its broker's live dashboard URL and what to watch
    there under chaos, and the URL answers while the demo runs."""
    import urllib.request
    demo = spawn([sys.executable, DEMO, "--keys", str(keys[0].parent), "--count", "20",
                  "--http-port", "0", "--chaos", "drop-ack=0.3", "--chaos-seed", "1",
                  "--broker-arg=--redelivery-interval=1"], cwd=str(tmp_path))
    url = re.search(r"Dashboard: (http://\S+/)", demo.wait_for("📊 [DEMO] Dashboard:")).group(1)
    with urllib.request.urlopen(url + "api/stats", timeout=WAIT) as reply:
        assert "default_queue" in reply.read().decode()
    assert demo.wait() == 0, demo.stdout + demo.stderr
    assert "redelivered total" in demo.stdout
