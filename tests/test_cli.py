"""The broker as a process: command line, port 0, signals, and the document's own clients."""
import json
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import WAIT, publish_line
from scripts import load_script

from ciphermq.config import ServerConfig

BIN = Path(__file__).resolve().parent.parent / "bin"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_broker_cleanly(broker_process, sig):
    """SIGTERM and SIGINT stop accepting, close connections and exit 0."""
    broker = broker_process("--log-level", "INFO")
    client = socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT)
    client.sendall(b"ping\n")
    assert client.recv(100) == b"PONG\n"
    assert broker.stop(sig) == 0
    assert client.recv(100) == b"", "open connections are closed on shutdown"
    client.close()
    assert "CipherMQ broker stopped" in broker.log
    assert "Traceback" not in broker.log


def test_options_are_applied(broker_process):
    """Limits given on the command line take effect: a longer line and a second message in a
    one-message queue are both refused."""
    broker = broker_process("--max-line-bytes", "256", "--max-queue-length", "1")
    client = socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT)
    with client, client.makefile("rb") as reader:
        client.sendall(b"x" * 300 + b"\n")
        assert reader.readline() == b"Error: line too long (max 256 bytes)\n"
        client.sendall(publish_line("q1").encode())
        assert reader.readline() == b"ACK q1\n"
        client.sendall(publish_line("q2").encode())
        assert reader.readline() == b"Error: queue 'default_queue' is full\n"
    assert broker.stop() == 0


def test_switch_interval_is_applied_to_the_broker_process(broker_process):
    """--switch-interval becomes the broker process's interpreter switch interval, and
    without it the broker runs with ServerConfig's default, not Python's 5 ms."""
    given = broker_process("--switch-interval", "0.0002")
    given.wait_for_log("Interpreter switch interval 0.2 ms")
    default = broker_process()
    default.wait_for_log("Interpreter switch interval %g ms"
                         % (ServerConfig().switch_interval * 1000))
    assert ServerConfig().switch_interval < 0.005
    assert given.stop() == 0 and default.stop() == 0


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "soon"])
def test_switch_interval_out_of_range_is_a_usage_error(value):
    """A switch interval that is not more than 0 and at most 1 s is refused with exit 2."""
    result = subprocess.run([sys.executable, "-m", "ciphermq.server", "--port", "0",
                             "--switch-interval", value],
                            capture_output=True, text=True, timeout=WAIT * 2)
    assert result.returncode == 2
    assert "--switch-interval" in result.stderr and "Traceback" not in result.stderr


def test_bad_arguments_exit_2():
    """An unknown option is a usage error, not a traceback."""
    result = subprocess.run([sys.executable, "-m", "ciphermq.server", "--bogus"],
                            capture_output=True, text=True, timeout=WAIT * 2)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_port_in_use_is_a_clear_error(broker_process):
    """A busy port gives one log line and exit status 1."""
    broker = broker_process()
    result = subprocess.run(
        [sys.executable, "-m", "ciphermq.server", "--port", str(broker.port)],
        capture_output=True, text=True, timeout=WAIT * 2)
    assert result.returncode == 1
    assert "Cannot start" in result.stderr and "Traceback" not in result.stderr


def test_the_documents_original_clients_work_untouched(broker_process):
    """Wire compatibility for one message: the original Sender's publish and its one recv for
    the ACK; the receiving side in full is in tests/test_legacy_clients.py."""
    broker = broker_process()
    address = ("127.0.0.1", broker.port)
    # The original Sender: one connection per message, send, one recv(1024), close.
    envelope = {"message_id": str(uuid.uuid4()), "enc_session_key": "a2V5",
                "nonce": "bm9uY2U=", "tag": "dGFn", "ciphertext": "Y2lwaGVy"}
    sender = socket.create_connection(address, timeout=WAIT)
    sender.send(("publish default_exchange default_key %s\n" % json.dumps(envelope)).encode())
    assert sender.recv(1024).decode().strip() == "ACK %s" % envelope["message_id"]
    sender.close()
    # The original Receiver: consume, recv the response, recv a message, ack, recv the answer.
    receiver = socket.create_connection(address, timeout=WAIT)
    receiver.send(b"consume default_queue\n")
    first = receiver.recv(1024).decode()
    assert first.startswith("Subscribed to queue\n")
    data = first[len("Subscribed to queue\n"):] or receiver.recv(1024).decode()
    prefix, message_id, body = data.strip().split(" ", 2)
    assert (prefix, message_id) == ("Message:", envelope["message_id"])
    assert {k: v for k, v in json.loads(body).items() if k != "delivery_count"} == envelope
    receiver.send(("ack %s\n" % message_id).encode())
    assert receiver.recv(1024).decode().strip() == "ACK_CONFIRMED %s" % message_id
    receiver.close()
    assert broker.stop() == 0


def test_console_script_is_installed():
    """`ciphermq-server` is on the venv's PATH and answers --help."""
    script = __import__("shutil").which("ciphermq-server",
                                        path=str(__import__("pathlib").Path(sys.executable).parent))
    assert script, "ciphermq-server console script not installed"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=WAIT * 2)
    assert result.returncode == 0 and "--redelivery-interval" in result.stdout


@pytest.mark.parametrize("script", ["Sender.py", "Receiver.py", "RSA.py"])
def test_a_script_without_pycryptodome_says_what_to_run(script, tmp_path):
    """Run by a Python that cannot import pycryptodome (-S -I: no site-packages), a script
    prints one line naming `make install` and the venv's python, exit 2, no traceback."""
    result = subprocess.run([sys.executable, "-S", "-I", str(BIN / script), "--help"],
                            capture_output=True, text=True, timeout=WAIT * 2, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "make install" in line and ".venv/bin/python bin/%s" % script in line


@pytest.mark.parametrize("script, option", [("Sender.py", "--public-key"),
                                            ("Receiver.py", "--private-key")])
def test_a_missing_key_names_its_option_and_make_keys(script, option, tmp_path):
    """A key file that is not there is one line naming the option and `make keys`, exit 2."""
    result = subprocess.run([sys.executable, str(BIN / script), option, "absent.pem"],
                            capture_output=True, text=True, timeout=WAIT * 2, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "make keys" in result.stderr and option in result.stderr


@pytest.mark.parametrize("script", ["Sender.py", "Receiver.py"])
def test_the_default_keys_are_found_from_any_directory(script, tmp_path):
    """The default key paths are the checkout's keys/, not relative to the working directory."""
    result = subprocess.run([sys.executable, str(BIN / script), "--help"],
                            capture_output=True, text=True, timeout=WAIT * 2, cwd=tmp_path)
    assert "keys/ of this checkout" in " ".join(result.stdout.split())
    module = load_script(script[:-3])
    args = module.parse_args([])
    key = args.public_key if script == "Sender.py" else args.private_key
    assert key.parent == BIN.parent / "keys"


@pytest.mark.parametrize("argv", [["bin/Sender.py", "--port", "99999"],
                                  ["bin/Receiver.py", "--port", "-1"],
                                  ["-m", "ciphermq.server", "--port", "65536"]])
def test_ports_outside_0_to_65535_are_refused_by_argparse(argv):
    """--port must be a TCP port: argparse refuses anything outside 0-65535, exit 2."""
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                            timeout=WAIT * 2, cwd=BIN.parent)
    assert result.returncode == 2 and "must be from 0 to 65535" in result.stderr
