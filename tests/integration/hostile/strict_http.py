"""A small, strict RFC 9112 request-stream parser: the referee of the request fuzzer.

It is written from the RFC, independently of h11 and of the proxy, so that a bug shared by the
proxy and h11 cannot hide itself. Given every byte one upstream connection received, it splits
them into requests and raises `StrictError` on anything a lenient peer could read another way:
a bare LF or CR, obs-fold, a leading empty line, whitespace before a colon, a non-token name,
control bytes in a value or the target, Content-Length beside Transfer-Encoding, a coding other
than a single "chunked", several, empty or non-decimal lengths, a malformed chunk size, chunk
extension or chunk end, a missing or repeated Host in HTTP/1.1, a version other than 1.0/1.1.

What follows the last complete request is returned, not refused, as long as it is a valid
beginning of one (`Partial`): the proxy cuts a request short (a stalled or refused body) by
closing the upstream connection, and the fuzzer tells those ends apart from garbage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# request-line = method SP request-target SP HTTP-version (RFC 9112 3); the target is any run of
# visible ASCII: its form (origin, absolute, authority, asterisk) is the caller's to judge.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/(1\.[01])\Z")
# field-value = *field-content: visible bytes (and obs-text), with SP/HTAB only between them.
_FIELD_VALUE = re.compile(
    rb"(?:[\x21-\x7e\x80-\xff](?:[\x20\x09\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?\Z"
)
_VISIBLE = re.compile(rb"[\x21-\x7e]+\Z")
_OWS = b" \t"
_DIGITS = re.compile(rb"[0-9]+\Z")
# chunk = chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] )
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)"
    rb"((?:[ \t]*;[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    rb"(?:[ \t]*=[ \t]*(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+|"
    rb"\"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*\"))?)*)\Z"
)
# Lengths past these are not ambiguous, only absurd; refusing them keeps int() bounded.
MAX_LENGTH_DIGITS = 18
MAX_CHUNK_SIZE_DIGITS = 16


class StrictError(ValueError):
    """The bytes are not an unambiguous RFC 9112 request stream; `offset` is where it broke."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at byte {offset})")
        self.offset = offset


@dataclass(frozen=True)
class Request:
    """One complete request, as a strict server reads it. `fields` keep the order received,
    names lowercased; `start`/`end` are its byte offsets in the stream."""

    method: bytes
    target: bytes
    version: bytes  # b"1.1" or b"1.0"
    fields: tuple[tuple[bytes, bytes], ...]
    body: bytes
    framing: str  # "none", "length" or "chunked"
    start: int
    end: int

    def values(self, name: bytes) -> list[bytes]:
        return [value for n, value in self.fields if n == name]


@dataclass(frozen=True)
class Partial:
    """A valid beginning of a request that the stream ends inside. `head` is None while the
    head itself is incomplete; `body` is what arrived of the body."""

    head: Request | None
    body: bytes
    start: int


@dataclass
class Stream:
    requests: list[Request] = field(default_factory=list)
    partial: Partial | None = None  # set when bytes are left after the last complete request
    leftover: bytes = b""


class _Incomplete(Exception):
    """The stream ends inside a request (internal: turned into a Partial)."""

    def __init__(self, head: Request | None, body: bytes) -> None:
        self.head = head
        self.body = body


def parse_requests(data: bytes) -> Stream:
    """Every request in `data`, in order. Raises StrictError on anything malformed or
    ambiguous, including in an incomplete last request."""
    stream = Stream()
    pos = 0
    while pos < len(data):
        try:
            request = _request(data, pos)
        except _Incomplete as incomplete:
            stream.partial = Partial(incomplete.head, incomplete.body, pos)
            stream.leftover = data[pos:]
            return stream
        stream.requests.append(request)
        pos = request.end
    return stream


