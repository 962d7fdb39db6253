"""Pure header rewriting between client and upstream: hop-by-hop headers out, forwarding in.

Hop-by-hop headers (RFC 9110 7.6.1) describe one connection and must not cross the proxy:
Connection and every name it lists, Keep-Alive, Proxy-* (and the bare "Proxy" header, so an app
never sees it as HTTP_PROXY: "httpoxy"), TE (only "trailers" is forwarded), Trailer (this proxy
drops trailers in both directions), Upgrade outside an upgrade, HTTP2-Settings. Content-Length or
Transfer-Encoding: chunked stays on the request: the data path re-sends the body with the
framing h11 already validated (never both: with chunked, a Content-Length is dropped).
Connection cannot list Host or the framing headers away, and whatever it lists cannot remove the
forwarding headers this proxy adds.

Forwarding headers are set from what this proxy saw. A client that is not a trusted proxy cannot
inject them: X-Forwarded-For/-Proto/-Host and Forwarded are replaced. From a trusted proxy they
are kept: X-Forwarded-For and Forwarded (lists by definition) get our hop appended, while
X-Forwarded-Proto and X-Forwarded-Host keep the single value that proxy set (the original
client's view; apps such as uvicorn read them as one value, a list would break them) and are
only added when missing.

Client certificates (RFC 9440): Client-Cert and Client-Cert-Chain describe the certificate this
proxy verified. A client that is not a trusted proxy cannot send them: they are dropped, and
the values of this connection's own verified certificate (`client_cert_lines`, computed once
per connection, and only for client_auth sites) are written instead. From a trusted proxy they
are kept as sent (that proxy terminated the client's TLS, as with X-Forwarded-For), and then
this connection's own are not added: they would describe that proxy, not the client.

The hot path is `request_head`: one dict lookup per header, one bytes join per request, and the
per-client forwarding lines cached.

Upgrades (RFC 9110 7.8): a request is an upgrade only when it carries Upgrade and its Connection
lists "upgrade"; anywhere else Upgrade is a hop-by-hop header like the others, and dropped. Were it
forwarded, an app could answer 101 to a request the client never framed as an upgrade, and every
later byte of the connection would reach the app unparsed ("h2c smuggling"). `h2c` is never
offered upstream: RFC 9113 removed it, and behind TLS it has no meaning. A 101 is relayed only when
every protocol it names was offered (`switch_accepted`).

`StrictHeadScanner` refuses what h11 lets through in a request head (bare LF, obs-fold).
"""

from __future__ import annotations

