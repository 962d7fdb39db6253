"""Responses from broken apps, an independent strict reader for them, and a client that reads
what the proxy made of them.

- `parse_response`: a strict HTTP/1.1 response reader (RFC 9112), written for these tests and
  sharing nothing with h11, the proxy's parser or strict.py. It says how a careful recipient
  must read an upstream's bytes: the first final response (1xx skipped), its status, headers
  and body, and where it ends; `Invalid` for anything a recipient could read two ways.
- `read_response`: reads one response from the proxy on a raw TLS socket with that same reader,
  and tells a complete message from a connection that ended without one (a TLS close_notify is
  a clean end; a FIN without it, or a reset, is a cut).
- `generate_case`: a seeded generator over a corpus of valid and broken responses (bad status
  lines and heads, Content-Length with Transfer-Encoding, conflicting lengths, bad chunking,
  1xx, 101, bodies on 204/304/HEAD, bytes after the end, truncations), mutated (byte flips,
  insertions, truncations, changed numbers and line ends), sent in pieces with short sleeps, and
  ended by keeping, closing, half-closing, hanging or resetting the connection.
"""

from __future__ import annotations

import random
import re
import select
import socket
import ssl
import time
from dataclasses import dataclass, field

from tests.integration.hostile.scripted_upstream import (
    Close,
    HalfClose,
    Hang,
    Reset,
    Script,
    Send,
    Sleep,
    Step,
)

# --- the strict reader ------------------------------------------------------------------------

# RFC 9110 5.6.2 token, 5.5 field-value (VCHAR, obs-text, SP and HTAB inside), 5.6.4 quoted-string.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD_NAME = re.compile(_TOKEN)
_FIELD_VALUE = re.compile(
    rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
)
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# RFC 9112 4. One tolerance, documented: the SP after the status code may be missing when there
# is no reason phrase ("HTTP/1.1 200"); nobody can read that line two ways. Status codes are
# three digits from 100 (RFC 9110 15 calls 600-999 invalid but asks clients to treat them as
# 5xx, so relaying one changes no framing).
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")
# RFC 9112 7.1.1 with one tolerance, documented: after the size, optional whitespace and then,
# after a ";", any bytes but controls other than HTAB. A gateway drops extensions and re-frames
# the body, so only the size and the CRLFs decide anything; the lenient reading (nginx's too)
# changes no byte of the body. (The strict grammar is in STRICT_CHUNK_LINE, for reference.)
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(;[\t\x20-\x7e\x80-\xff]*)?")
STRICT_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)((?:[ \t]*;[ \t]*"
    + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN
    + rb"|"
    + _QUOTED
    + rb"))?)*)"
)
_DIGITS = re.compile(rb"[0-9]+")

HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    )
)
# Fields a Connection list cannot remove: a proxy that dropped them would change the framing.
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"host"))


class Invalid(Exception):
    """Not one unambiguous HTTP/1.1 response."""


@dataclass
class Parsed:
    status: int
    version: bytes  # b"0" or b"1" (HTTP/1.x)
    headers: list[tuple[bytes, bytes]]  # lowercased names, values without surrounding OWS
    body: bytes
    framing: str  # "none" | "length" | "chunked" | "close" | "switch"
    end: int  # where the response ends in the input (its length for "close")
    interim: list[int] = field(default_factory=list)  # the 1xx statuses before it

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


def _lines(data: bytes, pos: int) -> tuple[list[bytes], int] | None:
    """The CRLF-terminated lines of a head starting at `pos`, up to the empty line, and the
    offset after it; None while incomplete. A CR or LF that is not part of a CRLF is Invalid."""
    lines = []
    while True:
        newline = data.find(b"\n", pos)
        if newline < 0:
            if b"\r" in data[pos:-1]:
                raise Invalid("bare CR in a head")
            return None
        if newline == pos or data[newline - 1] != 0x0D:
            raise Invalid("bare LF in a head")
        line = data[pos : newline - 1]
        if b"\r" in line:
            raise Invalid("bare CR in a head")
        pos = newline + 1
        if not line:
            return lines, pos
        lines.append(line)


