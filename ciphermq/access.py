"""Who may do what: principals, the users file, and token checks.

Access control is off by default (the design document's broker trusts
everyone on loopback) and on with ``--users FILE``.  Then every connection
must first become a principal, either

* with its first line ``auth <name> <token>`` (answered ``AUTH_OK``), or
* with a TLS client certificate, verified against ``--tls-client-ca``, whose
  commonName is a user's name;

and each principal may only publish to the exchanges it lists, consume (and
so fetch, ack and nack) from the queues it lists, declare or bind only if
it may ``configure``, and purge, requeue dead letters or peek only if it is
``admin``.  Anything else is answered ``Error: not allowed ...``
and changes nothing.

The users file is JSON; tokens are stored only as salted SHA-256 hashes.
Tokens are 256-bit random strings made by ``python -m ciphermq.access add``,
so a slow password hash would add nothing: nobody can guess one.  Checks
compare digests with ``hmac.compare_digest`` (constant time), and an unknown
name costs the same work as a known one::

    {"users": [{"name": "alice", "salt": "<hex>", "token_sha256": "<hex>",
                "publish": ["default_exchange"], "consume": ["default_queue"],
                "configure": false, "admin": false}]}

``"*"`` in a list means every exchange or queue.
"""
import argparse
import hashlib
import hmac
import json
import os
import secrets
import sys

from . import files
from .errors import NotAllowed

ANY = "*"


class Principal:
    """An authenticated client and its permissions."""

    def __init__(self, name, publish=(), consume=(), configure=False, admin=False):
        self.name = name
        self.publish = frozenset(publish)
        self.consume = frozenset(consume)
        self.configure = bool(configure)
        self.admin = bool(admin)

    def check_publish(self, exchange):
        if ANY not in self.publish and exchange not in self.publish:
            raise NotAllowed("not allowed: %s may not publish to exchange '%s'"
                             % (self.name, exchange))

    def check_consume(self, queue):
        if ANY not in self.consume and queue not in self.consume:
            raise NotAllowed("not allowed: %s may not consume from queue '%s'"
                             % (self.name, queue))

    def check_configure(self):
        if not self.configure:
            raise NotAllowed("not allowed: %s may not declare or bind" % self.name)

    def check_admin(self):
        """The ``admin`` right: purge, requeue_dead and peek (ciphermq-admin)."""
        if not self.admin:
            raise NotAllowed("not allowed: %s may not administer queues" % self.name)


#: Everybody, when access control is off.
ANONYMOUS = Principal("anonymous", [ANY], [ANY], configure=True, admin=True)


def hash_token(salt, token):
    return hashlib.sha256(bytes.fromhex(salt) + token.encode("utf-8")).hexdigest()


class Users:
    """The users file, loaded once at start."""

    def __init__(self, entries):
        self._entries = {entry["name"]: entry for entry in entries}
        # Stand-in for unknown names, so that they cost the same as known ones.
        self._decoy = {"salt": secrets.token_hex(16), "token_sha256": secrets.token_hex(32)}

    @classmethod
    def load(cls, path):
        """Read a users file; ValueError (saying what is wrong) if it is malformed."""
        with open(path, encoding="utf-8") as file:
            try:
                document = json.load(file)
            except ValueError as exc:
                raise ValueError("%s is not valid JSON: %s" % (path, exc)) from None
        entries = document.get("users") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError('%s must hold {"users": [...]}' % path)
        for entry in entries:
            missing = {"name", "salt", "token_sha256"} - set(entry)
            if missing:
                raise ValueError("%s: a user lacks %s" % (path, ", ".join(sorted(missing))))
        return cls(entries)

    def authenticate(self, name, token):
        """The principal for a correct ``name``/``token`` pair, else None."""
        entry = self._entries.get(name, self._decoy)
        digest = hash_token(entry["salt"], token)
        if hmac.compare_digest(digest, entry["token_sha256"]) and entry is not self._decoy:
            return self._principal(entry)
        return None

    def by_certificate(self, common_name):
        """The principal a verified TLS client certificate names, else None."""
        entry = self._entries.get(common_name)
        return self._principal(entry) if entry is not None else None

    @staticmethod
    def _principal(entry):
        return Principal(entry["name"], entry.get("publish", ()), entry.get("consume", ()),
                         entry.get("configure", False), entry.get("admin", False))


# -- python -m ciphermq.access: manage a users file -----------------------------

def add_user(path, name, publish, consume, configure, admin=False):
    """Add (or replace) a user with a fresh token; return the token (shown once)."""
    document = {"users": []}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    token = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    users = [entry for entry in document["users"] if entry["name"] != name]
    users.append({"name": name, "salt": salt, "token_sha256": hash_token(salt, token),
                  "publish": publish, "consume": consume, "configure": configure,
                  "admin": admin})
    document["users"] = users
    # 0600, via <path>.tmp opened exclusively: a planted <path>.tmp symlink is refused.
    files.replace_atomically(path, json.dumps(document, indent=2).encode("utf-8"))
    return token


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ciphermq.access",
                                     description="Manage a CipherMQ users file.")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a user and print its new token")
    add.add_argument("file", help="the users file the broker reads with --users (created 0600 "
                                  "if missing)")
    add.add_argument("name", help="the user's name, as given to `auth` or a client's --auth")
    add.add_argument("--publish", action="append", default=[], metavar="EXCHANGE",
                     help="may publish to EXCHANGE (repeat for more; * for every exchange)")
    add.add_argument("--consume", action="append", default=[], metavar="QUEUE",
                     help="may consume and fetch from QUEUE (repeat for more; * for every queue)")
    add.add_argument("--configure", action="store_true", help="may declare and bind")
    add.add_argument("--admin", action="store_true",
                     help="may purge, requeue dead letters and peek (ciphermq-admin)")
    args = parser.parse_args(argv)
    try:
        token = add_user(args.file, args.name, args.publish, args.consume, args.configure,
                         args.admin)
    except FileExistsError as exc:
        print("Error: %s already exists (left by an interrupted run, or planted): it is not "
              "followed or overwritten; remove it and try again" % exc.filename, file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print("Error: cannot update %s: %s" % (args.file, exc), file=sys.stderr)
        return 1
    print("🔐 [ACCESS] %s added to %s; token (shown once): %s" % (args.name, args.file, token))
    return 0


if __name__ == "__main__":
    sys.exit(main())
