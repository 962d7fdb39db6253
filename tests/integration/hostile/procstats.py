"""RSS and open file descriptors of a process, read from /proc (Linux), for the resource suites.

A `Sample` is taken before and after each hostile load; `change` prints both (run pytest with
-s to see them) so that the figures are there for the record, and the tests bound the growth.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def rss_kib(pid: int) -> int:
    """Resident set size in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_connections(pid: int, local_port: int = 0, remote_port: int = 0) -> int:
    """How many of the process's fds are TCP connections with that local port (the accepted
    clients of a listener; the listening socket itself is not counted) or that remote port
    (its connections to an upstream). Unlike the fd count, this tells the two apart."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            if fields[3] == LISTEN or int(fields[9]) not in inodes:
                continue
            if (local_port and local == local_port) or (remote_port and remote == remote_port):
                count += 1
    return count


LISTEN = "0A"  # the state column of /proc/net/tcp


def wait_tcp_connections_at_most(
    pid: int, at_most: int, timeout: float, *, local_port: int = 0, remote_port: int = 0
) -> int:
    """Poll until the process holds at most `at_most` such connections; the last count."""
    deadline = time.monotonic() + timeout
    while True:
        count = tcp_connections(pid, local_port, remote_port)
        if count <= at_most or time.monotonic() >= deadline:
            return count
        time.sleep(0.1)


def nofile_limit(pid: int) -> tuple[int, int]:
    """The process's RLIMIT_NOFILE (soft, hard), as /proc/PID/limits shows it."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return _limit(soft), _limit(hard)
    raise RuntimeError(f"no open-files limit for pid {pid}")


def _limit(text: str) -> int:
    return -1 if text == "unlimited" else int(text)


@dataclass(frozen=True)
class Sample:
    rss_kib: int
    fds: int

    def __str__(self) -> str:
        return f"RSS {self.rss_kib / 1024:.1f} MiB, {self.fds} fds"


def sample(pid: int) -> Sample:
    return Sample(rss_kib(pid), open_fds(pid))


def change(label: str, before: Sample, after: Sample) -> Sample:
    """Print one line with both samples and the difference; returns `after`."""
    print(
        f"\n[resources] {label}: RSS {before.rss_kib / 1024:.1f} -> {after.rss_kib / 1024:.1f} MiB "
        f"({(after.rss_kib - before.rss_kib) / 1024:+.1f}), "
        f"fds {before.fds} -> {after.fds} ({after.fds - before.fds:+d})"
    )
    return after


def wait_fds_at_most(pid: int, at_most: int, timeout: float) -> int:
    """Poll until the process holds at most `at_most` fds or `timeout` passes; the last count.
    Closing is asynchronous in the proxy (timeouts fire, the loop runs its callbacks)."""
    deadline = time.monotonic() + timeout
    while (count := open_fds(pid)) > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
    return count