def _line(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """The line at `pos` (without its CRLF) and where the next starts; None if not all here."""
    end = data.find(b"\r\n", pos)
    if end < 0:
        _check_line_bytes(data[pos:], pos, last=True)
        return None
    line = data[pos:end]
    _check_line_bytes(line, pos, last=False)
    return line, end + 2


def _check_line_bytes(line: bytes, pos: int, *, last: bool) -> None:
    # A bare LF ends a line for some parsers and not for others; a bare CR is read as a space
    # by a few. Either makes the message ambiguous (RFC 9112 2.2).
    bare = line.find(b"\n")
    if bare >= 0:
        raise StrictError("bare LF", pos + bare)
    cr = line.find(b"\r")
    if cr >= 0 and not (last and cr == len(line) - 1):  # a CR may be the first half of a CRLF
        raise StrictError("bare CR", pos + cr)


def _request(data: bytes, start: int) -> Request:
    got = _line(data, start)
    if got is None:
        _check_partial_request_line(data[start:], start)
        raise _Incomplete(None, b"")
    line, pos = got
    if not line:
        raise StrictError("empty line before the request line", start)
    match = _REQUEST_LINE.match(line)
    if match is None:
        raise StrictError(f"invalid request line {line[:80]!r}", start)
    method, target, version = match.group(1), match.group(2), match.group(3)
    fields: list[tuple[bytes, bytes]] = []
    while True:
        at = pos
        got = _line(data, pos)
        if got is None:
            partial = data[pos:]
            if partial.startswith((b" ", b"\t")):
                raise StrictError("obs-fold", pos)
            _check_partial_field(partial.rstrip(b"\r"), pos)
            raise _Incomplete(None, b"")
        line, pos = got
        if not line:
            break
        fields.append(_field(line, at))
    framing, length = _framing(fields, version, start)
    head = Request(method, target, version, tuple(fields), b"", framing, start, pos)
    if framing == "none":
        return head
    if framing == "length":
        if len(data) - pos < length:
            raise _Incomplete(head, data[pos:])
        body = data[pos : pos + length]
        return Request(method, target, version, tuple(fields), body, framing, start, pos + length)
    body, end = _chunked(data, pos, head)
    return Request(method, target, version, tuple(fields), body, framing, start, end)


def _check_partial_request_line(partial: bytes, pos: int) -> None:
    """A request line that is still arriving must already look like the start of one."""
    text = partial[:-1] if partial.endswith(b"\r") else partial
    if not text:
        if partial:
            raise StrictError("empty line before the request line", pos)
        return
    parts = text.split(b" ")
    method = parts[0]
    if len(parts) > 3 or not _TOKEN.match(method):
        raise StrictError(f"invalid start of a request line {text[:80]!r}", pos)
    if len(parts) >= 2 and parts[1] and not _VISIBLE.match(parts[1]):
        raise StrictError("invalid start of a request target", pos)
    if len(parts) == 3 and not any(v.startswith(parts[2]) for v in (b"HTTP/1.1", b"HTTP/1.0")):
        raise StrictError("invalid start of an HTTP version", pos)


def _check_partial_field(text: bytes, pos: int) -> None:
    if not text:
        return
    name, colon, value = text.partition(b":")
    if not _TOKEN.match(name):
        raise StrictError(f"invalid start of a field name {name[:80]!r}", pos)
    if colon and not _FIELD_VALUE.match(value.strip(_OWS)):
        raise StrictError("invalid start of a field value", pos)


def _field(line: bytes, pos: int) -> tuple[bytes, bytes]:
    if line[:1] in (b" ", b"\t"):
        raise StrictError("obs-fold", pos)  # RFC 9112 5.2: a server must reject it or unfold it
    name, colon, value = line.partition(b":")
    if not colon:
        raise StrictError(f"field line without a colon {line[:80]!r}", pos)
    if not _TOKEN.match(name):  # also catches whitespace before the colon (RFC 9112 5.1)
        raise StrictError(f"invalid field name {name[:80]!r}", pos)
    value = value.strip(_OWS)
    if not _FIELD_VALUE.match(value):
        raise StrictError(f"invalid bytes in the value of {name.decode('ascii')}", pos)
    return name.lower(), value


def _framing(fields: list[tuple[bytes, bytes]], version: bytes, pos: int) -> tuple[str, int]:
    """How the body is framed (RFC 9112 6.1-6.3), refusing every doubtful combination."""
    lengths = [v for n, v in fields if n == b"content-length"]
    codings = [v for n, v in fields if n == b"transfer-encoding"]
    hosts = [v for n, v in fields if n == b"host"]
    if len(hosts) > 1 or (version == b"1.1" and not hosts):
        raise StrictError(f"{len(hosts)} Host fields", pos)
    if codings and lengths:
        raise StrictError("Content-Length with Transfer-Encoding", pos)
    if codings:
        if version != b"1.1":
            raise StrictError("Transfer-Encoding in HTTP/1.0", pos)  # RFC 9112 6.1
        if len(codings) != 1 or codings[0].lower() != b"chunked":
            raise StrictError(f"transfer codings {codings!r}", pos)
        return "chunked", 0
    if lengths:
        if len(lengths) != 1:
            raise StrictError(f"{len(lengths)} Content-Length fields", pos)
        value = lengths[0]
        if not _DIGITS.match(value) or len(value) > MAX_LENGTH_DIGITS:
            raise StrictError(f"invalid Content-Length {value[:40]!r}", pos)
        return "length", int(value)
    return "none", 0


def _chunked(data: bytes, pos: int, head: Request) -> tuple[bytes, int]:
    body = bytearray()
    while True:
        at = pos
        got = _line(data, pos)
        if got is None:
            if not re.fullmatch(rb"[0-9A-Fa-f]*(?:[ \t;][\x20-\x7e\t]*)?\r?", data[pos:]):
                raise StrictError("invalid start of a chunk line", pos)
            raise _Incomplete(head, bytes(body))
        line, pos = got
        match = _CHUNK_LINE.match(line)
        if match is None:
            raise StrictError(f"invalid chunk line {line[:80]!r}", at)
        digits = match.group(1)
        if len(digits) > MAX_CHUNK_SIZE_DIGITS:
            raise StrictError("chunk size too long", at)
        size = int(digits, 16)
        if size == 0:
            break
        if len(data) - pos < size:
            body += data[pos:]
            raise _Incomplete(head, bytes(body))
        body += data[pos : pos + size]
        pos += size
        end = data[pos : pos + 2]
        if end != b"\r\n"[: len(end)]:
            raise StrictError("chunk data not followed by CRLF", pos)
        if len(end) < 2:
            raise _Incomplete(head, bytes(body))
        pos += 2
    # trailer-section = *( field-line CRLF ) CRLF
    while True:
        at = pos
        got = _line(data, pos)
        if got is None:
            partial = data[pos:]
            if partial.startswith((b" ", b"\t")):
                raise StrictError("obs-fold in trailers", pos)
            _check_partial_field(partial.rstrip(b"\r"), pos)
            raise _Incomplete(head, bytes(body))
        line, pos = got
        if not line:
            return bytes(body), pos
        _field(line, at)
