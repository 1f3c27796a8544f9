"""Key files: the receiver's RSA pair, senders' Ed25519 pairs, the trusted senders.

``bin/RSA.py`` writes them; :mod:`ciphermq.crypto` reads them through the
functions here, and never touches a file itself.  A private key file is
created with mode 0600 from its first byte.  A key that cannot be read or is
not of the kind asked for raises :class:`~ciphermq.errors.KeyFileError`
(a ValueError); an existing file that would be overwritten raises
FileExistsError unless ``force``.
"""
import errno
import os
import re
from pathlib import Path

from Crypto.PublicKey import ECC, RSA

from .errors import KeyFileError, UsageError

#: Sender names: safe in JSON without escapes, and as ``<name>.pub`` file names.
SENDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def generate_rsa_key_pair(bits=2048):
    """Return a new ``(private_pem, public_pem)`` pair as bytes (PKCS#1 / SubjectPublicKeyInfo)."""
    key = RSA.generate(bits)
    return key.export_key(format="PEM"), key.public_key().export_key(format="PEM")


def write_rsa_key_pair(out_dir, *, bits=2048, force=False, prefix="receiver"):
    """Write ``<prefix>_private.pem`` (mode 0600) and ``<prefix>_public.pem`` into ``out_dir``.

    Returns ``(private_path, public_path)``.  Raises :class:`FileExistsError`
    if either file exists, unless ``force``; the check comes before the key
    is generated, so a refusal is quick.
    """
    out_dir = Path(out_dir)
    private_path = out_dir / ("%s_private.pem" % prefix)
    public_path = out_dir / ("%s_public.pem" % prefix)
    _refuse_existing(private_path, public_path, force)
    private_pem, public_pem = generate_rsa_key_pair(bits)
    _write_key_pair(private_path, private_pem, public_path, public_pem, force)
    return private_path, public_path


def load_public_key(path):
    """Load an RSA public key from a PEM file (a private key file yields its public half)."""
    return _import_rsa(path).public_key()


def load_private_key(path):
    """Load an RSA private key from a PEM file; KeyFileError if it holds only a public key."""
    key = _import_rsa(path)
    if not key.has_private():
        raise KeyFileError("%s holds a public key, not a private one" % path)
    return key


def generate_signing_key_pair():
    """Return a new Ed25519 ``(private_pem, public_pem)`` pair as bytes (PKCS#8 / SPKI)."""
    key = ECC.generate(curve="Ed25519")
    return (key.export_key(format="PEM").encode("ascii"),
            key.public_key().export_key(format="PEM").encode("ascii"))


def write_signing_key_pair(out_dir, name, *, force=False):
    """Write a sender's ``<name>.key`` (mode 0600) and ``<name>.pub`` into ``out_dir``.

    Returns ``(key_path, pub_path)``.  The ``.pub`` file is what receivers put
    in their trusted-senders directory.  Raises UsageError for a name that is
    not 1-64 of ``A-Z a-z 0-9 . _ -`` (starting alphanumeric), and
    :class:`FileExistsError` if either file exists, unless ``force``.
    """
    check_sender_name(name)
    out_dir = Path(out_dir)
    key_path, pub_path = out_dir / ("%s.key" % name), out_dir / ("%s.pub" % name)
    _refuse_existing(key_path, pub_path, force)
    private_pem, public_pem = generate_signing_key_pair()
    _write_key_pair(key_path, private_pem, pub_path, public_pem, force)
    return key_path, pub_path


def load_signing_key(path):
    """Load a sender's Ed25519 private key from a PEM file."""
    key = _import_ed25519(path)
    if not key.has_private():
        raise KeyFileError("%s holds a public key, not a signing key" % path)
    return key


def load_trusted_senders(directory):
    """Return ``{name: Ed25519 public key}`` for every ``<name>.pub`` file in ``directory``."""
    senders = {}
    for path in sorted(Path(directory).glob("*.pub")):
        check_sender_name(path.stem)
        senders[path.stem] = _import_ed25519(path).public_key()
    return senders


def _read(path):
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError("cannot read the key file %s: %s"
                           % (path, exc.strerror or exc)) from None


def _import_rsa(path):
    data = _read(path)
    try:
        return RSA.import_key(data)
    except (ValueError, IndexError, TypeError):
        raise KeyFileError("%s does not hold an RSA key in PEM form" % path) from None


def _import_ed25519(path):
    data = _read(path)
    try:
        key = ECC.import_key(data)
    except (ValueError, IndexError, TypeError):
        key = None
    if key is None or key.curve != "Ed25519":
        raise KeyFileError("%s does not hold an Ed25519 key in PEM form" % path)
    return key


def check_sender_name(name):
    """Raise UsageError unless ``name`` is 1-64 of ``A-Z a-z 0-9 . _ -``, starting alphanumeric."""
    if not isinstance(name, str) or not SENDER_NAME.fullmatch(name):
        raise UsageError("invalid sender name %r (1-64 of A-Z a-z 0-9 . _ -, "
                         "starting with a letter or digit)" % (name,))


def _refuse_existing(first, second, force):
    for path in (first, second):
        if not force and os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "key file already exists", str(path))


def _write_key_pair(private_path, private_pem, public_path, public_pem, force):
    private_path.parent.mkdir(parents=True, exist_ok=True)
    _write_new_file(private_path, private_pem, 0o600, force)
    _write_new_file(public_path, public_pem, 0o644, force)


def _write_new_file(path, data, mode, force):
    """Create ``path`` with ``mode`` from the first byte on (O_EXCL: no symlink, no race).

    ``force`` removes an old file first rather than truncating it, because a
    truncated file would keep its old -- possibly wider -- permissions.
    """
    if force:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with open(fd, "wb") as file:
        file.write(data)


def rsa_public_key(key):
    """An RSA public key from an ``RsaKey`` or a PEM path."""
    if isinstance(key, RSA.RsaKey):
        return key.public_key()
    return load_public_key(key)


def rsa_private_key(key):
    """An RSA private key from an ``RsaKey`` or a PEM path."""
    if isinstance(key, RSA.RsaKey):
        if not key.has_private():
            raise KeyFileError("an Opener needs the RSA private key")
        return key
    return load_private_key(key)


def ed25519_key(key, private):
    """An Ed25519 key (signing if ``private``, else public) from an ``EccKey`` or a PEM path."""
    if not isinstance(key, ECC.EccKey):
        key = load_signing_key(key) if private else _import_ed25519(key).public_key()
    if key.curve != "Ed25519" or (private and not key.has_private()):
        raise KeyFileError("expected an Ed25519 %s key" % ("signing" if private else "public"))
    return key
