"""An HTTP/2 request's header block as the HTTP/1.1 request head the upstream gets (sans-I/O).

Checked in one pass, here rather than by h2's own validation (which is off: it walked the
fields six times, a tenth of the HTTP/2 path's time), in two tiers:

- malformed by RFC 9113 8.2 and 8.3 (`MalformedRequest`: the connection ends with GOAWAY
  PROTOCOL_ERROR, as h2 itself would): connection-specific fields (Connection, Keep-Alive,
  Proxy-Connection, Transfer-Encoding, Upgrade), TE other than "trailers", a name that is not a
  lowercase token, CR, LF or NUL in a value or whitespace around it, pseudo-header fields
  unknown, repeated, after a regular field or missing, a Host that disagrees with :authority;
- what HTTP/2 allows but an HTTP/1.1 upstream must not see (`H2RequestError`, 400 on the
  stream), by h11's grammar and the control-byte rule the HTTP/1.1 side is held to: a method that
  is no token, a :path with a space or not in origin-form (it would become part of the request
  line), other control bytes in values, a Content-Length that is not one number; and 431 for a
  header list over max_header_bytes.

`:authority` becomes Host (RFC 9113 8.3.1), first, as in an HTTP/1.1 request. Cookie fields,
which HTTP/2 clients split for compression, are joined with "; " (RFC 9113 8.2.3). A body
without Content-Length goes upstream chunked: HTTP/2 frames it, HTTP/1.1 needs a framing of
its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from h11._abnf import field_value as _value_grammar
from h11._abnf import method as _method_grammar
from h11._abnf import request_target as _target_grammar

from proxy.downstream.request_head import CONTROL_BYTES, RequestHead

_METHOD = re.compile(_method_grammar.encode("ascii"))
_TARGET = re.compile(_target_grammar.encode("ascii"))
_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-z]+")  # a token, lowercase (RFC 9113 8.2.1)
_VALUE = re.compile(_value_grammar.encode("ascii"))  # no CR, LF, NUL, nor whitespace around
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
_MAX_LENGTH_DIGITS = 18
# RFC 9113 6.5.2 / RFC 7541 4.1: a field's size for SETTINGS_MAX_HEADER_LIST_SIZE.
FIELD_OVERHEAD = 32


class H2RequestError(Exception):
    """A header block that becomes no HTTP/1.1 request: answer `status` on the stream."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class MalformedRequest(Exception):
    """RFC 9113 8.1.1: a malformed request; the connection ends with PROTOCOL_ERROR."""


def header_list_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + FIELD_OVERHEAD
    return size


def request_from_h2(
    headers: Iterable[tuple[bytes, bytes]], *, end_stream: bool, max_header_bytes: int
) -> RequestHead:
    """The request head for a stream's header block; `end_stream`: the block ended the stream
    (no body). Raises MalformedRequest or H2RequestError."""
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    host = None
    length = None
    cookies: list[bytes] | None = None
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + FIELD_OVERHEAD
        if name[:1] == b":":
            if fields or name not in _PSEUDO or name in pseudo:
                raise MalformedRequest(f"pseudo-header field {name!r} misplaced or unknown")
            pseudo[name] = value
            continue
        if _NAME.fullmatch(name) is None:
            raise MalformedRequest(f"field name {name!r} is no lowercase token")
        if value and _VALUE.fullmatch(value) is None:
            raise MalformedRequest(f"the value of {name!r} has CR, LF, NUL or outer whitespace")
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            raise MalformedRequest(f"connection-specific field {name!r}")
        if CONTROL_BYTES.search(value) is not None:
            raise H2RequestError(400, f"a control byte in the value of {name!r}")
        if name == b"host":
            if host is not None:
                raise MalformedRequest("two Host fields")
            host = value
            continue  # :authority replaces it, or it goes first
        if name == b"content-length":
            if not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
                raise H2RequestError(400, "content-length is not a number")
            if length is not None and value != length:
                raise H2RequestError(400, "two different content-length fields")
            if length is not None:
                continue
            length = value
        elif name == b"cookie":
            if cookies is None:
                cookies = [value]
                fields.append((name, value))  # its place; the joined value replaces it below
            else:
                cookies.append(value)
            continue
        fields.append((name, value))
    if cookies is not None and len(cookies) > 1:
        joined = b"; ".join(cookies)
        fields = [(n, joined if n == b"cookie" else v) for n, v in fields]
    method = pseudo.get(b":method")
    path = pseudo.get(b":path")
    authority = pseudo.get(b":authority")
    if method is None:
        raise MalformedRequest("no :method")
    if method == b"CONNECT":
        if b":path" in pseudo or b":scheme" in pseudo:
            raise MalformedRequest("CONNECT with :path or :scheme")
        path = authority or b"-"  # the exchange answers 405, as to an HTTP/1.1 CONNECT
    elif path is None or b":scheme" not in pseudo:
        raise MalformedRequest("no :path or no :scheme")
    if authority is not None and host is not None and host != authority:
        raise MalformedRequest("Host disagrees with :authority")
    if size > max_header_bytes:
        raise H2RequestError(431, f"header list of {size} bytes (max_header_bytes)")
    if _METHOD.fullmatch(method) is None:
        raise H2RequestError(400, "the method is not a token")
    if method != b"CONNECT":
        if _TARGET.fullmatch(path) is None:
            raise H2RequestError(400, ":path is not a request target")
        if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
            raise H2RequestError(400, ":path is not in origin-form")
    authority = authority if authority is not None else host
    if authority is not None:
        fields.insert(0, (b"host", authority))
    if not end_stream and length is None:
        fields.append((b"transfer-encoding", b"chunked"))
    return RequestHead(method, path, b"1.1", fields)
