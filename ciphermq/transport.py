"""Bytes in and out of one connection: plain TCP or TLS, for the broker and the clients.

Both ends of CipherMQ read a connection with one thread while other threads
write it, so both use these classes.  ``send_lock`` guards every write to the
socket; readers never take it except for the rare TLS record a read must
answer.  Lock order: ``send_lock`` may be held while taking the broker mutex
or ``_tls_lock``, never the reverse.

Writes come in two kinds.  ``sendall`` blocks (up to the socket's write
timeout).  ``send_nowait`` never blocks: the broker uses it to push a message
from a thread that must not wait for another client, and whatever the socket
cannot take at once is kept as ``backlog``, which the next ``sendall`` writes
first.  Both are only called with ``send_lock`` held, so bytes never interleave.

Why not ``ssl.SSLSocket``?  One OpenSSL connection must not be driven from two
threads at once, and a connection here has a reader and writers.  So TLS runs
over memory BIOs (:class:`ssl.SSLObject`): the socket I/O stays ours and
unlocked, and ``_tls_lock`` guards only the in-memory TLS state, never a
socket call.

Why per-direction timeouts (:func:`set_timeouts`)?  A Python socket has one
timeout for both directions, but the broker needs two: a silent read wakes
up every second or so so the reader can check its deadlines (it also checks
them whenever bytes arrive), while a write may take up to the write timeout
before the client is declared dead.  The kernel
keeps one per direction (``SO_RCVTIMEO``, ``SO_SNDTIMEO``) on a blocking
socket; a timed-out call raises ``BlockingIOError``.
"""
import socket
import ssl
import struct
import threading
import time

from .errors import TransportError

RECV_BYTES = 256 * 1024


def set_timeouts(sock, read_seconds, write_seconds):
    """Blocking socket whose recv waits at most ``read_seconds`` and each send ``write_seconds``."""
    sock.settimeout(None)
    for option, seconds in ((socket.SO_RCVTIMEO, read_seconds),
                            (socket.SO_SNDTIMEO, write_seconds)):
        whole = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, option,
                        struct.pack("ll", whole, int((seconds - whole) * 1_000_000)))


