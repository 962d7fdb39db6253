"""Pure canned responses the proxy writes itself: errors, the https redirect, small text bodies.

Each is a complete HTTP/1.1 message (head and body) as bytes, ready for one transport.write().
Error responses are built once at import; only the rare Retry-After variant is built per call.
`head=True` gives the answer to a HEAD request: same head (Content-Length included), no body.
"""

from __future__ import annotations

from http import HTTPStatus

from proxy.downstream.routing import normalize_host

# RFC 9110 phrases (413 was renamed from "Payload Too Large"); HTTPStatus covers the rest.
_REASONS: dict[int, bytes] = {
    200: b"OK",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
ERROR_STATUSES = (400, 404, 405, 408, 413, 421, 431, 500, 501, 502, 503, 504, 505)


def reason(status: int) -> bytes:
    """The reason phrase for a status code (b"" for codes nobody named)."""
    phrase = _REASONS.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            phrase = b""
    return phrase


def plain_response(
    status: int,
    body: bytes,
    *,
    close: bool = False,
    head: bool = False,
    extra: tuple[tuple[bytes, bytes], ...] = (),
    extra_lines: bytes = b"",
) -> bytes:
    """A complete response with a text/plain body (omitted, length kept, when `head`).
    `extra_lines`: whole header lines made beforehand (a site's Strict-Transport-Security)."""
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason(status)),
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(body),
        extra_lines,
    ]
    lines.extend(name + b": " + value + b"\r\n" for name, value in extra)
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    if not head:
        lines.append(body)
    return b"".join(lines)


def error_body(status: int) -> bytes:
    """The text of the proxy's own error responses."""
    return b"%d %s\n" % (status, reason(status))


_ERRORS: dict[tuple[int, bool, bool], bytes] = {
    (status, close, head): plain_response(status, error_body(status), close=close, head=head)
    for status in ERROR_STATUSES
    for close in (False, True)
    for head in (False, True)
}


def error_response(
    status: int,
    *,
    close: bool = True,
    retry_after: int | None = None,
    head: bool = False,
    hsts: bytes | None = None,
) -> bytes:
    """A small text/plain error response; "connection: close" when `close`; `hsts`: the
    site's Strict-Transport-Security line."""
    if retry_after is None:
        if hsts is None:
            cached = _ERRORS.get((status, close, head))
            if cached is not None:
                return cached
        extra: tuple[tuple[bytes, bytes], ...] = ()
    else:
        extra = ((b"retry-after", b"%d" % max(0, retry_after)),)
    return plain_response(
        status, error_body(status), close=close, head=head, extra=extra, extra_lines=hsts or b""
    )


def split_target(target: bytes) -> tuple[bytes | None, bytes] | None:
    """(authority from an absolute-form target or None, path) or None for a target we refuse."""
    if target.startswith(b"/"):
        return None, target
    if target == b"*":  # OPTIONS *: the server itself
        return None, b"/"
    scheme, sep, rest = target.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https"):
        # RFC 9112 3.2.2: with an absolute-form target its authority replaces the Host header.
        slash = rest.find(b"/")
        if slash < 0:
            query = rest.find(b"?")
            if query < 0:
                return rest, b"/"
            return rest[:query], b"/" + rest[query:]
        return rest[:slash], rest[slash:]
    return None  # authority-form (CONNECT) or garbage: nothing to redirect to


def https_location(host: bytes | None, target: bytes, https_port: int) -> bytes | None:
    """The https URL for a plain-http request, or None if its Host (or target) is unusable."""
    split = split_target(target)
    if split is None:
        return None
    authority, path = split
    name = normalize_host(authority if authority is not None else host)
    if name is None:
        return None
    if ":" in name:  # an IPv6 literal goes back into brackets inside a URL
        name = "[" + name + "]"
    location = b"https://" + name.encode("ascii")
    if https_port != 443:
        location += b":%d" % https_port
    return location + path


def redirect_response(location: bytes, *, close: bool = False) -> bytes:
    """A 308 to `location` with an empty body (so the same bytes answer a HEAD).

    308, unlike 301, keeps the method and body, so a POST stays a POST.
    """
    tail = b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" if close else _REDIRECT_TAIL
    return b"HTTP/1.1 308 Permanent Redirect\r\nlocation: " + location + tail


_REDIRECT_TAIL = b"\r\ncontent-length: 0\r\n\r\n"


def redirect_to_https(
    host: bytes | None, target: bytes, https_port: int, *, close: bool = False
) -> bytes:
    """308 to the same host and target on https (port omitted when 443); 400 if Host is bad."""
    location = https_location(host, target, https_port)
    if location is None:
        return error_response(400, close=True)
    return redirect_response(location, close=close)


# What a client that spoke plain HTTP to a TLS port gets, as nginx and Caddy answer it: written
# in clear text, since no TLS session exists to carry it.
PLAIN_HTTP_ON_TLS_PORT = plain_response(
    400, b"Client sent an HTTP request to an HTTPS server: use https:// in the URL.\n", close=True
)
