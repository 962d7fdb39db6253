"""Worker memory: RSS and available memory read from /proc, and the rule that caps the worker
count (pure: `plan_workers` takes the numbers, the readers are separate).

RSS is counted for the worker *and its descendants* (a worker started through a wrapper or one
that forks helpers would otherwise look tiny). Shared pages are counted once per process, as
the kernel reports RSS, so the figure errs on the high side, which is the safe side for a limit.

The /proc readers are plain file reads: procfs answers from kernel memory without touching a
disk, so calling them on the event loop costs microseconds, not a blocking wait.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

# Fraction of MemAvailable the workers may take; the rest is left for the proxy, the page cache
# and whatever else runs on the machine.
MEMORY_SHARE = 0.9


def auto_workers(cpus: int) -> int:
    """gunicorn's documented rule of thumb: (2 x cores) + 1."""
    return 2 * max(1, cpus) + 1


def cpu_count() -> int:
    """CPUs this process may run on (honours taskset/cgroup cpusets, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class WorkerPlan:
    count: int  # how many workers to run in total (including the first)
    wanted: int  # what the config asked for ("auto" resolved)
    fits: bool  # wanted x first_rss fits in the share of available memory
    message: str | None  # a log line when it does not fit, None when it does


def plan_workers(
    requested: int | Literal["auto"],
    cpus: int,
    first_rss: int | None,
    available: int | None,
) -> WorkerPlan:
    """Decide the worker count once the first worker runs.

    `available` is MemAvailable measured while the first worker is already running, so the
    first worker's own memory is already taken out of it: the rest, (count - 1) x first_rss,
    must fit in MEMORY_SHARE of it. With "auto" the count shrinks to what fits (never below 1);
    with a fixed number the count stays and the message says it will not fit.
    """
    wanted = auto_workers(cpus) if requested == "auto" else requested
    if not first_rss or available is None or wanted <= 1:
        return WorkerPlan(wanted, wanted, True, None)
    room = int(available * MEMORY_SHARE)
    fitting = 1 + room // first_rss
    if wanted <= fitting:
        return WorkerPlan(wanted, wanted, True, None)
    need = wanted * first_rss
    have = room + first_rss
    if requested == "auto":
        message = (
            f"workers = 'auto' wants {wanted} ({cpus} CPUs x 2 + 1) but {wanted} x "
            f"{_mib(first_rss)} (the first worker's RSS) = {_mib(need)} does not fit in "
            f"{_mib(have)} of available memory: starting {fitting}"
        )
        return WorkerPlan(fitting, wanted, False, message)
    message = (
        f"{wanted} workers x {_mib(first_rss)} (the first worker's RSS) = {_mib(need)} does "
        f"not fit in {_mib(have)} of available memory (about {fitting} would): starting "
        f"{wanted} anyway as configured; expect swapping or the OOM killer"
    )
    return WorkerPlan(wanted, wanted, False, message)


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MiB"


def parse_meminfo_available(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def parse_status_rss(text: str) -> int | None:
    """VmRSS from /proc/PID/status, in bytes (None for a zombie or a kernel thread)."""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def read_mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return parse_meminfo_available(f.read())
    except OSError:
        return None


def read_rss(pid: int) -> int | None:
    """One process's resident memory in bytes, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return parse_status_rss(f.read())
    except (OSError, ValueError):
        return None


def children(pid: int) -> list[int]:
    """Direct children, from /proc/PID/task/*/children (each thread lists the ones it forked)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return found


def read_rss_tree(pid: int) -> int | None:
    """RSS of `pid` plus all its descendants; None if `pid` itself is gone."""
    total = read_rss(pid)
    if total is None:
        return None
    seen = {pid}
    todo = children(pid)
    while todo:
        child = todo.pop()
        if child in seen:  # pid reuse while walking; never loop
            continue
        seen.add(child)
        total += read_rss(child) or 0
        todo.extend(children(child))
    return total
