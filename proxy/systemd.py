"""The systemd conventions a service speaks: sockets passed by its manager (socket
activation, sd_listen_fds(3)), readiness told back to it (sd_notify(3)), and the runtime
directory it was given (RuntimeDirectory=).

Both are environment variables and file descriptors, nothing more, so no libsystemd is needed:
- `LISTEN_FDS=N` and `LISTEN_PID=<our pid>`: file descriptors 3 .. 3+N-1 are sockets already
  bound (and listening) for us. A `.socket` unit does this, as does
  `systemd-socket-activate -l ADDR`; the test API (proxy.testing) does it to hand the proxy a
  port chosen by the kernel without a race. The PID check keeps a child process that merely
  inherited the environment from taking sockets that are not its own.
- `NOTIFY_SOCKET=PATH`: a datagram socket to which "READY=1", "RELOADING=1" and "STOPPING=1"
  are sent. With `Type=notify` systemd counts the service started only once it is serving,
  and anything that waits for readiness (the test API included) needs no polling.
- `RUNTIME_DIRECTORY=PATH`: the unit's `RuntimeDirectory=` (/run/tlsproxy), created for the
  service, owned by its user and removed when it stops: the place for the workers' sockets.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


def passed_sockets(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets the service manager passed, in order; [] when there are none.

    The variables are removed from the environment once read (as sd_listen_fds(1) does), so
    that the app's workers and other children do not see them."""
    env = os.environ if environ is None else environ
    count, pid = env.get("LISTEN_FDS"), env.get("LISTEN_PID")
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if not count or not pid or not count.isdigit() or pid != str(os.getpid()):
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
        except OSError:
            continue  # not a socket: nothing of ours to take
        os.set_inheritable(fd, False)
        sockets.append(sock)
    return sockets


def same_address(sock: socket.socket, sockaddr: tuple) -> bool:
    """Whether `sock` is bound to `sockaddr` (as getaddrinfo gives it for a listener)."""
    try:
        bound = sock.getsockname()
    except OSError:
        return False
    if not isinstance(bound, tuple) or sock.type != socket.SOCK_STREAM:
        return False
    return bound[0] == sockaddr[0] and bound[1] == sockaddr[1]


def notify(state: str) -> bool:
    """Send one sd_notify message ("READY=1", "STOPPING=1", ...); False when no manager
    listens. Never raises: a service must run the same without systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def notify_reloading() -> bool:
    # Type=notify-reload (systemd 253) wants the monotonic time with RELOADING=1.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def runtime_directory(environ: dict[str, str] | None = None) -> Path | None:
    """The directory systemd created for this service (`RuntimeDirectory=`), or None.

    A unit that lists several gets them colon-separated; the first is ours."""
    env = os.environ if environ is None else environ
    first = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(first) if os.path.isabs(first) else None
