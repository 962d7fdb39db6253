"""A small, strict, incremental parser for the responses an upstream sends (sans-I/O).

Bytes go in with `feed()`/`feed_eof()`; what was found comes out as calls on a handler, the
way httptools works, because on the hot path an event object per message would cost more than
the parsing. The handler (the exchange) gets:

    on_informational(status, headers)  a 1xx other than 101 (100 Continue, 103 ...)
    on_head(status, reason, headers)   the final head; `parser.body` tells the framing.
                                       headers is None when the head is HTTP/1.1 and has no
                                       hop-by-hop field: `parser.raw_head` (status line and
                                       fields, without the blank line) can go out verbatim
    on_body(data)                      body bytes, de-chunked; after a 101, the tunnel's bytes
    on_end()                           the message is complete

Strict on purpose: the upstream's bytes are re-framed for the client, so anything ambiguous
(Content-Length with Transfer-Encoding, two different lengths, a transfer coding other than
chunked, obs-fold, bare LF, bad chunk sizes, a head larger than the limit) raises
`ResponseError`, which the data path answers with 502. Trailers are read and dropped.
"""

from __future__ import annotations

import re
from typing import Protocol

# Framing of the body that follows a final head (`ResponseParser.body`).
NO_BODY = 0  # HEAD, 204, 304, Content-Length: 0
LENGTH = 1  # Content-Length: `ResponseParser.content_length`
CHUNKED = 2
UNTIL_CLOSE = 3  # no framing header: the body ends when the upstream closes
SWITCHED = 4  # 101: from now on the bytes are another protocol

# Parser states (ints compare fastest).
_HEAD = 0
_BODY_LENGTH = 1
_CHUNK_SIZE = 2
_CHUNK_DATA = 3
_CHUNK_DATA_END = 4
_TRAILERS = 5
_UNTIL_CLOSE = 6
_DONE = 7
_SWITCHED = 8
_IDLE = 9

_MAX_CHUNK_LINE = 4096
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
# The whole header section in one regex pass: token ":" value CRLF, repeated. Values may hold
# HTAB and visible/obs-text bytes; CR, LF and other controls are refused (this also refuses
# obs-fold, which starts a line with whitespace, and bare LF).
_HEADER_BLOCK = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
# Fields the proxy must not pass on (hop-by-hop, as in proxy.downstream.forwarding, plus
# Transfer-Encoding), searched for in the lowercased header section where every field line
# follows a "\n". A head without any is passed on as is. (Case-sensitive, and starting with a
# literal, this search only tries the names at line starts: a tenth of an IGNORECASE scan.)
_HOP_BY_HOP_LINE = re.compile(
    rb"\n(?:connection:|keep-alive:|te:|trailer:|transfer-encoding:|upgrade:|proxy[:-])"
)
_CONTENT_LENGTH_LINE = b"\ncontent-length:"
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?")


class ResponseError(Exception):
    """The upstream sent something this proxy will not pass on (the client gets 502)."""


class ResponseHandler(Protocol):
    def on_informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def on_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]] | None
    ) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_end(self) -> None: ...