import base64
import functools
import ipaddress
from collections.abc import Iterable, Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What to do with a request header by (lowercased) name; names not listed are forwarded.
_DROP = 1
_TE = 2
_UPGRADE = 3
_CONNECTION = 4
_XFF = 5
_XFPROTO = 6
_XFHOST = 7
_FORWARDED = 8
_CODING = 9
_LENGTH = 10
_CLIENT_CERT = 11
_HOP_BY_HOP: dict[bytes, int] = {
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy": _DROP,
    b"proxy-connection": _DROP,
    b"proxy-authenticate": _DROP,
    b"proxy-authorization": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"upgrade": _UPGRADE,
    b"http2-settings": _DROP,  # h2c's companion of Upgrade (RFC 9113 3.1): never forwarded
}
_REQUEST_ACTIONS: dict[bytes, int] = {
    **_HOP_BY_HOP,
    b"te": _TE,
    b"upgrade": _DROP,  # the offer, when the request is an upgrade, is written once
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFPROTO,
    b"x-forwarded-host": _XFHOST,
    b"forwarded": _FORWARDED,
    b"transfer-encoding": _CODING,
    b"content-length": _LENGTH,
    b"client-cert": _CLIENT_CERT,
    b"client-cert-chain": _CLIENT_CERT,
}
# Transfer-Encoding leaves the response: the client side frames the body itself.
_RESPONSE_ACTIONS: dict[bytes, int] = {**_HOP_BY_HOP, b"transfer-encoding": _DROP}
# Connection options that never name another header (or name one already dropped): seeing
# only these spares a second pass over the headers.
_HARMLESS_OPTIONS = frozenset(
    (b"", b"close", b"keep-alive", b"upgrade", b"te", b"trailer", b"proxy-connection")
)
# Names that must survive a Connection listing anyway: the framing the data path relies on, and
# the Host h11 required. A client listing them is trying to smuggle; we keep the message intact.
_PROTECTED = frozenset((b"host", b"content-length", b"transfer-encoding"))
_TE_LINES = b"te: trailers\r\nconnection: te\r\n"
_TE_UPGRADE_LINES = b"te: trailers\r\nconnection: te, upgrade\r\n"
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class TrustedProxies:
    """The addresses whose forwarding headers are believed (config's `trusted_proxies`)."""

    __slots__ = ("_networks", "contains")

    def __init__(self, networks: Iterable[IPNetwork | str] = ()) -> None:
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        if self._networks:
            # Peers reconnect from the same few addresses: the answer is cached per address.
            self.contains = functools.lru_cache(maxsize=4096)(self._contains)
        else:
            self.contains = _never

    def __bool__(self) -> bool:
        return bool(self._networks)

    def _contains(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:  # not an IP (a unix socket peer, an empty string): not trusted
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
        return any(ip in net for net in self._networks)


def _never(addr: str) -> bool:
    return False


def _connection_options(values: list[bytes]) -> set[bytes]:
    options: set[bytes] = set()
    for value in values:
        for option in value.split(b","):
            options.add(option.strip().lower())
    return options


def _tokens(value: bytes) -> list[bytes]:
    return [item for item in (part.strip(b" \t").lower() for part in value.split(b",")) if item]


def upgrade_offer(
    upgrades: Sequence[bytes], connection: Sequence[bytes], *, http10: bool = False
) -> bytes | None:
    """The Upgrade value to send upstream for a request's Upgrade and Connection field values,
    or None when the request is no upgrade (then Upgrade is dropped like any hop-by-hop header).

    RFC 9110 7.8: Upgrade means something only when Connection lists "upgrade", and a server
    ignores it in an HTTP/1.0 request. `h2c` is taken out of the offer."""
    if http10 or not upgrades or not connection:
        return None
    if not any(b"upgrade" in _tokens(value) for value in connection):
        return None
    offered = [p for value in upgrades for p in _tokens(value) if p != b"h2c"]
    return b", ".join(offered) if offered else None


def switch_accepted(offer: bytes | None, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """May a 101 with these headers be relayed for a request that offered `offer`? Only when it
    names in Upgrade the protocols it switches to, all of them among those the client offered."""
    if offer is None:
        return False
    switched = [p for name, value in headers if name == b"upgrade" for p in _tokens(value)]
    return bool(switched) and set(switched) <= set(_tokens(offer))


def _accepts_trailers(te: bytes) -> bool:
    if b"trailers" not in te.lower():  # the usual TE is absent or "gzip": no parsing needed
        return False
    return any(c.split(b";")[0].strip().lower() == b"trailers" for c in te.split(b","))


def _quote(value: bytes) -> bytes:
    """An RFC 7239 value: a token as is, anything else as a quoted-string."""
    if value and _TCHAR.issuperset(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


@functools.lru_cache(maxsize=4096)
def _node(client_ip: str) -> tuple[bytes, bytes]:
    """(X-Forwarded-For value, Forwarded `for=` value) for a client address."""
    ip = client_ip.encode("ascii", "replace")
    if b":" in ip:  # IPv6: RFC 7239 6 wants it bracketed and quoted
        return ip, b'"[' + ip + b']"'
    return ip, _quote(ip)


@functools.lru_cache(maxsize=4096)
def _replacement_lines(client_ip: str, host: bytes) -> bytes:
    """The four forwarding header lines for an untrusted client (the common case)."""
    xff, node = _node(client_ip)
    return (
        b"x-forwarded-for: " + xff + b"\r\n"
        b"x-forwarded-proto: https\r\n"
        b"x-forwarded-host: " + host + b"\r\n"
        b"forwarded: for=" + node + b";proto=https;host=" + _quote(host) + b"\r\n"
    )


def request_head(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    client_ip: str,
    host: bytes,
    trusted: TrustedProxies,
    upgrade: bytes | None,
    client_cert: bytes | None = None,
) -> bytes:
    """The complete HTTP/1.1 request head to write to the upstream, ending with CRLF CRLF.

    `headers` are h11's (lowercased names, validated values); `host` is the request's Host
    value (for X-Forwarded-Host and Forwarded host=); `upgrade` is the request's
    `upgrade_offer`: sent as Upgrade with "Connection: upgrade", in place of the client's own
    Upgrade fields (which are always dropped). `client_cert`: this connection's
    `client_cert_lines` (None or b"" when it has no verified client certificate).
    """
    head = _request_head(
        method, target, headers, client_ip, host, trusted, upgrade, client_cert, None
    )
    if isinstance(head, bytes):
        return head
    # The client's Connection header named more headers as hop-by-hop (rare): go again with
    # those names dropped like the standard ones.
    actions = {**_REQUEST_ACTIONS, **dict.fromkeys(head, _DROP)}
    result = _request_head(
        method, target, headers, client_ip, host, trusted, upgrade, client_cert, actions
    )
    assert isinstance(result, bytes)
    return result


def _request_head(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    client_ip: str,
    host: bytes,
    trusted: TrustedProxies,
    upgrade: bytes | None,
    client_cert: bytes | None,
    actions: dict[bytes, int] | None,
) -> bytes | set[bytes]:
    """The head, or on the first pass the set of extra names Connection lists (if any)."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    extend = parts.extend  # one join of many small pieces beats concatenating each line
    first_pass = actions is None
    if actions is None:
        actions = _REQUEST_ACTIONS
    connection: list[bytes] | None = None
    forwarding: list[tuple[int, bytes]] | None = None
    client_certs: list[bytes] | None = None
    te_trailers = False
    chunked = False
    length: bytes | None = None
    for name, value in headers:
        action = actions.get(name)
        if action is None:
            if name.startswith(b"proxy-"):
                continue
            extend((name, b": ", value, b"\r\n"))
        elif action == _CONNECTION:
            if first_pass and value.lower() not in _HARMLESS_OPTIONS:
                if connection is None:
                    connection = []
                connection.append(value)
        elif action == _TE:
            te_trailers = te_trailers or _accepts_trailers(value)
        elif action == _CODING:
            chunked = True
            extend((b"transfer-encoding: ", value, b"\r\n"))
        elif action == _LENGTH:
            length = value
        elif action == _CLIENT_CERT:
            if client_certs is None:
                client_certs = []
            client_certs += (name, b": ", value, b"\r\n")
        elif action != _DROP:
            if forwarding is None:
                forwarding = []
            forwarding.append((action, value))

    if connection is not None:
        listed = _connection_options(connection) - _HARMLESS_OPTIONS - _PROTECTED
        if listed:
            return listed
    if length is not None and not chunked:
        # h11 lets chunked win over a Content-Length sent with it. Callers should answer such
        # a request 400 before getting here; should one slip through, RFC 9112 6.3 has an
        # intermediary drop the Content-Length, so no upstream can frame the body differently.
        extend((b"content-length: ", length, b"\r\n"))
    if upgrade is not None:
        extend((b"upgrade: ", upgrade, b"\r\n"))
    if te_trailers:  # RFC 9110 10.1.4: a sender of TE also sends the "TE" connection option
        parts.append(_TE_UPGRADE_LINES if upgrade is not None else _TE_LINES)
    elif upgrade is not None:
        parts.append(b"connection: upgrade\r\n")
    if forwarding is not None and trusted.contains(client_ip):
        parts.append(_appended_lines(forwarding, client_ip, host))
    else:
        parts.append(_replacement_lines(client_ip, host))
    if client_certs is not None and trusted.contains(client_ip):
        extend(client_certs)
    elif client_cert:
        parts.append(client_cert)
    parts.append(b"\r\n")
    return b"".join(parts)


def _sf_binary(der: bytes) -> bytes:
    # RFC 8941 3.3.5: base64 with padding between colons, no line breaks.
    return b":" + base64.b64encode(der) + b":"


def client_cert_lines(chain: Sequence[bytes]) -> bytes:
    """The Client-Cert and Client-Cert-Chain header lines (RFC 9440) for a verified client
    certificate chain given as DER, leaf first; b"" for an empty chain (no certificate).

    Client-Cert is the leaf as an sf-binary. Client-Cert-Chain (RFC 9440 2.3) is a list of
    sf-binary of the rest of the chain the proxy verified it with, in TLS order (each one
    certifies the one before); it never holds the leaf and is not sent without Client-Cert, nor
    when the leaf was itself the trust anchor. The trust anchor is included: RFC 9440 lets a
    proxy omit it only when the origin is known to have it, which this proxy cannot know."""
    if not chain:
        return b""
    leaf, *issuers = chain
    lines = b"client-cert: " + _sf_binary(leaf) + b"\r\n"
    if issuers:
        lines += b"client-cert-chain: " + b", ".join(_sf_binary(c) for c in issuers) + b"\r\n"
    return lines


def _appended_lines(forwarding: list[tuple[int, bytes]], client_ip: str, host: bytes) -> bytes:
    """Forwarding lines for a trusted proxy: its chain kept, our hop appended."""
    xff_in = [v for a, v in forwarding if a == _XFF]
    fwd_in = [v for a, v in forwarding if a == _FORWARDED]
    proto = next((v for a, v in forwarding if a == _XFPROTO), b"https")
    fwd_host = next((v for a, v in forwarding if a == _XFHOST), host)
    xff, node = _node(client_ip)
    element = b"for=" + node + b";proto=https;host=" + _quote(host)
    return (
        b"x-forwarded-for: " + b", ".join([*xff_in, xff]) + b"\r\n"
        b"x-forwarded-proto: " + proto + b"\r\n"
        b"x-forwarded-host: " + fwd_host + b"\r\n"
        b"forwarded: " + b", ".join([*fwd_in, element]) + b"\r\n"
    )


def response_headers(
    headers: Sequence[tuple[bytes, bytes]], *, upgrade: bool = False
) -> list[tuple[bytes, bytes]]:
    """The upstream response's headers to pass to the client, hop-by-hop headers removed.

    Transfer-Encoding goes too (the client side frames the body); Content-Length stays. With
    `upgrade` (a 101 being relayed) Upgrade is kept and ("connection", "upgrade") is added, as
    RFC 6455 clients require it on the 101.
    """
    out: list[tuple[bytes, bytes]] = []
    actions = _RESPONSE_ACTIONS
    connection: list[bytes] | None = None
    for name, value in headers:
        action = actions.get(name)
        if action is None:
            if not name.startswith(b"proxy-"):
                out.append((name, value))
        elif action == _CONNECTION:
            if connection is None:
                connection = []
            connection.append(value)
        elif action == _UPGRADE and upgrade:
            out.append((name, value))
    if connection is not None:
        listed = _connection_options(connection) - _HARMLESS_OPTIONS - _PROTECTED
        if listed:
            out = [(n, v) for n, v in out if n not in listed]
    if upgrade:
        out.append((b"connection", b"upgrade"))
    return out


class StrictHeadScanner:
    """Spots what h11 tolerates in a request head but a proxy must refuse (400), as it arrives.

    h11 accepts a bare LF (one without its CR) as a line end and unfolds obs-fold (a line that
    starts with a space or tab). RFC 9112 2.2 and 5.2 let a server reject both, and a proxy
    should: another parser along the way may split the same bytes differently. Feed every chunk
    while a head is being received; `feed` is True once the head is malformed, and stops looking
    after the blank line that ends the head (the body may hold any byte) until `reset()`.
    """

    __slots__ = ("_done", "_tail")

    def __init__(self) -> None:
        self._tail = b""  # the last bytes before this chunk: a CRLF or the end of the head may span
        self._done = False

    def reset(self) -> None:
        """A new head starts (after the previous message was received in full)."""
        self._tail = b""
        self._done = False

    def feed(self, data: bytes) -> bool:
        if self._done or not data:
            return False
        window = self._tail + data if self._tail else data
        end = window.find(b"\r\n\r\n")
        if end >= 0:
            self._done = True
            window = window[: end + 4]
        if (
            window.count(b"\n") != window.count(b"\r\n")
            or b"\r\n " in window
            or b"\r\n\t" in window
        ):
            return True
        # An LF opening the kept tail was counted with its CR this time; without the CR next
        # time it would look bare, so it is left out (it cannot start a CRLF CRLF anyway).
        self._tail = window[-3:].lstrip(b"\n")
        return False
