"""A hand-written upstream that answers each request with scripted bytes: a broken app on demand.

One server (127.0.0.1, port 0, a thread per connection) serves many cases: the request target
`/case/<id>` picks the script registered under that id, so one proxy can run thousands of
cases. A script is a list of steps run after the request (head, and body by Content-Length or
chunked, unless the script answers early):

    Send(data)       write these bytes
    Sleep(seconds)   pause (a response in pieces)
    Close()          FIN (what was sent is all there is)
    HalfClose()      FIN, then keep reading until the proxy closes
    Hang(seconds)    answer nothing more; keep reading; close (FIN) after `seconds`
    Reset()          RST (SO_LINGER 0): what is in flight may be lost
    ReadBody()       read the rest of the request body now (after an early answer)

Without a closing step the connection carries on: the next request on it is served again.
A target that names no script gets a clean 200 whose body names the target, so a response
that carries someone else's bytes is easy to tell apart.

Every request is recorded per case (`records(id)`): its head and body, the bytes the script
sent, how the connection ended, and `sent_all`, an event set once no byte of the script
remains to be sent.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from tests.integration.proxy.support import TcpServer

_CASE = re.compile(rb"^[A-Z]+ /case/([A-Za-z0-9_.-]+)[ ?/]")
_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*(\d+)[ \t]*\r?$")
_CHUNKED = re.compile(rb"(?im)^transfer-encoding:[^\r\n]*chunked")
# No step waits longer than this, whatever a script says: every thread ends by itself.
MAX_WAIT = 60.0


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class HalfClose:
    pass


@dataclass(frozen=True)
class Hang:
    seconds: float = 30.0


@dataclass(frozen=True)
class Reset:
    pass


@dataclass(frozen=True)
class ReadBody:
    pass


Step = Send | Sleep | Close | HalfClose | Hang | Reset | ReadBody


@dataclass
class Script:
    steps: list[Step]
    # False: the answer starts as soon as the request head is in (an app that answers a large
    # upload early); the body is read by a ReadBody step, or before the next request.
    read_body: bool = True

    @property
    def data(self) -> bytes:
        """Every byte the script sends, in order."""
        return b"".join(step.data for step in self.steps if isinstance(step, Send))


@dataclass
class Record:
    """One request that reached the upstream for a case, and what the script did with it."""

    connection: int  # index into TcpServer.received
    head: bytes
    body: bytearray = field(default_factory=bytearray)
    sent: bytearray = field(default_factory=bytearray)
    # "fin" (Close, HalfClose, the end of a Hang), "rst" (Reset), "peer" (the proxy closed
    # first or a write failed), "open" (the connection carries on). Set before the socket
    # call, so whoever saw the close also sees the flag.
    ending: str = "running"
    sent_all: threading.Event = field(default_factory=threading.Event)


def clean_body(target: bytes) -> bytes:
    return b"clean " + target


class _PeerGone(OSError):
    """The proxy closed the connection while a step needed it."""


class ScriptedUpstream(TcpServer):
    def __init__(self) -> None:
        super().__init__()
        self._scripts: dict[str, Script] = {}
        self._records: dict[str, list[Record]] = {}
        self._lock = threading.Lock()
        self._counter = 0

    # --- used by the tests ----------------------------------------------------------------

    def add(self, script: Script | list[Step], case: str | None = None) -> str:
        """Register a script; the id to put in the target (/case/<id>)."""
        if not isinstance(script, Script):
            script = Script(script)
        with self._lock:
            if case is None:
                self._counter += 1
                case = f"s{self._counter}"
            self._scripts[case] = script
            self._records[case] = []
        return case

    def records(self, case: str) -> list[Record]:
        with self._lock:
            return list(self._records.get(case, ()))

    def wait_sent(self, case: str, timeout: float = 10.0) -> bool:
        """Has every request of `case` sent all of its script (or stopped for good)?"""
        deadline = time.monotonic() + timeout
        for record in self.records(case):
            if not record.sent_all.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def forget(self, case: str) -> None:
        """Drop a finished case (long fuzz runs register many)."""
        with self._lock:
            self._scripts.pop(case, None)
            self._records.pop(case, None)

    def prune(self) -> None:
        """Forget the connections that ended: their recordings, sockets and threads (a long
        run opens hundreds of thousands). Only while no connection is being accepted: the
        accept loop appends to these lists without a lock."""
        keep = [i for i, closed in enumerate(self.closed) if not closed.is_set()]
        self.received = [self.received[i] for i in keep]
        self.closed = [self.closed[i] for i in keep]
        self._conns = [conn for conn in self._conns if conn.fileno() != -1]
        self._threads = [thread for thread in self._threads if thread.is_alive()]

    # --- the server -----------------------------------------------------------------------

    def serve(self, conn: socket.socket, buf: bytearray) -> None:
        index = next(  # the accept loop appended ours, most likely last
            i for i in range(len(self.received) - 1, -1, -1) if self.received[i] is buf
        )
        pending = bytearray()
        while True:
            while b"\r\n\r\n" not in pending:
                data = self.recv(conn, buf)
                if not data:
                    return
                pending += data
            head, _, rest = bytes(pending).partition(b"\r\n\r\n")
            pending = bytearray(rest)
            match = _CASE.match(head)
            case = match.group(1).decode() if match else None
            script = self._scripts.get(case) if case else None
            if script is None:
                pending = self._read_body(conn, buf, head, pending, None)
                target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"?"
                body = clean_body(target)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                continue
            record = Record(index, head)
            with self._lock:
                self._records.setdefault(case, []).append(record)  # type: ignore[arg-type]
            try:
                body_read = False
                if script.read_body:
                    pending = self._read_body(conn, buf, head, pending, record)
                    body_read = True
                ended = False
                for step in script.steps:
                    if isinstance(step, ReadBody):
                        if not body_read:
                            pending = self._read_body(conn, buf, head, pending, record)
                            body_read = True
                    elif self._step(conn, buf, step, record):
                        ended = True
                        break
                record.sent_all.set()
                if ended:
                    return
                if not body_read:
                    pending = self._read_body(conn, buf, head, pending, record)
                record.ending = "open"
            except OSError:
                record.ending = "peer"
                return
            finally:
                record.sent_all.set()

    def _step(self, conn: socket.socket, buf: bytearray, step: Step, record: Record) -> bool:
        """Run one step; True when it ended the connection."""
        if isinstance(step, Send):
            self._send(conn, step.data, record)
        elif isinstance(step, Sleep):
            self._stop.wait(min(step.seconds, MAX_WAIT))
        elif isinstance(step, Close):
            record.ending = "fin"
            conn.shutdown(socket.SHUT_WR)
            return True
        elif isinstance(step, HalfClose):
            record.ending = "fin"
            conn.shutdown(socket.SHUT_WR)
            record.sent_all.set()
            self._read_until_closed(conn, buf, MAX_WAIT)
            return True
        elif isinstance(step, Hang):
            record.sent_all.set()
            self._read_until_closed(conn, buf, min(step.seconds, MAX_WAIT))
            record.ending = "fin"
            conn.shutdown(socket.SHUT_WR)
            return True
        elif isinstance(step, Reset):
            record.ending = "rst"
            # A zero linger turns close() into an RST, whatever is still unread or unsent.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            return True
        return False

    def _send(self, conn: socket.socket, data: bytes, record: Record) -> None:
        # sendall() on a socket with a timeout gives up after it and loses track of what went
        # out; a large response to a slow reader needs a loop.
        view = memoryview(data)
        deadline = time.monotonic() + MAX_WAIT
        while view:
            if self._stop.is_set() or time.monotonic() > deadline:
                raise _PeerGone
            try:
                sent = conn.send(view)
            except TimeoutError:
                continue
            except OSError as exc:
                raise _PeerGone from exc
            record.sent += view[:sent]
            view = view[sent:]

    def _read_until_closed(self, conn: socket.socket, buf: bytearray, seconds: float) -> None:
        """Keep reading (the recording goes on) until the proxy closes or `seconds` pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data

    def _read_body(
        self,
        conn: socket.socket,
        buf: bytearray,
        head: bytes,
        pending: bytearray,
        record: Record | None,
    ) -> bytearray:
        """Read the request body that follows `head` (by Content-Length, or to the last chunk);
        return what comes after it."""
        if _CHUNKED.search(head):
            # The proxy re-chunks request bodies itself, so its chunks are well formed.
            while True:
                end = _chunked_end(pending)
                if end is not None:
                    break
                data = self.recv(conn, buf)
                if not data:
                    raise _PeerGone
                pending += data
        else:
            match = _LENGTH.search(head)
            end = int(match.group(1)) if match else 0
            while len(pending) < end:
                data = self.recv(conn, buf)
                if not data:
                    if record is not None:
                        record.body += pending
                    raise _PeerGone
                pending += data
        if record is not None:
            record.body += pending[:end]
        return pending[end:]


def _chunked_end(data: bytearray) -> int | None:
    """Where a well-formed chunked body at the start of `data` ends, None while incomplete."""
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(data[pos:line_end]).split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            end = data.find(b"\r\n\r\n", pos - 2)
            return None if end < 0 else end + 4
        pos += size + 2
        if pos > len(data):
            return None