class ResponseParser:
    """Parses one response after each `start()`; reusable across a keep-alive connection."""

    __slots__ = (
        "_buf",
        "_ended",
        "_head_request",
        "_remaining",
        "_state",
        "_trailer_bytes",
        "body",
        "content_length",
        "handler",
        "keep_alive",
        "max_header_bytes",
        "raw_head",
        "received",
    )

    def __init__(self, max_header_bytes: int = 64 * 1024) -> None:
        self.max_header_bytes = max_header_bytes
        self.handler: ResponseHandler | None = None
        self._state = _IDLE
        self._buf = b""
        self._ended = False
        self._remaining = 0
        self._trailer_bytes = 0
        self._head_request = False
        self.body = NO_BODY
        self.content_length = 0
        self.keep_alive = False  # valid after on_head: may the connection carry another request
        self.raw_head = b""
        self.received = 0  # bytes of this response seen so far (0: nothing arrived yet)

    def start(self, handler: ResponseHandler, *, head_request: bool = False) -> None:
        """Expect the response to a new request (`head_request`: it was a HEAD, so no body)."""
        self.handler = handler
        self._state = _HEAD
        self._buf = b""
        self._head_request = head_request
        self._ended = False
        self.body = NO_BODY
        self.content_length = 0
        self.keep_alive = False
        self.received = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def switched(self) -> bool:
        return self._state == _SWITCHED

    def feed(self, data: bytes) -> None:
        """Parse `data`; raise ResponseError on anything malformed or unexpected."""
        self.received += len(data)
        state = self._state
        # The hot cases first: body bytes that need no copy at all.
        if state == _BODY_LENGTH and not self._buf:
            if self._feed_length(data) < len(data):
                raise ResponseError("upstream sent more bytes than its Content-Length")
            if self._state == _DONE:
                self._end()
            return
        if state == _SWITCHED or state == _UNTIL_CLOSE:
            assert self.handler is not None
            self.handler.on_body(data)
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _HEAD:
                pos = self._parse_head(data, pos)
            elif state == _BODY_LENGTH:
                pos += self._feed_length(data[pos:])
            elif state == _CHUNK_SIZE:
                pos = self._parse_chunk_size(data, pos)
            elif state == _CHUNK_DATA:
                pos = self._feed_chunk_data(data, pos)
            elif state == _CHUNK_DATA_END:
                pos = self._parse_chunk_end(data, pos)
            elif state == _TRAILERS:
                pos = self._parse_trailers(data, pos)
            elif state == _SWITCHED or state == _UNTIL_CLOSE:
                assert self.handler is not None
                self.handler.on_body(data[pos:])
                return
            elif state == _DONE or state == _IDLE:
                # Bytes nobody asked for: the connection's framing cannot be trusted any more.
                raise ResponseError("upstream sent data after the end of the response")
            if pos < 0:  # the rest is an incomplete line or head: keep it for the next feed
                return
        if self._state == _DONE:
            self._end()

    def _end(self) -> None:
        # Called last in feed(), after every byte was checked: the handler may hand this
        # connection to the next request from inside on_end().
        if not self._ended:
            self._ended = True
            assert self.handler is not None
            self.handler.on_end()

    def feed_eof(self) -> None:
        """The upstream closed. Ends a close-delimited body; anywhere else it is an error."""
        state = self._state
        if state == _UNTIL_CLOSE:
            self._state = _DONE
            self._end()
        elif state == _SWITCHED or state == _DONE or state == _IDLE:
            return
        elif state == _HEAD and self.received == 0:
            raise ResponseError("upstream closed the connection without a response")
        else:
            raise ResponseError("upstream closed the connection in the middle of the response")

    # --- states ---------------------------------------------------------------------------------

    def _keep(self, data: bytes, pos: int, limit: int, what: str) -> int:
        """Keep an incomplete line or head for the next feed, unless it is already too long."""
        if len(data) - pos > limit:
            raise ResponseError(f"upstream {what} is larger than {limit} bytes")
        self._buf = data[pos:] if pos else data
        return -1

    def _parse_head(self, data: bytes, pos: int) -> int:
        head_end = data.find(b"\r\n\r\n", pos)
        if head_end < 0:
            return self._keep(data, pos, self.max_header_bytes, "response head")
        if head_end + 4 - pos > self.max_header_bytes:
            raise ResponseError(f"upstream response head is larger than {self.max_header_bytes}")
        line_end = data.find(b"\r\n", pos)
        match = _STATUS_LINE.fullmatch(data, pos, line_end)
        if match is None:
            raise ResponseError("malformed status line from upstream")
        if not _HEADER_BLOCK.fullmatch(data, line_end + 2, head_end + 2):
            raise ResponseError("malformed header section from upstream")
        http11 = match.group(1) == b"1"
        status = int(match.group(2))
        codings: list[bytes] | None = None
        connection: list[bytes] | None = None
        section = data[line_end : head_end + 2].lower()  # "\r\n" + "name:value\r\n" * n
        headers: list[tuple[bytes, bytes]] | None = None
        plain = None
        if http11 and status >= 200:
            plain = _head_without_connection_fields(data, pos, line_end, head_end, section)
        if plain is not None:
            # The common case: at most a Connection of keep-alive/close to drop, only the
            # length to find.
            self.raw_head, close = plain
            if close:
                connection = [b"close"]
            lengths = _values(section, _CONTENT_LENGTH_LINE)
        else:
            headers = _field_list(data, line_end + 2, head_end)
            lengths = _field_values(headers, b"content-length")
            codings = _field_values(headers, b"transfer-encoding")
            connection = _field_values(headers, b"connection")
        pos = head_end + 4
        handler = self.handler
        assert handler is not None
        if status < 200:
            if status == 101:
                self._state = _SWITCHED
                self.body = SWITCHED
                handler.on_head(status, match.group(3) or b"", headers or [])
                if pos < len(data):
                    handler.on_body(data[pos:])
                return len(data)
            handler.on_informational(status, headers or [])
            return pos
        self.keep_alive = http11 and not (connection and _has_token(connection, b"close"))
        self._choose_framing(status, lengths, codings, http11)
        handler.on_head(status, match.group(3) or b"", headers)
        return pos

    def _choose_framing(
        self,
        status: int,
        lengths: list[bytes] | None,
        codings: list[bytes] | None,
        http11: bool,
    ) -> None:
        # RFC 9112 6.3, strictly: anything a smuggling attack would rely on is refused.
        if self._head_request or status == 204 or status == 304:
            self.body = NO_BODY
            self._state = _DONE
            return
        if codings is not None:
            if lengths is not None:
                raise ResponseError("upstream sent both Content-Length and Transfer-Encoding")
            if not http11 or len(codings) != 1 or codings[0].lower() != b"chunked":
                raise ResponseError("upstream used a transfer coding other than chunked")
            self.body = CHUNKED
            self._state = _CHUNK_SIZE
            return
        if lengths is not None:
            self.content_length = _content_length(lengths)
            if self.content_length == 0:
                self.body = NO_BODY
                self._state = _DONE
            else:
                self.body = LENGTH
                self._remaining = self.content_length
                self._state = _BODY_LENGTH
            return
        self.body = UNTIL_CLOSE
        self.keep_alive = False
        self._state = _UNTIL_CLOSE

    def _feed_length(self, data: bytes) -> int:
        remaining = self._remaining
        size = len(data)
        handler = self.handler
        assert handler is not None
        if size < remaining:
            self._remaining = remaining - size
            handler.on_body(data)
            return size
        self._state = _DONE
        self._remaining = 0
        handler.on_body(data if size == remaining else data[:remaining])
        return remaining

    def _parse_chunk_size(self, data: bytes, pos: int) -> int:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return self._keep(data, pos, _MAX_CHUNK_LINE, "chunk size line")
        match = _CHUNK_LINE.fullmatch(data, pos, line_end)
        if match is None:
            raise ResponseError("malformed chunk size from upstream")
        size = int(match.group(1), 16)
        if size == 0:
            self._state = _TRAILERS
            self._trailer_bytes = 0
        else:
            self._remaining = size
            self._state = _CHUNK_DATA
        return line_end + 2

    def _feed_chunk_data(self, data: bytes, pos: int) -> int:
        available = len(data) - pos
        remaining = self._remaining
        handler = self.handler
        assert handler is not None
        if available < remaining:
            self._remaining = remaining - available
            handler.on_body(data[pos:] if pos else data)
            return len(data)
        self._state = _CHUNK_DATA_END
        handler.on_body(data[pos : pos + remaining])
        return pos + remaining

    def _parse_chunk_end(self, data: bytes, pos: int) -> int:
        if len(data) - pos < 2:
            if data[pos:] != b"\r":
                raise ResponseError("chunk data not followed by CRLF")
            return self._keep(data, pos, 2, "chunk end")
        if data[pos : pos + 2] != b"\r\n":
            raise ResponseError("chunk data not followed by CRLF")
        self._state = _CHUNK_SIZE
        return pos + 2

    def _parse_trailers(self, data: bytes, pos: int) -> int:
        # Trailer lines are read one at a time (and dropped) until the empty line.
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            limit = self.max_header_bytes - self._trailer_bytes
            return self._keep(data, pos, max(limit, 0), "trailer section")
        if line_end == pos:
            self._state = _DONE
            return pos + 2
        self._trailer_bytes += line_end + 2 - pos
        if self._trailer_bytes > self.max_header_bytes or not _HEADER_BLOCK.fullmatch(
            data, pos, line_end + 2
        ):
            raise ResponseError("malformed or oversized trailer section from upstream")
        return line_end + 2


