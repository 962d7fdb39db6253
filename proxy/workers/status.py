"""The per-worker view: what the running proxy writes to a status file and `tlsproxy status`
prints. The file (JSON) is replaced atomically, so a reader never sees half of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

STATUS_VERSION = 1
log = logging.getLogger("tlsproxy.workers")


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


def write_status(path: Path, workers: Sequence[WorkerInfo]) -> None:
    """Write the status file atomically (temp file in the same directory, then rename)."""
    document = {
        "version": STATUS_VERSION,
        "pid": os.getpid(),
        "written": time.time(),
        "workers": [asdict(w) for w in workers],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".status.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, separators=(",", ":"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_status(path: Path) -> tuple[dict, list[WorkerInfo]]:
    """The status file's header (pid, written) and its workers. FileNotFoundError if absent."""
    document = json.loads(path.read_text())
    workers = [WorkerInfo(**w) for w in document.get("workers", [])]
    return document, workers


def format_status(path: Path, now: float | None = None) -> str:
    """A table of the workers in the status file, with a header line saying which proxy wrote
    it and how long ago (and whether that proxy still runs). FileNotFoundError if absent."""
    document, workers = read_status(path)
    now = time.time() if now is None else now
    writer = document.get("pid")
    age = max(0.0, now - float(document.get("written", now)))
    alive = isinstance(writer, int) and _pid_alive(writer)
    header = f"tlsproxy pid {writer}, status written {duration(age)} ago" + (
        "" if alive else " (that process is not running: the figures are stale)"
    )
    return header + "\n" + format_workers(workers)


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StatusWriter:
    """Rewrites the status file every `interval` seconds from `sources()` (e.g. the workers of
    every supervisor), in a thread so the event loop never waits on the disk. `stop()` writes a
    last snapshot, so the file shows the final states after the proxy is gone."""

    def __init__(
        self,
        path: Path,
        sources: Callable[[], Sequence[WorkerInfo]],
        interval: float = 2.0,
    ) -> None:
        self.path = path
        self.sources = sources
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="status")

    async def write_now(self) -> None:
        try:
            await asyncio.to_thread(write_status, self.path, list(self.sources()))
        except OSError as exc:
            log.warning("cannot write the status file %s: %s", self.path, exc)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.write_now()

    async def _run(self) -> None:
        while True:
            await self.write_now()
            await asyncio.sleep(self.interval)
