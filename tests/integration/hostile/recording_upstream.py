"""The request fuzzer's app: a hand-written TCP upstream that records every byte it receives.

It answers each request it can frame with a 200 whose body names a serial number, so that a
response the client gets can be traced to the exact bytes the app received. Its framing is
deliberately lenient (a bare LF may end the head, the first Content-Length or a "chunked"
anywhere in Transfer-Encoding decides the body): its job is to keep the proxy's exchange going
whatever arrives, so that everything is recorded; judging the bytes is the strict parser's job.
"""

from __future__ import annotations

import bisect
import re
import socket
import threading
import time
from dataclasses import dataclass

from tests.integration.proxy.support import TcpServer

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LENGTH = re.compile(rb"(?im)^content-length[ \t]*:[ \t]*(\d+)")
_CHUNKED = re.compile(rb"(?im)^transfer-encoding[ \t]*:.*chunked")
_CHUNK_SIZE = re.compile(rb"[ \t]*([0-9A-Fa-f]+)[^\n]*\n")
_LINE_END = re.compile(rb"\r?\n")
SERIAL_PREFIX = b"app-serial="


@dataclass(frozen=True)
class Answered:
    """A request the upstream framed and answered (its response names `serial` in the body
    and in X-App-Serial, which survives HEAD): where it lay in its connection's stream."""

    serial: int
    conn: int
    start: int
    end: int


def response_for(serial: int, head_only: bool) -> bytes:
    body = SERIAL_PREFIX + b"%d" % serial
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-app-serial: %d\r\n"
        b"content-length: %d\r\n\r\n" % (serial, len(body))
    )
    return head if head_only else head + body


def serial_of(body: bytes) -> int | None:
    """The serial an upstream response body names, None if the body is not one of ours."""
    if body.startswith(SERIAL_PREFIX) and body[len(SERIAL_PREFIX) :].isdigit():
        return int(body[len(SERIAL_PREFIX) :])
    return None


def lenient_frame(data: bytes) -> int | None:
    """Where the request at the start of `data` ends, by lenient rules; None while incomplete."""
    match = _HEAD_END.search(data)
    if match is None:
        return None
    head = data[: match.start()]
    pos = match.end()
    if not _CHUNKED.search(head):
        length = _LENGTH.search(head)
        end = pos + (int(length.group(1)[:18]) if length else 0)
        return end if end <= len(data) else None
    while True:  # chunks, up to the last one
        size = _CHUNK_SIZE.match(data, pos)
        if size is None:
            return None
        pos = size.end()
        # 15 hex digits at most: still "never complete", and within re's index range (2**63).
        n = int(size.group(1)[:15], 16)
        if n == 0:
            break
        crlf = _LINE_END.match(data, pos + n)
        if crlf is None:
            return None
        pos = crlf.end()
    while True:  # trailer lines, up to an empty one
        eol = data.find(b"\n", pos)
        if eol < 0:
            return None
        if data[pos:eol] in (b"", b"\r"):
            return eol + 1
        pos = eol + 1


class RecordingUpstream(TcpServer):
    """Every connection's bytes (`received[i]`), when each piece arrived (`arrivals[i]`: (end
    offset, monotonic time) per recv), and every request answered (`answered`)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[list[tuple[int, float]]] = []
        self.answered: list[Answered] = []
        self._serial = 0
        self._lock = threading.Lock()
        self.last_byte_at = time.monotonic()

    def serve(self, conn: socket.socket, buf: bytearray) -> None:
        with self._lock:
            index = next(i for i, b in enumerate(self.received) if b is buf)
            while len(self.arrivals) <= index:
                self.arrivals.append([])
            arrivals = self.arrivals[index]
        pending = bytearray()  # received, not framed yet; starts at `base` in the stream
        base = 0
        while data := self.recv(conn, buf):
            now = time.monotonic()
            arrivals.append((len(buf), now))
            self.last_byte_at = now
            pending += data
            while (length := lenient_frame(bytes(pending))) is not None:
                with self._lock:
                    self._serial += 1
                    serial = self._serial
                    self.answered.append(Answered(serial, index, base, base + length))
                head_only = pending[:5].upper() == b"HEAD "
                del pending[:length]
                base += length
                conn.sendall(response_for(serial, head_only))

    def arrival(self, conn: int, offset: int) -> float:
        """When the byte at `offset` of connection `conn` arrived."""
        arrivals = self.arrivals[conn]
        i = bisect.bisect_right(arrivals, (offset, float("inf")))
        return arrivals[i][1] if i < len(arrivals) else float("inf")

    def quiet_for(self) -> float:
        """Seconds since the last byte arrived on any connection."""
        return time.monotonic() - self.last_byte_at

    def snapshot(self) -> list[tuple[bytes, bool]]:
        """(bytes received so far, closed?) for every connection."""
        with self._lock:
            count = min(len(self.received), len(self.closed))  # the accept loop adds to both
            return [(bytes(self.received[i]), self.closed[i].is_set()) for i in range(count)]
