"""TLS transport: encrypted wire, TLS 1.2+, mutual TLS naming the principal."""
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import WAIT, Wire, publish_line
from scripts import require_openssl

from ciphermq import access

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A throwaway CA with server, alice and mallory certificates, made by bin/certs.py."""
    require_openssl()               # skips without openssl; under CI=true, fails
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([sys.executable, str(REPO / "bin" / "certs.py"), "--out-dir", str(out),
                    "--client", "alice"], check=True, capture_output=True, timeout=60)
    rogue = tmp_path_factory.mktemp("rogue")       # a different CA entirely
    subprocess.run([sys.executable, str(REPO / "bin" / "certs.py"), "--out-dir", str(rogue),
                    "--client", "alice"], check=True, capture_output=True, timeout=60)
    return out, rogue


def client_context(certs_dir, name=None):
    context = ssl.create_default_context(cafile=str(certs_dir / "ca.pem"))
    if name:
        context.load_cert_chain(str(certs_dir / ("%s.pem" % name)),
                                str(certs_dir / ("%s.key" % name)))
    return context


def tls_server(start_server, certs_dir, **extra):
    return start_server(tls_cert=str(certs_dir / "server.pem"),
                        tls_key=str(certs_dir / "server.key"), **extra)


def test_publish_and_consume_over_tls(start_server, certs):
    """The whole protocol works over TLS, pushes and replies interleaved on one connection."""
    out, _ = certs
    server = tls_server(start_server, out)
    sender = Wire(server.address, tls=client_context(out))
    receiver = Wire(server.address, tls=client_context(out))
    try:
        assert receiver.call("consume default_queue") == "Subscribed to queue"
        sender.send("".join(publish_line("tls-%d" % i) for i in range(200)))
        for i in range(200):
            assert sender.text() == "ACK tls-%d" % i
        received = receiver.receive_and_ack(200)
        assert sorted(received) == sorted("tls-%d" % i for i in range(200))
        assert sender.sock.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        sender.close()
        receiver.close()


def test_plaintext_client_cannot_talk_to_a_tls_broker(start_server, certs):
    """A client speaking plain text to a TLS broker is dropped; nothing it sent is run."""
    out, _ = certs
    server = tls_server(start_server, out, auth_timeout=1.0)
    client = Wire(server.address)
    try:
        client.send(publish_line("plain-1"))
        assert client.closed_by_peer() == b"Error: the broker expects TLS: pass --tls-ca\n"
    finally:
        client.close()
    check = Wire(server.address, tls=client_context(out))
    try:
        assert json.loads(check.call("stats"))["totals"]["published"] == 0
    finally:
        check.close()


def old_version_client(certs_dir):
    """A client that offers only TLS 1.0 and 1.1, and at security level 0, so that OpenSSL 3
    really sends them (at its default level it would not offer them at all)."""
    context = client_context(certs_dir)
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def old_version_handshake(address, certs_dir):
    """The negotiated version (``"TLSv1.1"``...) of an old-version client, or the error."""
    raw = socket.create_connection(address, timeout=WAIT)
    try:
        with old_version_client(certs_dir).wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.version()
    except (ssl.SSLError, ConnectionError) as exc:
        return exc
    finally:
        raw.close()


@pytest.fixture
def old_versions_work(certs):
    """Positive control: the old-version client completes a handshake with a server that
    allows TLS 1.0 -- else this OpenSSL build cannot offer TLS <= 1.1 at all, and a refusal
    by the broker would prove nothing (skipped then; under CI=true, failed)."""
    out, _ = certs
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.load_cert_chain(str(out / "server.pem"), str(out / "server.key"))
    listener = socket.create_server(("127.0.0.1", 0))
    served = threading.Event()

    def serve_one():
        conn, _ = listener.accept()
        try:
            with permissive.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass                    # the client reports what happened
        finally:
            conn.close()
            served.set()
    thread = threading.Thread(target=serve_one, name="test-permissive-tls", daemon=True)
    thread.start()
    try:
        result = old_version_handshake(listener.getsockname(), out)
    finally:
        served.wait(WAIT)
        listener.close()
        thread.join(WAIT)
    if result not in ("TLSv1", "TLSv1.1"):
        reason = ("this OpenSSL build (%s) cannot offer TLS 1.0/1.1 even at @SECLEVEL=0 (%s): "
                  "the broker's TLS 1.2 floor cannot be tried by a handshake here"
                  % (ssl.OPENSSL_VERSION, result))
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: fix the image or drop the claim)")
        pytest.skip(reason)
    return result


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_1_is_refused(start_server, certs, old_versions_work):
    """TLS older than 1.2 cannot connect, tried with a client that really offers TLS 1.0 and
    1.1 -- one the positive control saw connect to a server that allows them."""
    out, _ = certs
    server = tls_server(start_server, out)
    result = old_version_handshake(server.address, out)
    assert isinstance(result, (ssl.SSLError, ConnectionError)), \
        "the broker accepted %s (the positive control got %s)" % (result, old_versions_work)


def test_mutual_tls_names_the_principal(start_server, certs, tmp_path):
    """With --tls-client-ca, a client certificate's name logs the client in without a token."""
    out, _ = certs
    users = tmp_path / "users.json"
    access.add_user(str(users), "alice", ["default_exchange"], [], False)
    server = tls_server(start_server, out, tls_client_ca=str(out / "ca.pem"),
                        users_file=str(users))
    client = Wire(server.address, tls=client_context(out, "alice"))
    try:
        assert client.call(publish_line("mtls-1").strip()) == "ACK mtls-1"
        assert client.call("declare_queue nope").startswith("Error: not allowed: alice")
    finally:
        client.close()


