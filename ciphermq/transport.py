"""Byte transport under a connection: plain TCP or TLS, with per-direction timeouts.

Why not ``sock.settimeout``?  A Python socket has one timeout for both
directions, but a broker needs two: reads wake up every second or so to check
the idle and slow-line deadlines, while a write may take up to the write
timeout before the client is declared dead.  The kernel keeps one per
direction (``SO_RCVTIMEO``, ``SO_SNDTIMEO``) on a blocking socket, so that
is what :func:`set_timeouts` uses; a timed-out call raises
``BlockingIOError``.

Writes come in two kinds.  ``sendall`` blocks (up to the write timeout) and is
used by the connection's own threads.  ``send_nowait`` never blocks: another
connection's thread uses it to push a message it has just routed here, and
whatever the socket cannot take at once is kept as ``backlog``, which the next
``sendall`` writes first.  Callers hold the connection's ``send_lock`` for
both, so bytes never interleave.

Why not ``ssl.SSLSocket``?  Two threads use a connection at once -- the
reader in ``recv`` while the delivery thread writes -- and one OpenSSL
connection must not be driven from two threads concurrently.  So TLS runs
over memory BIOs (:class:`ssl.SSLObject`): the socket I/O stays ours and
unlocked, and ``_tls_lock`` guards only the in-memory TLS state, never a
socket call.
"""
import socket
import ssl
import struct
import threading
import time

from .errors import CipherMQError

RECV_BYTES = 256 * 1024


class TransportError(CipherMQError):
    """The TLS handshake failed or timed out."""


def set_timeouts(sock, read_seconds, write_seconds):
    """Blocking socket whose recv waits at most ``read_seconds`` and each send ``write_seconds``."""
    sock.settimeout(None)
    for option, seconds in ((socket.SO_RCVTIMEO, read_seconds), (socket.SO_SNDTIMEO, write_seconds)):
        whole = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, option,
                        struct.pack("ll", whole, int((seconds - whole) * 1_000_000)))


class PlainTransport:
    """TCP as it is."""

    tls_name = None                 # the peer certificate's name (TLS only)

    def __init__(self, sock):
        self.sock = sock
        self.backlog = b""          # bytes send_nowait could not write yet

    def recv(self):
        """The next bytes, b"" at EOF.  Raises BlockingIOError on the read tick, OSError on failure."""
        return self.sock.recv(RECV_BYTES)

    def sendall(self, data):
        """Write the backlog and then ``data``, blocking up to the write timeout.

        Raises BlockingIOError when the write timeout passes, OSError on failure.
        """
        if self.backlog:
            data, self.backlog = self.backlog + data, b""
        self.sock.sendall(data)

    def send_nowait(self, data):
        """Write what the socket takes now; keep the rest as backlog.  True if nothing is left.

        Raises OSError if the connection has failed.
        """
        if self.backlog:            # keep the byte order: wait behind the backlog
            self.backlog += data
            return False
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        self.backlog = data[sent:]
        return not self.backlog


class TlsTransport:
    """TLS over memory BIOs; see the module docstring for why."""

    def __init__(self, sock, context, handshake_timeout=10.0):
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        #: Guards _tls and both BIOs: memory work only, never held across socket I/O.
        self._tls_lock = threading.Lock()
        self.backlog = b""          # TLS records send_nowait could not write yet
        self._handshake(handshake_timeout)
        self.tls_name = _certificate_name(self._tls.getpeercert())

    def _handshake(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                self._flush_outgoing()      # send the alert, if any
                raise TransportError("TLS handshake failed: %s" % exc.reason) from None
            self._flush_outgoing()
            if time.monotonic() > deadline:
                raise TransportError("TLS handshake timed out")
            try:
                data = self.sock.recv(RECV_BYTES)
            except BlockingIOError:
                continue                    # read tick: check the deadline again
            if not data:
                raise TransportError("connection closed during the TLS handshake")
            self._incoming.write(data)
        self._flush_outgoing()

    def _flush_outgoing(self):
        data = self._outgoing.read()
        if data:
            self.sock.sendall(data)

    def recv(self):
        while True:
            with self._tls_lock:
                try:
                    plain = self._tls.read(RECV_BYTES)
                except ssl.SSLWantReadError:
                    plain = None
                except ssl.SSLZeroReturnError:
                    plain = b""             # the peer closed TLS cleanly
                except ssl.SSLError as exc:
                    raise OSError("TLS error: %s" % exc.reason) from None
            if plain is not None:
                return plain
            data = self.sock.recv(RECV_BYTES)   # may raise BlockingIOError: the read tick
            if not data:
                return b""
            with self._tls_lock:
                self._incoming.write(data)

    def _seal(self, data):
        with self._tls_lock:
            view = memoryview(data)
            while view:
                view = view[self._tls.write(view):]
            return self._outgoing.read()

    def sendall(self, data):
        records = self.backlog + self._seal(data) if data else self.backlog
        self.backlog = b""
        self.sock.sendall(records)          # callers hold send_lock, so records stay in order

    def send_nowait(self, data):
        records = self._seal(data)
        if self.backlog:
            self.backlog += records
            return False
        try:
            sent = self.sock.send(records, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        self.backlog = records[sent:]
        return not self.backlog


def server_tls_context(cert_file, key_file, client_ca=None):
    """A server context: TLS 1.2 or later; with ``client_ca``, client certificates required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


def _certificate_name(certificate):
    """The commonName of a verified peer certificate, or None."""
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None
