"""Server settings and limits, with the defaults the command line shows."""
import argparse
import dataclasses
from typing import Optional

from .protocol import DEFAULT_MAX_LINE_BYTES


@dataclasses.dataclass
class ServerConfig:
    """Everything a :class:`~ciphermq.server.BrokerServer` can be told.

    Times are in seconds.  ``port=0`` binds any free port (read the bound
    one back from ``BrokerServer.address``).
    """

    host: str = "127.0.0.1"
    port: int = 5672                     # the document's port
    redelivery_interval: float = 30.0    # unacked deliveries come back after this
    max_deliveries: int = 10             # then the message goes to <queue>.dead
    consumer_timeout: float = 300.0      # drop a consumer silent this long with messages (0: never)
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_connections: int = 2048
    max_queue_length: int = 1_000_000    # ready + unacked, per queue
    max_queues: int = 10_000             # queues, <name>.dead included (see below)
    max_exchanges: int = 1_000
    max_bindings: int = 10_000           # over all exchanges
    max_extra_fields: int = 32           # envelope fields beyond the five required ones
    max_json_depth: int = 8              # nesting inside those extra fields
    default_prefetch: int = 100          # unacked pushes per consumer; 0 = unlimited
    write_timeout: float = 10.0          # a client that does not read is dropped after this
    idle_timeout: Optional[float] = None  # drop a connection silent this long (None: never)
    line_timeout: float = 30.0           # drop a client that starts a line and never ends it
    auth_timeout: float = 10.0           # with users_file: authenticate (or finish TLS) by then
    read_tick: float = 1.0               # how often a waiting reader checks those deadlines
    idle_read_tick: float = 60.0         # ... and how long it waits when none is pending
    dedup_window: float = 3600.0         # acked message ids are remembered this long
    dedup_max_ids: int = 1_000_000       # ... and at most this many of them
    data_dir: Optional[str] = None       # journal here (None: memory only, as the document)
    compact_min_bytes: int = 64 * 1024 * 1024   # never compact a journal smaller than this
    repair: bool = False                 # keep a damaged journal's intact records (--repair)
    journal_retry_interval: float = 1.0  # a failed journal write is tried again after this
    users_file: Optional[str] = None     # access control (ciphermq/access.py); None: off
    tls_cert: Optional[str] = None       # TLS: server certificate chain (PEM) ...
    tls_key: Optional[str] = None        # ... and its private key
    tls_client_ca: Optional[str] = None  # require client certificates signed by this CA
    # -- broker-wide bounds against hostile clients (docs/SECURITY.md) --
    # max_queues counts every queue a client can create, ".dead" names included;
    # only the dead-letter queue of a counted queue is free (at most one each).
    max_memory: int = 512 * 1024 * 1024  # queued envelope bytes + COPY_OVERHEAD, every copy
    max_unacked: int = 10_000            # unacked messages one connection holds
    login_failure_limit: int = 20        # failed logins per source address ...
    login_failure_window: float = 60.0   # ... per this many seconds; then refused unchecked
    # The interpreter's switch interval (sys.setswitchinterval): how long a thread woken from
    # a socket may wait for the interpreter lock while another connection's thread runs
    # Python.  Process-wide, so only main() applies it (docs/SECURITY.md, "Hostile neighbours").
    switch_interval: float = 0.001
    # A connection that has run commands this long while another connection runs a short
    # read (a few commands: an interactive client) steps aside between two commands
    # (ciphermq/turns.py); 0: never.
    fair_turn: float = 0.0005
    fair_max_wait: float = 0.002         # ... for at most this long each time
    chaos: Optional[str] = None          # fault injection spec (ciphermq/chaos.py); None: off
    chaos_seed: Optional[int] = None
    http_port: Optional[int] = None      # the dashboard (ciphermq/dashboard.py); None: off
    http_request_timeout: float = 10.0   # a dashboard request must arrive within this
    http_max_request_bytes: int = 8192   # request line + headers, at most
    http_max_connections: int = 32       # dashboard requests served at once


def switch_interval(text):
    """argparse type: seconds, more than 0 and at most 1 (sys.setswitchinterval's unit)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 1 second")
    return value


def seconds_or_zero(text):
    """argparse type: seconds, 0 or more."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more seconds")
    return value


def port_number(text):
    """argparse type: a TCP port, 0 to 65535 (0: any free one)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be from 0 to 65535")
    return value