def _field(line: bytes) -> tuple[bytes, bytes]:
    name, colon, value = line.partition(b":")
    if not colon or not _FIELD_NAME.fullmatch(name):
        raise Invalid(f"bad field line {line[:80]!r}")  # obs-fold, space before ":", no ":"
    value = value.strip(b" \t")
    if not _FIELD_VALUE.fullmatch(value):
        raise Invalid(f"bad field value {line[:80]!r}")  # NUL, DEL, other controls
    return name.lower(), value


def _content_length(values: list[bytes]) -> int | None:
    # RFC 9110 8.6: a list of identical lengths (in one field or several) is that length.
    if not values:
        return None
    items = {item.strip(b" \t") for value in values for item in value.split(b",")}
    if len(items) != 1:
        raise Invalid(f"Content-Length {values!r}")
    (item,) = items
    if not _DIGITS.fullmatch(item):
        raise Invalid(f"Content-Length {values!r}")
    return int(item)


def _chunked(data: bytes, pos: int) -> tuple[bytes, int] | None:
    body = bytearray()
    while True:
        newline = data.find(b"\n", pos)
        if newline < 0:
            if b"\r" in data[pos:-1]:
                raise Invalid("bare CR in a chunk line")
            return None
        if newline == pos or data[newline - 1] != 0x0D:
            raise Invalid("bare LF after a chunk size")
        line = data[pos : newline - 1]
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise Invalid(f"chunk line {line[:40]!r}")
        size = int(match.group(1), 16)
        pos = newline + 1
        if size == 0:
            trailers = _lines(data, pos)
            if trailers is None:
                return None
            for line in trailers[0]:
                _field(line)
            return bytes(body), trailers[1]
        end = pos + size
        if len(data) < end:
            return None
        body += data[pos:end]
        after = data[end : end + 2]
        if after != b"\r\n"[: len(after)]:
            raise Invalid("chunk data not followed by CRLF")
        if len(after) < 2:
            return None
        pos = end + 2


def parse_response(
    data: bytes, *, method: bytes = b"GET", closed: bool = False, upgrade: bool = False
) -> Parsed | None:
    """The first final response in `data`, None while incomplete. `closed`: the sender closed
    cleanly after `data` (which then ends a body without framing). `upgrade`: the request
    offered an upgrade (otherwise a 101 is Invalid)."""
    pos = 0
    interim = []
    while True:
        head = _lines(data, pos)
        if head is None:
            return None
        lines, body_at = head
        if not lines:
            raise Invalid("empty line where a status line belongs")
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise Invalid(f"status line {lines[0][:80]!r}")
        status = int(match.group(2))
        headers = [_field(line) for line in lines[1:]]
        # What the recipient passes on must be valid wherever it stands, even on a response
        # without a body (a 304's length is that of the representation).
        length = _content_length([v for n, v in headers if n == b"content-length"])
        if status >= 200 or status == 101:
            break
        interim.append(status)  # 1xx: no body, the final response follows
        pos = body_at
    version = match.group(1)

    def done(body: bytes, framing: str, end: int) -> Parsed:
        return Parsed(status, version, headers, body, framing, end, interim)

    if status == 101:
        if not upgrade:
            raise Invalid("101 to a request that offered no upgrade")
        return done(b"", "switch", body_at)
    if method == b"HEAD" or status in (204, 304):
        return done(b"", "none", body_at)
    codings = [v for n, v in headers if n == b"transfer-encoding"]
    if codings:
        # RFC 9112 6.1 and 6.3: with a length too it is a smuggling signature; in HTTP/1.0 the
        # framing is faulty; any coding but a single chunked leaves the body unreadable here.
        if length is not None:
            raise Invalid("Content-Length with Transfer-Encoding")
        if version != b"1":
            raise Invalid("Transfer-Encoding in HTTP/1.0")
        items = [i.strip(b" \t").lower() for v in codings for i in v.split(b",")]
        if items != [b"chunked"]:
            raise Invalid(f"transfer coding {codings!r}")
        got = _chunked(data, body_at)
        return None if got is None else done(got[0], "chunked", got[1])
    if length is not None:
        if len(data) < body_at + length:
            return None
        return done(data[body_at : body_at + length], "length", body_at + length)
    if not closed:
        return None
    return done(data[body_at:], "close", len(data))


