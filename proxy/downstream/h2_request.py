"""An HTTP/2 request's header block as the HTTP/1.1 request head the upstream gets (sans-I/O).

The h2 library has already refused what RFC 9113 calls malformed (connection-specific fields,
TE other than "trailers", uppercase names, CR/LF/NUL in values, missing or repeated
pseudo-header fields, a Host that disagrees with :authority) and joined split Cookie fields.
What it lets through but an HTTP/1.1 upstream must not see is refused here with 400, by h11's
own grammar and the control-byte rule the HTTP/1.1 side is held to: a method that is no token,
a :path with a space or not in origin-form (it would become part of the request line), field
names that are no token, values with control bytes, a Content-Length that is not one number.

`:authority` becomes Host (RFC 9113 8.3.1), first, as in an HTTP/1.1 request. A body without
Content-Length goes upstream chunked: HTTP/2 frames it, HTTP/1.1 needs a framing of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from h11._abnf import method as _method_grammar
from h11._abnf import request_target as _target_grammar
from h11._headers import normalize_and_validate
from h11._util import LocalProtocolError

from proxy.downstream.request_head import CONTROL_BYTES, RequestHead

_METHOD = re.compile(_method_grammar.encode("ascii"))
_TARGET = re.compile(_target_grammar.encode("ascii"))
# RFC 9113 6.5.2 / RFC 7541 4.1: a field's size for SETTINGS_MAX_HEADER_LIST_SIZE.
FIELD_OVERHEAD = 32


class H2RequestError(Exception):
    """A header block that becomes no HTTP/1.1 request: answer `status` on the stream."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def header_list_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + FIELD_OVERHEAD
    return size


def request_from_h2(
    headers: Iterable[tuple[bytes, bytes]], *, end_stream: bool, max_header_bytes: int
) -> RequestHead:
    """The request head for a stream's (h2-validated) header block; `end_stream`: the block
    ended the stream (no body). Raises H2RequestError."""
    method = path = authority = None
    fields: list[tuple[bytes, bytes]] = []
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + FIELD_OVERHEAD
        if name[:1] != b":":
            if name != b"host":  # h2 checked it equals :authority, which replaces it
                fields.append((name, value))
            elif authority is None:
                authority = value
        elif name == b":method":
            method = value
        elif name == b":path":
            path = value
        elif name == b":authority":
            authority = value
        # :scheme is https or http; this proxy only hears TLS, and says so upstream itself.
    if size > max_header_bytes:
        raise H2RequestError(431, f"header list of {size} bytes (max_header_bytes)")
    if method is None or not _METHOD.fullmatch(method):
        raise H2RequestError(400, "the method is not a token")
    if method == b"CONNECT":  # no :path; the exchange answers 405, as to an HTTP/1.1 CONNECT
        path = authority or b"-"
    elif path is None or not _TARGET.fullmatch(path):
        raise H2RequestError(400, ":path is not a request target")
    elif path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        raise H2RequestError(400, ":path is not in origin-form")
    if authority is not None:
        fields.insert(0, (b"host", authority))
    try:
        validated = normalize_and_validate(fields, _parsed=False)
    except LocalProtocolError as exc:
        raise H2RequestError(400, str(exc)) from None
    fields = [(name, value) for _, name, value in validated._full_items]
    for _, value in fields:
        if CONTROL_BYTES.search(value) is not None:
            raise H2RequestError(400, "a control byte in a field value")
    if not end_stream and not any(name == b"content-length" for name, _ in fields):
        fields.append((b"transfer-encoding", b"chunked"))
    return RequestHead(method, path, b"1.1", fields)
