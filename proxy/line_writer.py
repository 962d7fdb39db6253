"""Lines to a file descriptor (the access log to stdout) without ever blocking the event loop.

stdout is often a pipe to journald or to another program, and a pipe that fills up blocks its
writer: one slow reader would stall every client. So the event loop only appends each line to a
list; every `flush_every` seconds (sooner once `flush_bytes` are waiting) the lines go, as one
block of bytes, to a thread that does the blocking write() calls. Handing them over once per
loop iteration instead woke that thread, on the proxy's own core, every few requests.

What the thread has not written yet is bounded (`max_pending` bytes): a line that would go
beyond it is dropped and counted, and the count is logged (once every `report_every` seconds at
most) instead of growing memory or stalling clients. close() (at the end of a drain) hands over
what is left and waits a little for it to be written.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import threading
import time

from proxy.logs import log

DEFAULT_MAX_PENDING = 4 * 1024 * 1024
DEFAULT_FLUSH_EVERY = 0.05  # seconds a line may wait before its block goes to the thread
DEFAULT_FLUSH_BYTES = 64 * 1024


class LineWriter:
    def __init__(
        self,
        fd: int = 1,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        report_every: float = 10.0,
        flush_every: float = DEFAULT_FLUSH_EVERY,
        flush_bytes: int = DEFAULT_FLUSH_BYTES,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.fd = fd
        self.max_pending = max_pending
        self.flush_every = flush_every
        self.flush_bytes = flush_bytes
        self.report_every = report_every
        self._loop = loop or asyncio.get_running_loop()
        self._lines: list[str] = []
        self._size = 0  # characters in _lines (bytes, for ASCII lines, which these are)
        self._timer: asyncio.TimerHandle | None = None
        # Two counters, each written by one thread only, so neither needs a lock: the bytes
        # handed to the writer thread, and the bytes it has written (or given up on).
        self._queued = 0
        self._done = 0
        self.dropped = 0
        self._dropped_reported = 0
        self._reported_at = 0.0
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tlsproxy-access-log", daemon=True)
        self._thread.start()
        self._closed = False

    def write(self, line: str) -> None:
        """Queue one line (without its newline). Called on the event loop."""
        size = len(line) + 1
        if self._queued - self._done + self._size + size > self.max_pending or self._closed:
            self.dropped += 1
            if self._timer is None and not self._closed:  # the next flush reports the drops
                self._timer = self._loop.call_later(self.flush_every, self._flush)
            return
        self._lines.append(line)
        self._size += size
        if self._size >= self.flush_bytes:
            self._flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(self.flush_every, self._flush)

    @property
    def pending(self) -> int:
        """Bytes accepted and not written yet."""
        return self._queued - self._done + self._size

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            lines, self._lines, self._size = self._lines, [], 0
            lines.append("")
            data = "\n".join(lines).encode("utf-8", "backslashreplace")
            self._queued += len(data)
            self._queue.put(data)
        if self.dropped != self._dropped_reported:
            now = time.monotonic()
            if now - self._reported_at >= self.report_every:
                log.warning(
                    "access log: %d line(s) dropped: stdout is not reading fast enough "
                    "(%d KiB waiting to be written)",
                    self.dropped - self._dropped_reported,
                    self.pending // 1024,
                )
                self._dropped_reported = self.dropped
                self._reported_at = now

    def _run(self) -> None:
        broken = False
        while True:
            data = self._queue.get()
            if data is None:
                return
            view = memoryview(data)
            while view and not broken:
                try:
                    view = view[os.write(self.fd, view) :]
                except InterruptedError:
                    continue
                except BlockingIOError:
                    time.sleep(0.01)  # a descriptor someone made non-blocking: wait here
                except OSError as exc:
                    # The reader is gone (EPIPE) or the descriptor closed: keep serving, and
                    # say so once; the lines are counted as written so none pile up.
                    broken = True
                    reason = errno.errorcode.get(exc.errno or 0, str(exc))
                    with contextlib.suppress(RuntimeError):  # the loop is closed already
                        self._loop.call_soon_threadsafe(
                            log.error,
                            "access log: writing to fd %d failed (%s); lines are lost",
                            self.fd,
                            reason,
                        )
            self._done += len(data)

    def close(self, timeout: float = 2.0) -> None:
        """Hand over what is left, then wait up to `timeout` for it to be written."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self.dropped != self._dropped_reported:
            log.warning("access log: %d line(s) dropped", self.dropped - self._dropped_reported)
            self._dropped_reported = self.dropped