def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The fields a proxy must pass on unchanged: not hop-by-hop (RFC 9110 7.6.1), not named by
    Connection (unless they frame the message), not Proxy-*."""
    listed = {
        item.strip(b" \t").lower()
        for name, value in headers
        if name == b"connection"
        for item in value.split(b",")
    }
    return [
        (name, value)
        for name, value in headers
        if name not in HOP_BY_HOP
        and name != b"proxy"
        and not name.startswith(b"proxy-")
        and (name not in listed or name in _FRAMING)
    ]


# --- what the client reads --------------------------------------------------------------------

# The proxy's own error answers (proxy/downstream/responses.py): told apart from an app's 502.
GATEWAY_BODIES = {502: b"502 Bad Gateway\n", 504: b"504 Gateway Timeout\n"}


@dataclass
class Outcome:
    kind: str  # "complete" | "cut" (ended without a complete message) | "invalid" | "stuck"
    response: Parsed | None
    raw: bytes  # the bytes of this answer (and of anything after it)
    end: str | None  # how the connection ended: "clean" | "ragged" | "reset" | None (open)
    note: str = ""

    def gateway_error(self, method: bytes = b"GET") -> bool:
        """Is this the proxy's own 502/504 (to a HEAD: its head, the length of its body)?"""
        response = self.response
        if self.kind != "complete" or response is None:
            return False
        canned = GATEWAY_BODIES.get(response.status)
        if canned is None or response.values(b"content-length") != [b"%d" % len(canned)]:
            return False
        return response.body == (b"" if method == b"HEAD" else canned)

    def describe(self) -> str:
        if self.response is None:
            return f"{self.kind} ({self.end or 'open'}) after {short(self.raw)} {self.note}"
        r = self.response
        return (
            f"{self.kind} {r.status} ({r.framing}), headers {short(repr(r.headers))}, "
            f"body {short(r.body)} ({len(r.body)} bytes), connection {self.end or 'open'}"
        )


def short(data: bytes | str, keep: int = 600) -> str:
    """repr() of `data`, its middle cut out when long (a 70 KB head would drown the report)."""
    text = data if isinstance(data, str) else repr(data)
    if len(text) <= keep:
        return text
    return f"{text[: keep // 2]} ...({len(text) - keep} chars)... {text[-keep // 2 :]}"