_CONNECTION_ONLY = frozenset((b"keep-alive", b"close"))


def _head_without_connection_fields(
    data: bytes, pos: int, line_end: int, head_end: int, section: bytes
) -> tuple[bytes, bool] | None:
    """(the head as the client may get it, whether a Connection field said close), when the
    only hop-by-hop fields are Keep-Alive and Connection fields that name no other field (just
    keep-alive or close): those lines are cut out of the upstream's own bytes. Many servers
    (nginx, gunicorn) send "Connection: keep-alive" on every response: rebuilding the head field
    by field for that one line would cost more than the rest of the parse. None when another
    hop-by-hop field is there: the caller rebuilds. (`section` is the lowercased
    data[line_end:head_end + 2], so its offset i is data's line_end + i.)"""
    found = _HOP_BY_HOP_LINE.search(section)
    if found is None:
        return data[pos : head_end + 2], False
    close = False
    parts = []
    kept_from = pos
    while found is not None:
        name = found.group()
        end = section.find(b"\r", found.end())
        if name == b"\nconnection:":
            for token in section[found.end() : end].split(b","):
                token = token.strip(b" \t")
                if token not in _CONNECTION_ONLY:
                    return None  # it names fields to remove (or nothing): the slow path
                close = close or token == b"close"
        elif name != b"\nkeep-alive:":
            return None
        parts.append(data[kept_from : line_end + found.start() + 1])  # up to this line
        kept_from = line_end + end + 2  # the next line
        found = _HOP_BY_HOP_LINE.search(section, end)
    parts.append(data[kept_from : head_end + 2])
    return b"".join(parts), close


