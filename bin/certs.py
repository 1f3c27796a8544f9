"""Make a throwaway certificate authority and certificates for TLS demos and tests.

    python bin/certs.py                       # certs/ca.pem, server.pem + server.key
    python bin/certs.py --client alice        # ... and alice.pem + alice.key (mutual TLS)

Uses the ``openssl`` command line tool.  The server certificate is valid for
``localhost`` and ``127.0.0.1``; a client certificate's commonName is the
name a broker started with ``--users`` looks up.  For teaching and testing
only: the CA key lies next to the certificates, unprotected.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DAYS = "30"


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def new_key(path):
    # Create the file 0600 first: openssl then writes into it without widening the mode.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


def make_ca(out):
    new_key(out / "ca.key")
    openssl("req", "-x509", "-new", "-key", out / "ca.key", "-subj", "/CN=CipherMQ test CA",
            "-days", DAYS, "-out", out / "ca.pem")


def make_leaf(out, name, extensions):
    """A key and a certificate for ``name``, signed by the CA in ``out``."""
    new_key(out / ("%s.key" % name))
    with tempfile.TemporaryDirectory() as scratch:
        request, extfile = Path(scratch) / "req.csr", Path(scratch) / "ext.cnf"
        extfile.write_text(extensions)
        openssl("req", "-new", "-key", out / ("%s.key" % name), "-subj", "/CN=%s" % name,
                "-out", request)
        openssl("x509", "-req", "-in", request, "-CA", out / "ca.pem", "-CAkey", out / "ca.key",
                "-CAcreateserial", "-days", DAYS, "-extfile", extfile,
                "-out", out / ("%s.pem" % name))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="certs", type=Path)
    parser.add_argument("--client", action="append", default=[], metavar="NAME",
                        help="also make a client certificate with this commonName")
    args = parser.parse_args(argv)
    if shutil.which("openssl") is None:
        print("❌ [CERTS] the openssl command is needed", file=sys.stderr)
        return 1
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "ca.pem").exists():
        make_ca(out)
        make_leaf(out, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                 "extendedKeyUsage=serverAuth\n")
    for name in args.client:
        make_leaf(out, name, "extendedKeyUsage=clientAuth\n")
    print("🔏 [CERTS] CA, server%s certificates in %s/" % (
        "".join(", " + name for name in args.client), out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