def client_socket(
    port: int, context: ssl.SSLContext, sni: str, timeout: float = 10.0
) -> ssl.SSLSocket:
    """A TLS connection to the proxy on which a FIN without close_notify raises (SSLEOFError)
    instead of reading as a clean end: a close-delimited body must not look complete when the
    proxy merely dropped the connection."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return context.wrap_socket(raw, server_hostname=sni, suppress_ragged_eofs=False)
    except BaseException:
        raw.close()
        raise


def read_response(
    sock: ssl.SSLSocket,
    buf: bytearray,
    *,
    method: bytes = b"GET",
    timeout: float = 15.0,
    upgrade: bool = False,
) -> Outcome:
    """Read one response; `buf` holds what was read earlier on this connection and keeps what
    follows the response (the caller decides whether bytes there are a violation)."""
    deadline = time.monotonic() + timeout
    end: str | None = None
    sock.settimeout(0.2)
    while True:
        try:
            parsed = parse_response(
                bytes(buf), method=method, closed=end == "clean", upgrade=upgrade
            )
        except Invalid as exc:
            return Outcome("invalid", None, bytes(buf), end, str(exc))
        if parsed is not None:
            rest = bytes(buf[parsed.end :])
            raw = bytes(buf)
            del buf[:]
            buf += rest
            return Outcome("complete", parsed, raw, end)
        if end is not None:
            return Outcome("cut", None, bytes(buf), end)
        if time.monotonic() > deadline:
            return Outcome("stuck", None, bytes(buf), None)
        try:
            data = sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except ssl.SSLEOFError:
            end = "ragged"
            continue
        except (ConnectionResetError, BrokenPipeError):
            end = "reset"
            continue
        except (ssl.SSLError, OSError) as exc:
            end = f"error {exc}"
            continue
        if not data:
            end = "clean"
        buf += data


def unsolicited(sock: ssl.SSLSocket) -> bytes:
    """Bytes the proxy sent that nobody asked for (after a complete response, before the next
    request); b"" when there are none (an EOF is not data)."""
    got = bytearray()
    while True:
        if not sock.pending() and not select.select([sock], [], [], 0)[0]:
            return bytes(got)
        sock.settimeout(0.01)
        try:
            data = sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return bytes(got)
        except (ssl.SSLError, OSError):
            return bytes(got)
        if not data:
            return bytes(got)
        got += data


# --- the corpus -------------------------------------------------------------------------------

REASONS = [
    b"200 OK",
    b"200 OK",
    b"200 OK",
    b"201 Created",
    b"202 Accepted",
    b"203 Non-Authoritative Information",
    b"206 Partial Content",
    b"299 Custom",
    b"301 Moved Permanently",
    b"302 Found",
    b"307 Temporary Redirect",
    b"400 Bad Request",
    b"403 Forbidden",
    b"404 Not Found",
    b"410 Gone",
    b"418 I'm a teapot",
    b"429 Too Many Requests",
    b"500 Internal Server Error",
    b"503 Service Unavailable",
    b"200",  # no reason, no SP (tolerated)
    b"200 ",  # an empty reason
    b"200 \tTabbed\treason",
    b"200 caf\xc3\xa9 ok",  # obs-text
    b"599 Last",
]
FIELDS = [
    b"Content-Type: text/plain; charset=utf-8",
    b"Content-Type: application/octet-stream",
    b"Cache-Control: no-store",
    b"Set-Cookie: a=1; Path=/",
    b"Set-Cookie: b=2; HttpOnly",
    b'ETag: "abc"',
    b"Link: </style.css>; rel=preload; as=style",
    b"X-Empty:",
    b"X-Padded:    padded   ",
    b"X-Tab:\tv\tw\t",
    b"X-Obs: caf\xc3\xa9",
    b"Vary: Accept-Encoding",
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT",
    b"Server: scripted",
    b"X-Long: " + b"v" * 2000,
    b"x-lower: lower-case name",
    b"X-Looks-Like-A-Head: HTTP/1.1 200 OK",
]
HOP_FIELDS = [
    b"Connection: keep-alive",
    b"Connection: close",
    b"Keep-Alive: timeout=5, max=100",
    b"Connection: x-hop\r\nX-Hop: goes",
    b"Connection: keep-alive, x-hop\r\nX-Hop: goes",
    b"Upgrade: websocket",
    b"Trailer: X-T",
    b"Proxy-Authenticate: Basic",
    b"Proxy-Connection: keep-alive",
    b"TE: trailers",
]
INTERIM = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 102 Processing\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
    b"Link: </b.js>; rel=preload\r\n\r\n",
    b"HTTP/1.1 199 Whatever\r\nX-I: 1\r\n\r\n",
]
BAD_STATUS_LINES = [
    b"HTTP/1.1 20 OK",
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 099 Low",
    b"HTTP/1.1 OK 200",
    b"HTTP/1.1  200 OK",
    b"HTTP/1.1 200  OK",  # fine: the reason may hold spaces
    b"HTTP/1.2 200 OK",
    b"HTTP/2 200 OK",
    b"HTTP/2.0 200 OK",
    b"http/1.1 200 OK",
    b"HTTP /1.1 200 OK",
    b"HTTP/1.1\t200 OK",
    b"HTTP/1.1 200 O\x00K",
    b"HTTP/1.1 200 O\x7fK",
    b"HTTP/1.1 2x0 OK",
    b"HTTP/1.1 -200 OK",
    b" HTTP/1.1 200 OK",
    b"ICY 200 OK",
    b"HTTP/1.1",
    b"",
    b"\x16\x03\x01\x00\x05hello",
    b"HTTP/1.1 200 OK\rX-A: b",
]
BAD_FIELD_LINES = [
    b"Bad Name: x",
    b"Bad\x00Name: x",
    b"Bad\x7fName: x",
    b": no-name",
    b"X-No-Colon",
    b"X-Space : before-colon",
    b"X-Tab\t: before-colon",
    b"X-Nul: a\x00b",
    b"X-Del: a\x7fb",
    b"X-Ctl: a\x01b",
    b"X-Esc: \x1b[0m",
    b"X-CR: a\rb",
    b"X-Fold: a\r\n b",
    b"X-Fold: a\r\n\tb",
    b"X-Bare: lf\nX-After: x",
    b"Caf\xc3\xa9: x",
    b"X-Esc\\aped: x",
    b"X-Obs-Start:\r\n folded",
]
CONTENT_LENGTH_VARIANTS = [
    b"Content-Length: %d, %d",  # identical: one length (RFC 9110 8.6)
    b"Content-Length: %d\r\nContent-Length: %d",
    b"Content-Length: +%d",
    b"Content-Length: -%d",
    b"Content-Length: 0x%x",
    b"Content-Length: %d.0",
    b"Content-Length: %d ",
    b"Content-Length:%d",
    b"Content-Length: 0%d",
    b"Content-Length: %d %d",
    b"Content-Length: %d,",
    b"Content-Length: ,%d",
    b"content-LENGTH: %d",
]
TRANSFER_CODINGS = [
    b"chunked",
    b"Chunked",
    b"CHUNKED",
    b" chunked ",
    b"gzip",
    b"gzip, chunked",
    b"chunked, gzip",
    b"chunked, chunked",
    b"identity",
    b"identity, chunked",
    b"xchunked",
    b"chunked;q=1",
    b"chunk",
    b"",
    b'"chunked"',
]


@dataclass
class FuzzCase:
    index: int
    family: str
    method: bytes  # b"GET" or b"HEAD"
    http10: bool  # the client's request is HTTP/1.0
    script: Script
    notes: list[str] = field(default_factory=list)
    keep_alive10: bool = False  # an HTTP/1.0 request that asks for keep-alive
    upgrade: bool = False  # the request offers an upgrade to websocket

    @property
    def data(self) -> bytes:
        return self.script.data

    def request(self, host: str) -> bytes:
        version = b"1.0" if self.http10 else b"1.1"
        fields = b"Host: %s\r\n" % host.encode()
        if self.keep_alive10:
            fields += b"Connection: keep-alive\r\n"
        if self.upgrade:
            fields += (
                b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            )
        return b"%s /case/f%d HTTP/%s\r\n%s\r\n" % (self.method, self.index, version, fields)

    def describe(self) -> str:
        flags = [
            self.method.decode(),
            "HTTP/1.0" if self.http10 else "",
            "keep-alive" if self.keep_alive10 else "",
            "upgrade" if self.upgrade else "",
        ]
        return " ".join(f for f in flags if f)


def _choice(rng: random.Random, weighted: dict[str, int]) -> str:
    return rng.choices(list(weighted), weights=list(weighted.values()))[0]


def _body(rng: random.Random, tag: bytes) -> bytes:
    kind = _choice(
        rng,
        {"empty": 2, "tag": 3, "text": 6, "bait": 3, "chunky": 2, "binary": 3, "large": 1},
    )
    if kind == "empty":
        return b""
    if kind == "tag":
        return tag
    if kind == "text":
        return tag + bytes(rng.choice(b"abcdefghij \r\n") for _ in range(rng.randint(1, 300)))
    if kind == "bait":  # a response inside the body: re-framed wrongly, it would be one
        return tag + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbait"
    if kind == "chunky":  # bytes that look like chunk framing
        return tag + b"\r\n0\r\n\r\n5\r\nhello\r\n"
    if kind == "binary":
        return tag + rng.randbytes(rng.randint(1, 600))
    return tag + rng.randbytes(rng.choice([20_000, 70_000, 200_000]))


def _fields(rng: random.Random, tag: bytes, *, hop: bool = True) -> list[bytes]:
    fields = [b"X-Case: " + tag] if rng.random() < 0.9 else []
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        fields.append(rng.choice(FIELDS))
    if hop and rng.random() < 0.25:
        fields.append(rng.choice(HOP_FIELDS))
    return fields


def _chunk(rng: random.Random, body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while pos < len(body):
        size = rng.randint(1, len(body) - pos)
        digits = rng.choice([b"%x", b"%X", b"0%x", b"%x", b"%x"]) % size
        ext = rng.choice([b""] * 6 + [b";a", b";a=b", b' ; name = "q \\" s"', b";a;b=c", b"\t;x=1"])
        out += digits + ext + b"\r\n" + body[pos : pos + size] + b"\r\n"
        pos += size
    trailers = rng.choice([b"", b"", b"", b"X-T: 1\r\n", b"X-T: 1\r\nX-U: 2\r\n"])
    return bytes(out) + rng.choice([b"0", b"000", b"0;end"]) + b"\r\n" + trailers + b"\r\n"


def _message(status: bytes, fields: list[bytes], body: bytes, version: bytes = b"1.1") -> bytes:
    return _raw(b"HTTP/%s %s" % (version, status), fields, body)


def _raw(start_line: bytes, fields: list[bytes], body: bytes) -> bytes:
    return start_line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


def _valid(rng: random.Random, tag: bytes) -> bytes:
    """A valid response: Content-Length, chunked, or (rarely) close-delimited."""
    body = _body(rng, tag)
    fields = _fields(rng, tag)
    status = rng.choice(REASONS)
    framing = _choice(rng, {"length": 5, "chunked": 4, "close": 1})
    if framing == "length":
        fields.insert(rng.randint(0, len(fields)), b"Content-Length: %d" % len(body))
        return _message(status, fields, body)
    if framing == "chunked":
        fields.insert(rng.randint(0, len(fields)), b"Transfer-Encoding: chunked")
        return _message(status, fields, _chunk(rng, body))
    return _message(status, fields, body)


def _family(rng: random.Random, family: str, tag: bytes) -> bytes:
    body = _body(rng, tag)
    fields = _fields(rng, tag)
    status = rng.choice(REASONS)
    if family == "valid":
        return _valid(rng, tag)
    if family == "close_delimited":
        return _message(status, fields, body)
    if family == "no_body_status":
        status = rng.choice([b"204 No Content", b"304 Not Modified"])
        framing = rng.choice(
            [
                b"",
                b"Content-Length: 0",
                b"Content-Length: %d" % len(body),
                b"Transfer-Encoding: chunked",
            ]
        )
        fields = [f for f in [framing] if f] + fields
        tail = rng.choice([b"", b"", body, _chunk(rng, body)])  # a body it must not have
        return _message(status, fields, tail)
    if family == "informational":
        prefix = b"".join(rng.choice(INTERIM) for _ in range(rng.randint(1, 3)))
        if rng.random() < 0.15:  # interim responses and nothing else
            return prefix
        return prefix + _valid(rng, tag)
    if family == "bad_status_line":
        line = rng.choice(BAD_STATUS_LINES)
        return _raw(line, [b"Content-Length: %d" % len(body), *fields], body)
    if family == "bad_head":
        fields.insert(rng.randint(0, len(fields)), rng.choice(BAD_FIELD_LINES))
        if rng.random() < 0.5:
            fields.append(b"Content-Length: %d" % len(body))
            return _message(status, fields, body)
        fields.append(b"Transfer-Encoding: chunked")
        return _message(status, fields, _chunk(rng, body))
    if family == "huge_head":
        size = rng.choice([7_000, 8_100, 8_300, 12_000, 70_000])
        many = rng.random() < 0.5
        if many:
            filler = [b"X-F%d: v" % i for i in range(size // 12)]
        else:
            filler = [b"X-Big: " + b"h" * size]
        return _message(status, [*fields, *filler, b"Content-Length: %d" % len(body)], body)
    if family == "framing_conflict":
        kind = rng.randrange(4)
        if kind == 0:  # Content-Length and Transfer-Encoding, either order, either body
            pair = [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
            rng.shuffle(pair)
            encoded = _chunk(rng, body) if rng.random() < 0.5 else body
            return _message(status, [*pair, *fields], encoded)
        if kind == 1:  # two lengths (or spellings of one)
            variant = rng.choice(CONTENT_LENGTH_VARIANTS)
            other = len(body) + rng.choice([0, 0, 1, -1, 10])
            if variant.count(b"%") == 2:
                line = variant % (len(body), max(other, 0))
            else:
                line = variant % len(body)
            return _message(status, [line, *fields], body)
        coding = rng.choice(TRANSFER_CODINGS)  # codings, and HTTP/1.0 with chunked
        version = b"1.0" if kind == 3 else b"1.1"
        encoded = _chunk(rng, body) if b"chunked" in coding.lower() else body
        return _message(status, [b"Transfer-Encoding: " + coding, *fields], encoded, version)
    if family == "bad_chunking":
        return _bad_chunking(rng, status, fields, body or tag)
    if family == "switching":
        upgrade = rng.choice([b"websocket", b"h2c", b"foo", b""])
        lines = [b"Connection: Upgrade", b"Upgrade: " + upgrade] if upgrade else []
        return _message(b"101 Switching Protocols", lines, rng.choice([b"", b"\x81\x02hi", body]))
    if family == "trailing_data":
        after = rng.choice(
            [
                b"garbage",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Smuggled: yes\r\n\r\nextra",
                b"HTTP/1.1 200 OK\r\nContent-Len",
                b"\r\n",
                b"0\r\n\r\n",
                tag,
            ]
        )
        return _valid(rng, tag) + after
    if family == "truncated":
        whole = _valid(rng, tag)
        head_end = whole.find(b"\r\n\r\n") + 4
        if head_end >= len(whole):
            return whole[: rng.randint(1, len(whole))]
        return whole[: rng.randint(head_end, len(whole) - 1)]
    if family == "http10":
        framing = rng.choice(
            [
                b"Content-Length: %d" % len(body),
                b"",
                b"Connection: keep-alive\r\nContent-Length: %d" % len(body),
            ]
        )
        return _message(status, [f for f in [framing] if f] + fields, body, b"1.0")
    raise AssertionError(family)


def _bad_chunking(rng: random.Random, status: bytes, fields: list[bytes], body: bytes) -> bytes:
    head = _message(status, [b"Transfer-Encoding: chunked", *fields], b"")
    good = _chunk(rng, body)
    size = len(body)
    kind = rng.randrange(9)
    if kind == 0:  # a size that is no number
        line = rng.choice(
            [
                b"g",
                b"-1",
                b"0x%x" % size,
                b" %x" % size,
                b"%x %x" % (size, size),
                b"+%x" % size,
                b"",
            ]
        )
        return head + line + b"\r\n" + body + b"\r\n0\r\n\r\n"
    if kind == 1:  # chunk data not followed by CRLF
        return (
            head + b"%x\r\n" % size + body + rng.choice([b"", b"\n", b"\r", b"XX"]) + b"0\r\n\r\n"
        )
    if kind == 2:  # more data than the size says
        return head + b"%x\r\n" % max(size - 1, 1) + body + b"\r\n0\r\n\r\n"
    if kind == 3:  # overlong sizes
        line = rng.choice([b"1" + b"0" * 16, b"f" * 16, b"0" * 40 + b"%x" % size, b"ffffffff"])
        return head + line + b"\r\n" + body + b"\r\n0\r\n\r\n"
    if kind == 4:  # a truncated last chunk
        return head + good[: len(good) - rng.randint(1, 5)]
    if kind == 5:  # no last chunk at all
        return head + b"%x\r\n" % size + body + b"\r\n"
    if kind == 6:  # bare LF line ends in the chunk framing
        return head + b"%x\n" % size + body + b"\r\n0\r\n\r\n"
    if kind == 7:  # bad extensions
        ext = rng.choice([b";\x00", b"; a=\x01", b";", b";=", b';a="unterminated', b"; a b"])
        return head + b"%x" % size + ext + b"\r\n" + body + b"\r\n0\r\n\r\n"
    trailer = rng.choice([b"Bad Name: x", b"X: a\x00b", b" folded", b"X-T: 1\n"])
    return head + b"%x\r\n" % size + body + b"\r\n0\r\n" + trailer + b"\r\n\r\n"


FAMILIES = {
    "valid": 16,
    "close_delimited": 5,
    "no_body_status": 5,
    "informational": 6,
    "bad_status_line": 5,
    "bad_head": 8,
    "huge_head": 2,
    "framing_conflict": 9,
    "bad_chunking": 9,
    "switching": 3,
    "trailing_data": 6,
    "truncated": 6,
    "http10": 4,
}
_SPECIAL = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b"0",
    b"9",
    b";",
    b",",
    b"\x7f",
    b"\xff",
    b"-",
]


def mutate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One mutation, mostly in the head and the first chunk line, where framing lives."""
    if not data:
        return data, "none"
    head_end = data.find(b"\r\n\r\n")
    hot = len(data) if head_end < 0 else min(len(data), head_end + 24)
    pos = rng.randrange(hot) if rng.random() < 0.75 else rng.randrange(len(data))
    op = rng.randrange(8)
    if op == 0:
        new = bytes([rng.randrange(256)])
        return data[:pos] + new + data[pos + 1 :], f"flip {pos}={new!r}"
    if op == 1:
        new = rng.choice(_SPECIAL)
        return data[:pos] + new + data[pos:], f"insert {pos}+{new!r}"
    if op == 2:
        size = rng.randint(1, 8)
        return data[:pos] + data[pos + size :], f"delete {pos}:{pos + size}"
    if op == 3:
        return data[: max(pos, 1)], f"truncate {max(pos, 1)}"
    if op == 4:  # a head line twice
        lines = data[: max(head_end, 0)].split(b"\r\n")
        if len(lines) > 1:
            line = rng.choice(lines[1:])
            at = data.find(line)
            return data[:at] + line + b"\r\n" + data[at:], f"duplicate {line[:40]!r}"
        return data, "none"
    if op == 5:
        size = rng.randint(1, 12)
        span = data[pos : pos + size]
        return data[:pos] + span.swapcase() + data[pos + size :], f"case {pos}"
    if op == 6:  # a number changed: lengths, sizes, statuses
        numbers = list(re.finditer(rb"[0-9A-Fa-f]+", data[:hot]))
        if numbers:
            found = rng.choice(numbers)
            new = rng.choice([b"0", b"1", b"99999999", b"-1", b"1" * 20, found.group() + b"0"])
            return data[: found.start()] + new + data[
                found.end() :
            ], f"number {found.start()}={new!r}"
        return data, "none"
    # line ends: CRLF to LF, CR, CRCRLF, LFCR
    ends = [m.start() for m in re.finditer(rb"\r\n", data[:hot])]
    if ends:
        at = rng.choice(ends)
        new = rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n\r\n"])
        return data[:at] + new + data[at + 2 :], f"line end {at}={new!r}"
    return data, "none"


