"""The client's request head, parsed by h11's own reader into a plain record.

h11's `maybe_read_from_IDLE_client` parses the head (request line and header lines by h11's
regexes, Content-Length and Transfer-Encoding rules by `normalize_and_validate`) and then
builds an `h11.Request`, whose constructor re-checks what the parse already guaranteed and
stores the headers in a `Headers` sequence that is slow to iterate. On the hottest path of
the proxy that object cost about as much as the parse. `read_request_head` runs the same
parsing steps, in the same order, and keeps the result in a `RequestHead`; the checks of
`h11.Request.__init__` that the parse does not already make (one Host, mandatory in
HTTP/1.1) are made here. The pieces come from h11's private modules: h11 is pinned to a
minor version for that reason (pyproject.toml), and tests/unit/downstream/test_request_head.py
compares every outcome with h11's own reader.
"""

from __future__ import annotations

import re

from h11._headers import normalize_and_validate
from h11._readers import _decode_header_lines, request_line_re
from h11._receivebuffer import ReceiveBuffer
from h11._util import LocalProtocolError, validate

# Control bytes other than HTAB (and the CR LF that end lines): h11 lets them through in field
# values, RFC 9110 5.5 calls them invalid, and an app's parser may refuse or read them otherwise.
CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class RequestHead:
    """An h11-parsed request head: method, target and version as bytes, and the fields as
    (lowercased name, value) pairs in the order received."""

    __slots__ = ("fields", "http_version", "method", "target")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        http_version: bytes,
        fields: list[tuple[bytes, bytes]],
    ) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.fields = fields

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r}, {self.target!r}, {self.http_version!r})"


def read_request_head(buf: ReceiveBuffer) -> RequestHead | None:
    """The next request head out of `buf`, None while it is incomplete. Raises h11's
    LocalProtocolError (with its error_status_hint) for anything h11 refuses."""
    lines = buf.maybe_extract_lines()
    if lines is None:
        if buf.is_next_line_obviously_invalid_request_line():
            raise LocalProtocolError("illegal request line")
        return None
    if not lines:
        raise LocalProtocolError("no request line received")
    # The request line's regex is also what h11.Request checks method and target against.
    matches = validate(request_line_re, lines[0], "illegal request line: {!r}", lines[0])
    headers = normalize_and_validate(list(_decode_header_lines(lines[1:])), _parsed=True)
    fields = [(name, value) for _, name, value in headers._full_items]
    hosts = 0
    for name, _ in fields:
        if name == b"host":
            hosts += 1
    http_version = matches["http_version"]
    if http_version != b"1.1" and http_version != b"1.0":
        # h11 takes any digit.digit; a message that says 0.9 or 2.0 but has HTTP/1.1's syntax
        # is none of them (RFC 9110 15.6.6), and an app might read it by the version it says.
        raise LocalProtocolError("unsupported HTTP version", error_status_hint=505)
    if hosts == 0 and http_version == b"1.1":
        raise LocalProtocolError("Missing mandatory Host: header")
    if hosts > 1:
        raise LocalProtocolError("Found multiple Host: headers")
    return RequestHead(matches["method"], matches["target"], http_version, fields)
