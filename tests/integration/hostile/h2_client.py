"""HTTP/2 clients for the hostile HTTP/2 tests (issue 12), over real TLS sockets (ALPN h2).

- `H2Client`: a well-behaved client driven by python-hyper's h2 state machine (it acknowledges
  SETTINGS, answers PINGs and reopens its windows), for the normal parts: the bystander that
  must keep being served while another connection attacks, and requests whose answer is a
  status on the stream (400, 431) after which the same connection must still work. Its outbound
  header validation is off, so it can send a :path with a space or a control byte in a value.
- `RawH2`: the attacker. Frames are hyperframe objects serialized by hand and header blocks come
  from its own hpack.Encoder, so it can send what h2 would refuse to: endless CONTINUATION
  frames, HPACK bombs, floods of control frames, streams reset as soon as they are opened.
  What comes back is parsed frame by frame with hyperframe; the only thing it does by itself is
  acknowledge the server's SETTINGS, as every client must.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9

Headers = list[tuple[bytes, bytes]]


def h2_context(ca: Path) -> ssl.SSLContext:
    """A client context trusting the proxy's local CA that offers only h2."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    return context


def h2_socket(port: int, ca: Path, sni: str, timeout: float) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock = h2_context(ca).wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise
    if sock.selected_alpn_protocol() != "h2":
        sock.close()
        raise AssertionError(f"ALPN chose {sock.selected_alpn_protocol()!r}, not h2")
    return sock