def _pieces(rng: random.Random, data: bytes) -> list[Step]:
    if len(data) < 2 or rng.random() < 0.6:
        return [Send(data)]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 4))))
    steps: list[Step] = []
    for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):
        if steps:
            steps.append(Sleep(rng.choice([0.0, 0.001, 0.003])))
        steps.append(Send(data[start:stop]))
    return steps


def _ending(rng: random.Random, family: str) -> list[Step]:
    weights = {"keep": 40, "close": 22, "half": 6, "hang": 12, "reset": 12, "late-reset": 4}
    if family == "close_delimited":
        weights = {"keep": 8, "close": 45, "half": 15, "hang": 12, "reset": 12, "late-reset": 4}
    kind = _choice(rng, weights)
    if kind == "keep":
        return []
    if kind == "close":
        return [Close()]
    if kind == "half":
        return [HalfClose()]
    if kind == "hang":
        return [Hang(rng.choice([0.05, 0.15, 1.5]))]
    if kind == "reset":
        return [Reset()]
    return [Sleep(0.02), Reset()]


def generate_case(seed: int, index: int) -> FuzzCase:
    """Case `index` of the run seeded `seed` (each case has its own generator, so a case
    replays alone and the order threads take them in does not matter)."""
    rng = random.Random(f"{seed}/{index}")
    family = _choice(rng, FAMILIES)
    tag = b"<case f%d>" % index
    data = _family(rng, family, tag)
    notes = [family]
    if family not in ("huge_head",) and rng.random() < 0.25:
        for _ in range(rng.choice([1, 1, 2, 3])):
            data, note = mutate(rng, data)
            notes.append(note)
    method = b"HEAD" if rng.random() < 0.12 else b"GET"
    http10 = rng.random() < 0.1
    keep_alive10 = http10 and rng.random() < 0.5
    upgrade = not http10 and rng.random() < (0.5 if family == "switching" else 0.05)
    script = Script([*_pieces(rng, data), *_ending(rng, family)])
    notes.append(type(script.steps[-1]).__name__)
    return FuzzCase(index, family, method, http10, script, notes, keep_alive10, upgrade)