def _field_list(data: bytes, start: int, end: int) -> list[tuple[bytes, bytes]]:
    """(lowercased name, value) pairs of a validated header section."""
    if end <= start:
        return []
    fields = []
    for line in data[start:end].split(b"\r\n"):
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip(b" \t")))
    return fields


def _values(section: bytes, needle: bytes) -> list[bytes] | None:
    """The values of every field line of `section` that starts with `needle` ("\nname:")."""
    found = section.find(needle)
    if found < 0:
        return None
    values = []
    while found >= 0:
        start = found + len(needle)
        end = section.find(b"\r", start)
        values.append(section[start:end].strip(b" \t"))
        found = section.find(needle, end)
    return values


def _field_values(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes] | None:
    values = [value for field, value in fields if field == name]
    return values or None


def _content_length(values: list[bytes]) -> int:
    # Several fields (or a comma list) are accepted only when they all agree (RFC 9110 8.6).
    found: set[bytes] = set()
    for value in values:
        for item in value.split(b","):
            found.add(item.strip(b" \t"))
    if len(found) != 1:
        raise ResponseError("upstream sent conflicting Content-Length values")
    (text,) = found
    if not text.isdigit() or len(text) > 18:
        raise ResponseError("upstream sent an invalid Content-Length")
    return int(text)


def _has_token(values: list[bytes], token: bytes) -> bool:
    for value in values:
        for item in value.split(b","):
            if item.strip(b" \t").lower() == token:
                return True
    return False