def request_headers(
    path: str = "/",
    *,
    method: str = "GET",
    authority: str = "localhost",
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> Headers:
    return [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
        *extra,
    ]


@dataclass
class Response:
    status: int
    headers: Headers
    body: bytes


class ConnectionEnded(Exception):
    """The server ended the connection (GOAWAY or close) or reset the stream before the
    response was complete."""


# --- the well-behaved client ---------------------------------------------------------------------


class H2Client:
    """One HTTP/2 connection driven by h2: `get`, or `request` then `response`."""

    def __init__(
        self, port: int, ca: Path, *, sni: str = "localhost", timeout: float = 10.0
    ) -> None:
        self.sock = h2_socket(port, ca, sni, timeout)
        self.authority = sni
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.terminated: h2.events.ConnectionTerminated | None = None
        self._responses: dict[int, Response] = {}
        self._done: set[int] = set()
        self._reset: dict[int, int] = {}
        self._flush()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self,
        path: str = "/",
        *,
        method: str = "GET",
        extra: Iterable[tuple[bytes, bytes]] = (),
        headers: Headers | None = None,
        body: bytes = b"",
    ) -> int:
        """Send a request (`headers` replaces the whole list); returns its stream id."""
        stream_id = self.conn.get_next_available_stream_id()
        fields = headers or request_headers(
            path, method=method, authority=self.authority, extra=extra
        )
        self.conn.send_headers(stream_id, fields, end_stream=not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=True)
        self._flush()
        return stream_id

    def response(self, stream_id: int, timeout: float = 10.0) -> Response:
        deadline = time.monotonic() + timeout
        while stream_id not in self._done:
            if stream_id in self._reset:
                raise ConnectionEnded(f"stream {stream_id} reset: {self._reset[stream_id]}")
            if self.terminated is not None:
                raise ConnectionEnded(f"GOAWAY {self.terminated.error_code!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete response on stream {stream_id} in {timeout} s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionEnded("connection closed")
            self._receive(data)
        return self._responses.pop(stream_id)

    def get(self, path: str = "/", **kwargs: object) -> Response:
        return self.response(self.request(path, **kwargs))  # type: ignore[arg-type]

    def _receive(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
                self._responses[event.stream_id] = Response(status, list(event.headers), b"")
            elif isinstance(event, h2.events.DataReceived):
                response = self._responses[event.stream_id]
                response.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._done.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self._reset[event.stream_id] = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event
        self._flush()


# --- the attacker --------------------------------------------------------------------------------


class RawH2:
    """An HTTP/2 connection written frame by frame. `frames` is everything received, in order;
    `goaway` the server's GOAWAY once it came, `closed` once the server closed (EOF or reset)."""

    def __init__(
        self,
        port: int,
        ca: Path,
        *,
        sni: str = "localhost",
        settings: dict[int, int] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.sock = h2_socket(port, ca, sni, timeout)
        self.authority = sni
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.frames: list[Frame] = []
        self.goaway: GoAwayFrame | None = None
        self.goaway_at: float | None = None  # time.monotonic() when it arrived
        self.closed = False
        self.send_blocked = False  # a write timed out: the server stopped reading us
        self._buffer = bytearray()
        self._next_stream = 1
        # Header blocks are decoded as they arrive (HPACK's dynamic table needs them all, in
        # order), keyed by the index in `frames` of the frame that ended the block.
        self.blocks: dict[int, Headers] = {}
        self._block = bytearray()
        self.send_raw(PREFACE + SettingsFrame(0, settings=settings or {}).serialize())
        # As any client: the server's SETTINGS come first, and are acknowledged (in _parse).
        if not self.poll_until(lambda: any(_is_settings(f) for f in self.frames), timeout):
            raise AssertionError("no SETTINGS from the server")

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # --- writing ---------------------------------------------------------------------

    def new_stream(self) -> int:
        stream_id = self._next_stream
        self._next_stream += 2
        return stream_id

    def send_raw(self, data: bytes, timeout: float = 5.0) -> bool:
        """Write bytes; False (and nothing more is written afterwards) once the server closed
        or stopped reading for `timeout` seconds."""
        if self.closed or self.send_blocked:
            return False
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            self.send_blocked = True
            return False
        except (OSError, ssl.SSLError):
            self.closed = True
            return False
        return True

    def send(self, *frames: Frame) -> bool:
        return self.send_raw(b"".join(frame.serialize() for frame in frames))

    def block(self, headers: Headers) -> bytes:
        """A header block from this connection's HPACK encoder (its dynamic table is the one
        the server decodes against)."""
        return self.encoder.encode(headers)

    def headers_frame(
        self,
        stream_id: int,
        headers: Headers | bytes,
        *,
        end_stream: bool = True,
        end_headers: bool = True,
    ) -> HeadersFrame:
        data = headers if isinstance(headers, bytes) else self.block(headers)
        flags = ["END_STREAM"] * end_stream + ["END_HEADERS"] * end_headers
        return HeadersFrame(stream_id, data, flags=flags)

    def request(self, path: str = "/", *, extra: Iterable[tuple[bytes, bytes]] = ()) -> int:
        """A GET on a new stream (headers through the HPACK encoder, unvalidated)."""
        stream_id = self.new_stream()
        headers = request_headers(path, authority=self.authority, extra=extra)
        self.send(self.headers_frame(stream_id, headers))
        return stream_id

    # --- reading ---------------------------------------------------------------------

    def poll(self, timeout: float) -> list[Frame]:
        """Read what arrives within `timeout` (0: only what is there now); the new frames."""
        if self.closed:
            return []
        before = len(self.frames)
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (TimeoutError, ssl.SSLWantReadError, BlockingIOError):
            return []
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return []
        self._buffer += data
        self._parse()
        # recv gives one TLS record at most: take whatever else is already decrypted.
        while self.sock.pending():
            self._buffer += self.sock.recv(1 << 20)
            self._parse()
        return self.frames[before:]

    def poll_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return done()
            self.poll(min(left, 0.2))
        return True

    def wait_goaway(self, timeout: float) -> GoAwayFrame | None:
        self.poll_until(lambda: self.goaway is not None, timeout)
        return self.goaway

    def wait_closed(self, timeout: float) -> bool:
        """True once the server closed the connection (EOF, TLS close or reset)."""
        return self.poll_until(lambda: self.closed, timeout)

    def response(self, stream_id: int, timeout: float = 10.0) -> Response | int:
        """The response on a stream once it ended, or the RST_STREAM code it was reset with
        first (a reset after a complete response, RFC 9113 8.1, does not undo it)."""
        deadline = time.monotonic() + timeout
        while True:
            response: Response | None = None
            for index, frame in enumerate(self.frames):
                if frame.stream_id != stream_id:
                    continue
                if isinstance(frame, RstStreamFrame):
                    return frame.error_code
                if index in self.blocks and response is None:
                    fields = self.blocks[index]
                    status = int(dict(fields)[b":status"])
                    if status >= 200:  # not a 100 Continue
                        response = Response(status, fields, b"")
                elif isinstance(frame, DataFrame) and response is not None:
                    response.body += frame.data
                if response is not None and "END_STREAM" in frame.flags:
                    return response
            if self.closed or self.goaway is not None or time.monotonic() > deadline:
                raise ConnectionEnded(f"no response on stream {stream_id}: {self.describe()}")
            self.poll(min(0.2, max(deadline - time.monotonic(), 0)))

    def describe(self) -> str:
        kinds = [type(f).__name__.removesuffix("Frame") for f in self.frames[-8:]]
        goaway = (
            f"GOAWAY {self.goaway.error_code} {self.goaway.additional_data!r}"
            if self.goaway
            else "no GOAWAY"
        )
        return f"{goaway}, closed={self.closed}, {len(self.frames)} frames (last: {kinds})"

    def _parse(self) -> None:
        buffer = self._buffer
        while len(buffer) >= FRAME_HEADER:
            frame, length = Frame.parse_frame_header(memoryview(buffer[:FRAME_HEADER]))
            if len(buffer) < FRAME_HEADER + length:
                return
            frame.parse_body(memoryview(bytes(buffer[FRAME_HEADER : FRAME_HEADER + length])))
            del buffer[: FRAME_HEADER + length]
            self.frames.append(frame)
            if isinstance(frame, HeadersFrame | ContinuationFrame):
                self._block += frame.data
                if "END_HEADERS" in frame.flags:
                    decoded = self.decoder.decode(bytes(self._block), raw=True)
                    self.blocks[len(self.frames) - 1] = [(bytes(k), bytes(v)) for k, v in decoded]
                    self._block.clear()
            elif _is_settings(frame):
                self.send(SettingsFrame(0, flags=["ACK"]))
            elif isinstance(frame, GoAwayFrame) and self.goaway is None:
                self.goaway = frame
                self.goaway_at = time.monotonic()


def _is_settings(frame: Frame) -> bool:
    return isinstance(frame, SettingsFrame) and "ACK" not in frame.flags