def test_mutual_tls_refuses_missing_or_foreign_certificates(start_server, certs):
    """Without a certificate from the trusted CA, the handshake fails."""
    out, rogue = certs
    server = tls_server(start_server, out, tls_client_ca=str(out / "ca.pem"))
    for context in (client_context(out), client_context(out, None)):
        client = Wire(server.address, tls=context)
        try:                # TLS 1.3 reports a missing client certificate after the handshake
            with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
                client.call("ping")
        finally:
            client.close()
    foreign = client_context(out)
    foreign.load_cert_chain(str(rogue / "alice.pem"), str(rogue / "alice.key"))
    client = Wire(server.address, tls=foreign)
    try:
        with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
            client.call("ping")
    finally:
        client.close()


def test_a_plain_sender_against_a_tls_broker_is_told_to_pass_tls_ca(start_server, certs,
                                                                     tmp_path):
    """A Sender without --tls-ca against a TLS broker says "the broker expects TLS: pass
    --tls-ca" (the broker's answer to a plaintext first line), exit 1, no traceback."""
    out, _ = certs
    server = tls_server(start_server, out)
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, str(REPO / "bin" / "RSA.py"), "--out-dir", str(keys),
                    "--bits", "1024"], check=True, capture_output=True, timeout=60)
    result = subprocess.run(
        [sys.executable, str(REPO / "bin" / "Sender.py"), "--port", str(server.address[1]),
         "--public-key", str(keys / "receiver_public.pem"), "--ack-timeout", "2",
         "--outbox", str(tmp_path / "pending.json")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "the broker expects TLS: pass --tls-ca" in result.stdout
    assert "Traceback" not in result.stderr


def test_a_tls_sender_against_a_plain_broker_is_told_to_drop_tls_ca(start_server, certs,
                                                                    tmp_path):
    """A Sender with --tls-ca against a plain broker says the broker does not use TLS and
    what to do, exit 1, no traceback."""
    out, _ = certs
    server = start_server()
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, str(REPO / "bin" / "RSA.py"), "--out-dir", str(keys),
                    "--bits", "1024"], check=True, capture_output=True, timeout=60)
    result = subprocess.run(
        [sys.executable, str(REPO / "bin" / "Sender.py"), "--port", str(server.address[1]),
         "--public-key", str(keys / "receiver_public.pem"), "--tls-ca", str(out / "ca.pem"),
         "--ack-timeout", "2", "--outbox", str(tmp_path / "pending.json")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "the broker does not use TLS: connect without --tls-ca" in result.stdout
    assert "Traceback" not in result.stderr