class PlainTransport:
    """TCP as it is."""

    tls_name = None                 # the peer certificate's name (TLS only)
    reads_take_send_lock = False    # recv never takes send_lock (TLS's may: a key update)

    def __init__(self, sock):
        self.sock = sock
        #: Guards every write to the socket (see the module docstring).
        self.send_lock = threading.Lock()
        self.backlog = b""          # bytes send_nowait could not write yet

    def recv(self, whole_records=True):
        """The next bytes, b"" at end of stream.  Only the reader calls it.

        Raises BlockingIOError or socket.timeout when the socket's read
        timeout passes, OSError on failure.  ``whole_records`` matters for
        TLS only (see :meth:`TlsTransport.recv`).
        """
        return self.sock.recv(RECV_BYTES)

    def pending(self):
        """True if :meth:`recv` has bytes to return without reading the socket."""
        return False

    def sendall(self, data):
        """Write the backlog and then ``data``, blocking up to the write timeout.

        Only with ``send_lock`` held.  Raises BlockingIOError (or
        socket.timeout) when the write timeout passes, OSError on failure.
        """
        if self.backlog:
            data, self.backlog = self.backlog + data, b""
        self.sock.sendall(data)

    def send_nowait(self, data):
        """Write what the socket takes now; keep the rest as backlog.  True if nothing is left.

        Only with ``send_lock`` held.  Raises OSError if the connection has failed.
        """
        return self._send_raw_nowait(data)

    def _send_raw_nowait(self, data):
        if self.backlog:            # keep the byte order: wait behind the backlog
            self.backlog += data
            return False
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        self.backlog = data[sent:]
        return not self.backlog

    def shutdown(self):
        """Wake any thread blocked on the socket; safe to call twice, from any thread."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass                    # already shut down, or never fully connected

    def close(self):
        self.sock.close()


#: What a TLS broker answers a client that speaks plain text to it, before closing.
PLAINTEXT_ON_TLS_PORT = b"Error: the broker expects TLS: pass --tls-ca\n"


class TlsTransport(PlainTransport):
    """TLS over memory BIOs; see the module docstring for why.

    The handshake happens in the constructor, bounded by ``handshake_timeout``;
    a client names the ``server_hostname`` its certificate must match.
    """

    reads_take_send_lock = True

    def __init__(self, sock, context, *, server_side, server_hostname=None,
                 handshake_timeout=10.0, clock=time.monotonic):
        super().__init__(sock)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        #: Guards _tls and both BIOs: memory work only, never held across socket I/O.
        self._tls_lock = threading.Lock()
        self._early = b""           # plaintext that came with the peer's last handshake bytes
        self._handshake(handshake_timeout, clock)
        self.tls_name = _certificate_name(self._tls.getpeercert())

    def _handshake(self, timeout, clock):
        """Single-threaded: nobody else uses the connection yet, so no lock is needed.

        ``timeout`` is measured on ``clock``: the broker passes its own, so the
        handshake's deadline runs on the same clock as every other deadline.
        """
        deadline = clock() + timeout
        got_any = False
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                self._write_outgoing()      # send the alert, if any
                raise TransportError("TLS handshake failed: %s" % exc) from None
            self._write_outgoing()
            if clock() > deadline:
                raise TransportError("TLS handshake timed out")
            try:
                data = self.sock.recv(RECV_BYTES)
            except (BlockingIOError, socket.timeout):
                continue                    # read tick: check the deadline again
            if not data:
                raise TransportError("connection closed during the TLS handshake")
            if not got_any:
                got_any = True
                self._check_peer_speaks_tls(data)
            self._incoming.write(data)
        # The segment that finished the handshake may also carry application
        # data: decrypt it now, or no socket event would ever announce it.
        self._early = self._decrypt_available()
        self._write_outgoing()

    def _check_peer_speaks_tls(self, data):
        """Name a TLS/plain mismatch from the peer's first bytes (a TLS record starts 0x15-0x17).

        A server tells a plaintext client so in a line it can read, then
        gives up; a client meeting a plaintext server gives up with the fix.
        """
        if data[:1] in (b"\x15", b"\x16", b"\x17"):
            return
        if self._tls.server_side:
            try:
                self.sock.sendall(PLAINTEXT_ON_TLS_PORT)
            except OSError:
                pass
            raise TransportError("a plaintext client on the TLS port")
        raise TransportError("the broker does not use TLS: connect without --tls-ca, or to "
                             "its TLS port")

    def _write_outgoing(self):
        data = self._outgoing.read()
        if data:
            self.sock.sendall(data)

    def pending(self):
        return bool(self._early)

    def recv(self, whole_records=True):
        """As :meth:`PlainTransport.recv`, decrypted.

        Bytes that finish no TLS record yet are read and kept; then, with
        ``whole_records``, the read goes on; without it, BlockingIOError is
        raised as at a read tick, so a caller with deadlines gets to check
        them even while a peer dribbles a record byte by byte.
        """
        if self._early:
            data, self._early = self._early, b""
            return data
        while True:
            raw = self.sock.recv(RECV_BYTES)    # may raise the read timeout, as plain TCP does
            if not raw:
                return b""
            with self._tls_lock:
                self._incoming.write(raw)
                data = self._decrypt_available()
                must_answer = self._outgoing.pending > 0
            if must_answer:
                # Reading produced records to send back (a TLS 1.3 key update): rare.
                with self.send_lock:
                    with self._tls_lock:
                        out = self._outgoing.read()
                    self._send_raw(out)
            if data is None or data:            # None: the peer closed TLS cleanly
                return data or b""
            if not whole_records:
                raise BlockingIOError("no whole TLS record yet")

    def _decrypt_available(self):
        """All the plaintext the incoming buffer completes: bytes, or None at close_notify.

        Only called with ``_tls_lock`` held (or before anyone else uses the connection).
        """
        chunks = []
        while True:
            try:
                chunk = self._tls.read(RECV_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:      # the peer's close_notify
                return b"".join(chunks) or None
            except ssl.SSLError as exc:
                raise OSError("TLS error: %s" % (exc.reason or exc)) from None
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _seal(self, data):
        with self._tls_lock:
            view = memoryview(data)
            while view:
                view = view[self._tls.write(view):]
            return self._outgoing.read()

    def _send_raw(self, records):
        if self.backlog:
            records, self.backlog = self.backlog + records, b""
        self.sock.sendall(records)

    def sendall(self, data):
        self._send_raw(self._seal(data) if data else b"")

    def send_nowait(self, data):
        return self._send_raw_nowait(self._seal(data))


def server_tls_context(cert_file, key_file, client_ca=None):
    """A server context: TLS 1.2 or later; with ``client_ca``, client certificates required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.load_cert_chain(cert_file, key_file)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


def client_tls_context(ca=None, cert=None, key=None):
    """A client context: verify the broker against ``ca``, TLS 1.2 or later.

    ``ca`` is a PEM file of trusted CA certificates (None: the system's).
    ``cert`` and ``key`` are this client's certificate and key, for brokers
    that require client certificates (mutual TLS).  Raises OSError or
    ssl.SSLError for unreadable files, ValueError for a key without a cert.
    """
    if key is not None and cert is None:
        raise ValueError("a TLS key needs its certificate (--tls-cert)")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def _certificate_name(certificate):
    """The commonName of a verified peer certificate, or None."""
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None
