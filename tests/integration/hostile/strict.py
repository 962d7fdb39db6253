"""A second, independent and strict HTTP/1.1 parser (RFC 9112), for the differential fuzzers.

Neither h11 nor the proxy's own parsers: what the proxy forwards to the app, or relays to the
client, is read again here, and anything a lenient peer could read another way raises
`Ambiguous`: bare LF, obs-fold, whitespace before a colon, a non-token name, control bytes in a
value, Content-Length beside Transfer-Encoding, several or invalid lengths, a coding other than
chunked, a malformed chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) HTTP/1\.([01])")
# The SP before an empty reason phrase is often left out; nobody reads that line two ways.
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [\x09\x20-\x7e\x80-\xff]*)?")
_VALUE = re.compile(rb"[\x21-\x7e\x80-\xff]([\x09\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?|")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[\x09\x20-\x7e\x80-\xff]*)?")


class Ambiguous(Exception):
    """The bytes are not one unambiguous HTTP/1.1 message stream."""


@dataclass
class Message:
    start: tuple[bytes, ...]  # (method, target, minor) or (minor, status)
    fields: list[tuple[bytes, bytes]]  # lowercased names
    body: bytes
    framing: str  # "none" | "length" | "chunked" | "close"

    def field(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.fields if n == name]


def _head(data: bytes, pos: int) -> tuple[bytes, list[tuple[bytes, bytes]], int] | None:
    end = data.find(b"\r\n\r\n", pos)
    if end < 0:
        if b"\n" in data[pos:].replace(b"\r\n", b""):
            raise Ambiguous("bare LF")
        return None
    block = data[pos:end]
    if b"\n" in block.replace(b"\r\n", b"") or b"\r" in block.replace(b"\r\n", b""):
        raise Ambiguous("bare LF or CR in a head")
    lines = block.split(b"\r\n")
    fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise Ambiguous(f"bad field line {line!r}")  # obs-fold, space before colon ...
        value = value.strip(b" \t")
        if not _VALUE.fullmatch(value):
            raise Ambiguous(f"control byte in {line!r}")
        fields.append((name.lower(), value))
    return lines[0], fields, end + 4


def _framing(fields: list[tuple[bytes, bytes]]) -> tuple[str, int]:
    lengths = [v for n, v in fields if n == b"content-length"]
    codings = [v for n, v in fields if n == b"transfer-encoding"]
    if lengths and codings:
        raise Ambiguous("Content-Length with Transfer-Encoding")
    if codings:
        if len(codings) != 1 or codings[0].lower() != b"chunked":
            raise Ambiguous(f"transfer coding {codings!r}")
        return "chunked", 0
    if lengths:
        if len(lengths) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 15:
            raise Ambiguous(f"Content-Length {lengths!r}")
        return "length", int(lengths[0])
    return "none", 0


def _chunked(data: bytes, pos: int) -> tuple[bytes, int] | None:
    body = bytearray()
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return None
        match = _CHUNK_SIZE.fullmatch(data, pos, line_end)
        if match is None:
            raise Ambiguous(f"chunk size line {data[pos:line_end]!r}")
        size = int(match.group(1), 16)
        pos = line_end + 2
        if size == 0:
            while True:  # trailers, then the empty line
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                if line_end == pos:
                    return bytes(body), pos + 2
                name, colon, _ = data[pos:line_end].partition(b":")
                if not colon or not _TOKEN.fullmatch(name):
                    raise Ambiguous("bad trailer")
                pos = line_end + 2
        if len(data) < pos + size + 2:
            return None
        body += data[pos : pos + size]
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise Ambiguous("chunk data not followed by CRLF")
        pos += size + 2


def parse_requests(data: bytes) -> tuple[list[Message], bytes]:
    """Every complete request in `data`, and what is left (an incomplete message)."""
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        head = _head(data, pos)
        if head is None:
            break
        line, fields, body_at = head
        match = _REQUEST_LINE.fullmatch(line)
        if match is None:
            raise Ambiguous(f"request line {line!r}")
        if match.group(3) == b"1" and sum(1 for n, _ in fields if n == b"host") != 1:
            raise Ambiguous("HTTP/1.1 without exactly one Host")
        framing, length = _framing(fields)
        if framing == "chunked":
            got = _chunked(data, body_at)
            if got is None:
                break
            body, pos = got
        else:
            if len(data) < body_at + length:
                break
            body, pos = data[body_at : body_at + length], body_at + length
        out.append(Message(match.groups(), fields, body, framing))
    return out, data[pos:]


def parse_response(data: bytes, *, head_request: bool = False) -> tuple[Message, bytes] | None:
    """The first complete final response in `data` (1xx skipped) and what follows it; None if
    incomplete. A response without framing runs to the end of `data` (the caller passes all
    the bytes of a closed connection)."""
    pos = 0
    while True:
        head = _head(data, pos)
        if head is None:
            return None
        line, fields, body_at = head
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise Ambiguous(f"status line {line!r}")
        status = int(match.group(2))
        if status >= 200 or status == 101:
            break
        pos = body_at
    start = (match.group(1), match.group(2))
    if head_request or status in (101, 204, 304):  # no body, whatever the framing fields say
        return Message(start, fields, b"", "none"), data[body_at:]
    framing, length = _framing(fields)
    if framing == "chunked":
        got = _chunked(data, body_at)
        if got is None:
            return None
        return Message(start, fields, got[0], framing), data[got[1] :]
    if framing == "length":
        if len(data) < body_at + length:
            return None
        return Message(start, fields, data[body_at : body_at + length], framing), data[
            body_at + length :
        ]
    return Message(start, fields, data[body_at:], "close"), b""
