"""Free TCP ports on loopback, for servers that tests, benchmarks and demos start.

A port is picked now and bound by a server later (seconds later for a RabbitMQ
node), so two rules keep the pick good until then:

* **below the kernel's ephemeral range.**  A port from ``bind(0)`` lies in the
  range every outgoing connection on the machine draws its source port from;
  on a busy machine it was sometimes taken by the time the server bound it, and
  a client retrying a port nothing listens on could even connect to itself.  A
  port below that range is only ever taken by someone binding it on purpose.
  (On a machine whose range starts at 1024 there is no room below it, and the
  kernel picks.)
* **distinct.**  Each port is checked by binding it, so picking one at a time
  may hand out the same port twice once the first probe is closed.  Asked for
  several at once, :func:`free_ports` holds every probe open until all are
  chosen: the kernel itself refuses a second bind of a port already chosen.
  (Two RabbitMQ nodes given one port once made the second node's readiness
  check log in to the first.)
"""
import contextlib
import random
import socket

#: How far below the ephemeral range ports are picked from.
SPAN = 12000
ATTEMPTS = 200


def free_ports(count, taken=()):
    """``count`` different TCP ports on 127.0.0.1, free a moment ago, none in ``taken``."""
    low = _ephemeral_low()
    taken = set(taken)
    chosen = []
    with contextlib.ExitStack() as held:        # every chosen port stays bound until the end
        for _ in range(ATTEMPTS * count):
            if len(chosen) == count:
                break
            # No room below the range (it starts at 1024): the kernel picks, from within it.
            port = random.randrange(max(1024, low - SPAN), low) if low > 1024 else 0
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:             # in use, or chosen already in this call
                probe.close()
                continue
            held.callback(probe.close)
            port = probe.getsockname()[1]
            if port not in taken:
                chosen.append(port)
    if len(chosen) == count:
        return chosen
    raise OSError("no %d free port(s) found below %d" % (count, low))


def free_port():
    """One TCP port on 127.0.0.1 that was free a moment ago (see :func:`free_ports`)."""
    return free_ports(1)[0]


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
            return int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
