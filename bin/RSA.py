"""Generate key pairs: the receiver's RSA pair, or a sender's Ed25519 signing pair.

    python bin/RSA.py                      # keys/receiver_private.pem (0600) + receiver_public.pem
    python bin/RSA.py --signing alice      # keys/alice.key (0600) + keys/alice.pub

The receiver keeps ``receiver_private.pem`` and hands ``receiver_public.pem``
to its senders.  A sender keeps ``NAME.key`` and hands ``NAME.pub`` to the
receivers, which read a directory of such files with ``--trusted-senders``.
Existing keys are never replaced without ``--force``.
"""
import argparse
import sys
from pathlib import Path

# Runnable as ``python bin/RSA.py`` from a checkout, without installing the package.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from ciphermq import cli  # noqa: E402  (needs the path above)

cli.require_pycryptodome("RSA.py")      # else one line saying what to run, no traceback
from ciphermq import keys  # noqa: E402
from ciphermq.errors import UsageError  # noqa: E402


def rsa_bits(text):
    """argparse type for --bits: what pycryptodome accepts, within reason."""
    bits = int(text)
    if not 1024 <= bits <= 8192 or bits % 256:
        raise argparse.ArgumentTypeError("must be a multiple of 256 from 1024 to 8192")
    return bits


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="RSA.py", description="Generate CipherMQ key pairs.")
    parser.add_argument("--out-dir", default=cli.REPO_ROOT / "keys", type=Path,
                        help="directory for the key files (default: keys/ of this checkout, "
                             "where the scripts look for them)")
    parser.add_argument("--bits", default=2048, type=rsa_bits,
                        help="RSA modulus size in bits (default: 2048)")
    parser.add_argument("--force", action="store_true",
                        help="replace existing key files")
    parser.add_argument("--signing", metavar="NAME",
                        help="instead of the receiver's RSA pair, make the Ed25519 "
                             "signing pair NAME.key + NAME.pub for sender NAME")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.signing is not None:
            private_path, public_path = keys.write_signing_key_pair(
                args.out_dir, args.signing, force=args.force)
        else:
            private_path, public_path = keys.write_rsa_key_pair(
                args.out_dir, bits=args.bits, force=args.force)
    except FileExistsError as exc:
        print("❌ [RSA] keys already exist (use --force): %s" % exc.filename, file=sys.stderr)
        return 1
    except UsageError as exc:           # an invalid --signing name
        print("❌ [RSA] %s" % exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print("❌ [RSA] cannot write keys: %s" % exc, file=sys.stderr)
        return 1
    print("🔑 [RSA] Wrote %s (mode 600, keep it secret)" % private_path)
    print("📤 [RSA] Wrote %s (share this one)" % public_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
