"""bin/RSA.py, run as a process the way a user runs it."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import Crypto
from scripts import load_script

from ciphermq import crypto
from ciphermq import keys as keyfiles

REPO = Path(__file__).resolve().parent.parent


def run(*args, cwd=REPO, script="bin/RSA.py", python_options=(), env=None):
    """Run the script as a user would: from the repository root unless told otherwise."""
    return subprocess.run([sys.executable, *python_options, str(script), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_a_usable_key_pair(tmp_path):
    """RSA.py writes receiver_private.pem (0600) and receiver_public.pem, and says so."""
    result = run("--out-dir", tmp_path, "--bits", 1024)
    assert result.returncode == 0, result.stderr
    private_path = tmp_path / "receiver_private.pem"
    public_path = tmp_path / "receiver_public.pem"
    assert "🔑 [RSA] Wrote %s (mode 600" % private_path in result.stdout
    assert mode(private_path) == 0o600
    envelope = crypto.encrypt_message_hybrid("hello", public_path)
    assert crypto.decrypt_message_hybrid(envelope, private_path) == "hello"


def test_refuses_to_overwrite_without_force(tmp_path):
    """A second run exits 1 and leaves the keys alone; --force replaces them."""
    assert run("--out-dir", tmp_path, "--bits", 1024).returncode == 0
    private_path = tmp_path / "receiver_private.pem"
    original = private_path.read_bytes()
    refused = run("--out-dir", tmp_path, "--bits", 1024)
    assert refused.returncode == 1
    assert "keys already exist (use --force)" in refused.stderr
    assert private_path.read_bytes() == original
    forced = run("--out-dir", tmp_path, "--bits", 1024, "--force")
    assert forced.returncode == 0, forced.stderr
    assert private_path.read_bytes() != original
    assert mode(private_path) == 0o600


def test_default_out_dir_is_the_checkouts_keys_where_the_scripts_look(tmp_path):
    """Without --out-dir the pair goes to the checkout's keys/, wherever the script is run
    from: where Sender.py and Receiver.py look by default."""
    result = run("--help", cwd=tmp_path, script=REPO / "bin" / "RSA.py")
    assert result.returncode == 0 and "keys/ of this checkout" in " ".join(result.stdout.split())
    assert load_script("RSA").parse_args([]).out_dir == REPO / "keys"


def test_runs_without_the_package_installed(tmp_path):
    """With site-packages (so the editable install) off, the script still finds ciphermq."""
    env = dict(os.environ, PYTHONPATH=str(Path(Crypto.__file__).resolve().parent.parent))
    probe = subprocess.run([sys.executable, "-S", "-c", "import ciphermq"], cwd=tmp_path,
                           env=env, capture_output=True, timeout=60, check=False)
    assert probe.returncode != 0                # the package really is out of reach...
    result = run("--out-dir", tmp_path, "--bits", 1024, python_options=["-S"], env=env)
    assert result.returncode == 0, result.stderr    # ...yet the script finds it
    assert (tmp_path / "receiver_private.pem").exists()


def test_signing_pair_for_a_sender(tmp_path):
    """--signing NAME writes NAME.key (0600) and NAME.pub, which load as a trust list."""
    result = run("--out-dir", tmp_path, "--signing", "alice")
    assert result.returncode == 0, result.stderr
    assert mode(tmp_path / "alice.key") == 0o600
    assert set(keyfiles.load_trusted_senders(tmp_path)) == {"alice"}
    assert keyfiles.load_signing_key(tmp_path / "alice.key").has_private()
    assert not (tmp_path / "receiver_private.pem").exists()
    assert run("--out-dir", tmp_path, "--signing", "alice").returncode == 1


def test_bad_arguments_exit_2(tmp_path):
    """An invalid --bits or sender name is a usage error (exit 2) and writes nothing."""
    assert run("--out-dir", tmp_path, "--bits", 1000).returncode == 2
    assert run("--out-dir", tmp_path, "--signing", "../evil").returncode == 2
    assert list(tmp_path.iterdir()) == []
