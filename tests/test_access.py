"""Access control with --users: tokens, permissions, deadlines."""
import json

import pytest
from conftest import Wire, publish_line

from ciphermq import access


@pytest.fixture
def users_file(tmp_path):
    """alice publishes to default_exchange; bob consumes default_queue; root configures."""
    path = tmp_path / "users.json"
    tokens = {
        "alice": access.add_user(str(path), "alice", ["default_exchange"], [], False),
        "bob": access.add_user(str(path), "bob", [], ["default_queue"], False),
        "root": access.add_user(str(path), "root", ["*"], ["*"], True),
    }
    return path, tokens


@pytest.fixture
def secured(start_server, users_file):
    path, tokens = users_file
    return start_server(users_file=str(path)), tokens


def login(server, name, token):
    client = Wire(server.address)
    assert client.call("auth %s %s" % (name, token)) == "AUTH_OK"
    return client


def test_tokens_are_stored_hashed_only(users_file):
    """The users file holds no token, only salted hashes, and is private (0600)."""
    path, tokens = users_file
    text = path.read_text()
    assert all(token not in text for token in tokens.values())
    assert path.stat().st_mode & 0o777 == 0o600


def test_permissions_are_enforced_per_principal(secured):
    """Each principal may do what it lists and nothing else; refusals change nothing."""
    server, tokens = secured
    alice = login(server, "alice", tokens["alice"])
    bob = login(server, "bob", tokens["bob"])
    root = login(server, "root", tokens["root"])
    try:
        assert alice.call(publish_line("acl-1").strip()) == "ACK acl-1"
        assert alice.call("consume default_queue") == \
            "Error: not allowed: alice may not consume from queue 'default_queue'"
        assert alice.call("declare_queue sneaky") == \
            "Error: not allowed: alice may not declare or bind"
        assert bob.call(publish_line("acl-2").strip()) == \
            "Error: not allowed: bob may not publish to exchange 'default_exchange'"
        assert bob.call("fetch default_queue").startswith("Message: acl-1 ")
        assert bob.call("ack acl-1") == "ACK_CONFIRMED acl-1"
        assert alice.call("stats").startswith("Error: not allowed")
        stats = json.loads(root.call("stats"))
        assert "sneaky" not in stats["queues"]
        assert stats["totals"]["published"] == 1
    finally:
        for client in (alice, bob, root):
            client.close()


@pytest.mark.parametrize("line", ["auth alice wrong-token", "auth mallory whatever",
                                  "auth alice", "ping", "publish default_exchange default_key {}"])
def test_anything_but_a_correct_auth_first_is_refused_and_closed(secured, line):
    """Without a correct 'auth' first line the client gets one error and is disconnected."""
    server, _ = secured
    client = Wire(server.address)
    try:
        assert client.call(line).startswith("Error: ")
        assert client.closed_by_peer() == b""
    finally:
        client.close()


def test_authentication_has_a_deadline(start_server, users_file):
    """A client that never authenticates is dropped at the auth deadline."""
    path, _ = users_file
    server = start_server(users_file=str(path), auth_timeout=0.3)
    client = Wire(server.address)
    try:
        assert client.closed_by_peer() == b""
    finally:
        client.close()


def test_auth_is_refused_when_access_control_is_off(connect):
    """Without --users, 'auth' is an error rather than a false promise of security."""
    assert connect().call("auth alice token") == \
        "Error: authentication is not enabled on this broker"


def test_unknown_and_known_names_take_the_same_path(users_file):
    """An unknown name is checked against a decoy hash, so it is not told apart by work done."""
    path, tokens = users_file
    users = access.Users.load(str(path))
    calls = []
    original = access.hash_token
    access.hash_token = lambda salt, token: (calls.append(salt), original(salt, token))[1]
    try:
        assert users.authenticate("mallory", "x") is None
        assert users.authenticate("alice", "x") is None
        assert users.authenticate("alice", tokens["alice"]).name == "alice"
    finally:
        access.hash_token = original
    assert len(calls) == 3


def test_access_cli_adds_a_user(tmp_path, capsys):
    """python -m ciphermq.access add prints a token once and stores its hash."""
    path = tmp_path / "u.json"
    assert access.main(["add", str(path), "carol", "--publish", "ex", "--configure"]) == 0
    token = capsys.readouterr().out.rsplit(" ", 1)[1].strip()
    principal = access.Users.load(str(path)).authenticate("carol", token)
    assert principal.name == "carol" and principal.configure


def test_access_add_explains_every_argument():
    """`python -m ciphermq.access add --help` says what each argument is for (a newcomer's
    first look at the users file), not just its name."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "ciphermq.access", "add", "--help"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for words in ("the users file the broker reads with --users", "the user's name",
                  "may publish to EXCHANGE", "may consume and fetch from QUEUE",
                  "may declare and bind", "may purge"):
        assert words in " ".join(done.stdout.split()), words
