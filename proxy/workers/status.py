"""The per-worker view that `tlsproxy status` prints: each supervisor's snapshot, sent by the
running proxy over its control socket (proxy/status.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerInfo:
    upstream: str
    worker: str  # "app-1": upstream name and slot number, stable across restarts
    pid: int | None
    state: str  # starting | up | draining | stopping | backoff | crashloop | stopped
    uptime: float  # seconds since this pid started (0 when there is none)
    requests: int  # requests the proxy sent to this pid
    rss: int | None  # bytes, the worker and its children
    listen: str  # "unix:/path" or "127.0.0.1:PORT"
    restarts: int = 0  # unplanned exits in this slot since the proxy started


def format_workers(workers: Sequence[WorkerInfo]) -> str:
    """One row per worker under a header row (or a line saying there are none)."""
    if not workers:
        return "no supervised workers\n"
    rows = [("WORKER", "PID", "STATE", "UPTIME", "REQUESTS", "RSS", "RESTARTS", "LISTEN")]
    for w in workers:
        rows.append(
            (
                w.worker,
                "-" if w.pid is None else str(w.pid),
                w.state,
                duration(w.uptime) if w.pid is not None else "-",
                str(w.requests),
                "-" if w.rss is None else f"{w.rss / (1024 * 1024):.1f}MiB",
                str(w.restarts),
                w.listen,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
