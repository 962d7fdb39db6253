"""`tlsproxy run --trace HOST`: the README's walk-through ("How TLS termination works here"),
printed for each connection to HOST as it really happened.

Sans-I/O apart from the logger: the hooks in listeners.py, negotiated.py, connection.py,
h2_connection.py and exchange.py hand facts over (a ClientHello verdict, an SSLObject, a request
head, the head built for the upstream, times from the event loop's clock) and this module words
them. Every line goes to the `tlsproxy.trace` logger at INFO and starts with `trace c<N>` (the
traced connection's number), and for a request `c<N>.<M>` (its number on the connection) or
`c<N>.s<ID>` (its HTTP/2 stream), so interleaved connections can be followed. The step numbers
and names are the README's.

Free when off: the server holds no `Tracer` unless --trace was given, and every hook is one
`is not None` test of an attribute that is None on untraced connections and exchanges.

Secrets never appear: the values of Authorization, Proxy-Authorization, Cookie and Set-Cookie are
replaced by their size, wherever a field is printed; no key or ticket key is ever read here.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.client_hello import HelloVerdict

trace_log = logging.getLogger("tlsproxy.trace")

SECRET_FIELDS = frozenset((b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"))
# RFC 8446 4.2.7 and the IANA registry: the groups a client may offer a key share for.
GROUP_NAMES = {
    0x0017: "secp256r1",
    0x0018: "secp384r1",
    0x0019: "secp521r1",
    0x001D: "x25519",
    0x001E: "x448",
    0x0100: "ffdhe2048",
    0x0101: "ffdhe3072",
    0x0102: "ffdhe4096",
    0x0103: "ffdhe6144",
    0x0104: "ffdhe8192",
    0x11EC: "X25519MLKEM768",
    0x6399: "X25519Kyber768Draft00",
}
# What OpenSSL 3 (Python's ssl) serves with its default group list, which the proxy keeps.
SERVER_GROUPS = frozenset((0x001D, 0x0017, 0x001E, 0x0019, 0x0018, *range(0x0100, 0x0105)))
VERSION_NAMES = {0x0304: "TLSv1.3", 0x0303: "TLSv1.2", 0x0302: "TLSv1.1", 0x0301: "TLSv1.0"}
_HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
        b"http2-settings",
    )
)
_FORWARDING = frozenset(
    (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded")
)


def _is_grease(value: int) -> bool:
    # RFC 8701: 0x0a0a, 0x1a1a ... 0xfafa, sent to keep servers tolerant of unknown values.
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


def group_name(group: int) -> str:
    if _is_grease(group):
        return "GREASE"
    return GROUP_NAMES.get(group, f"0x{group:04x}")


def version_name(version: int) -> str:
    if _is_grease(version):
        return "GREASE"
    return VERSION_NAMES.get(version, f"0x{version:04x}")


def shown(name: bytes, value: bytes) -> str:
    """A field's value as a trace prints it: secrets by their size only."""
    if name in SECRET_FIELDS:
        return f"<hidden, {len(value)} bytes>"
    return value.decode("latin-1")


def field_lines(fields: Iterable[tuple[bytes, bytes]]) -> list[str]:
    return [f"{name.decode('latin-1')}: {shown(name, value)}" for name, value in fields]


def negotiated_group(version: str | None, key_shares: Sequence[int]) -> str:
    """The key exchange group, as far as it can be known: Python 3.11's ssl has no call for the
    negotiated group (SSL_get_negotiated_group). In TLS 1.3 without a HelloRetryRequest, OpenSSL
    takes the first of the client's key shares whose group it supports, so that group is it;
    with none it asks for another (HelloRetryRequest), whose group this cannot see."""
    if version != "TLSv1.3":
        return "ECDHE (TLS 1.2: Python's ssl cannot name the curve)"
    for group in key_shares:
        if group in SERVER_GROUPS:
            return f"{group_name(group)} (as offered in the client's key share)"
    if not key_shares:
        return "unknown (the ClientHello was not read)"
    return "unknown (a HelloRetryRequest chose it: no key share the server supports)"


# --- the header diff ------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    kind: str  # "removed", "added", "replaced"
    name: bytes
    before: tuple[bytes, ...]
    after: tuple[bytes, ...]
    why: str

    def lines(self) -> list[str]:
        name = self.name.decode("latin-1")
        old = ", ".join(shown(self.name, v) for v in self.before)
        new = ", ".join(shown(self.name, v) for v in self.after)
        if self.kind == "removed":
            if not self.before:  # HTTP/2 pseudo-header fields, named together
                return [f"- {name}   ({self.why})"]
            return [f"- {name}: {old}   ({self.why})"]
        if self.kind == "added":
            return [f"+ {name}: {new}   ({self.why})"]
        return [f"~ {name}: {old} -> {new}   ({self.why})"]


def head_fields(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(request line, fields) of a head forwarding.request_head built."""
    lines = head.split(b"\r\n")
    fields = []
    for line in lines[1:]:
        if not line:
            break
        name, _, value = line.partition(b":")
        fields.append((name.strip().lower(), value.strip()))
    return lines[0], fields


def header_diff(
    client: Sequence[tuple[bytes, bytes]],
    upstream: Sequence[tuple[bytes, bytes]],
    *,
    trusted: bool,
    http2: bool = False,
) -> list[Change]:
    """What the proxy changed between the client's fields and those it sent upstream, each
    with why. `trusted`: the client is one of trusted_proxies. HTTP/2 pseudo-header fields are
    left to the caller (they become the request line and Host)."""
    before: dict[bytes, list[bytes]] = {}
    for name, value in client:
        if not name.startswith(b":"):
            before.setdefault(name, []).append(value)
    after: dict[bytes, list[bytes]] = {}
    for name, value in upstream:
        after.setdefault(name, []).append(value)
    listed = {
        option.strip().lower()
        for value in before.get(b"connection", ())
        for option in value.split(b",")
        if option.strip()
    }
    changes = []
    for name, values in before.items():
        sent = after.get(name)
        if sent == values:
            continue
        if sent is None:
            changes.append(Change("removed", name, tuple(values), (), _why_removed(name, listed)))
        else:
            why = _why_replaced(name, trusted, http2)
            changes.append(Change("replaced", name, tuple(values), tuple(sent), why))
    for name, values in after.items():
        if name not in before:
            changes.append(
                Change("added", name, (), tuple(values), _why_added(name, trusted, http2))
            )
    return changes


def _why_removed(name: bytes, listed: set[bytes]) -> str:
    if name in _HOP_BY_HOP or name.startswith(b"proxy-"):
        return "hop-by-hop, RFC 9110 7.6.1: it describes the client's connection only"
    if name in listed:
        return "hop-by-hop: the client's Connection header lists it"
    if name in _FORWARDING:
        return "set from the connection instead: the client is not in trusted_proxies"
    if name in (b"client-cert", b"client-cert-chain"):
        return "only the proxy says which certificate it verified (RFC 9440)"
    if name == b"content-length":
        return "the body is chunked: Transfer-Encoding wins (RFC 9112 6.3)"
    return "not forwarded"


def _why_added(name: bytes, trusted: bool, http2: bool) -> str:
    if name in _FORWARDING:
        return "what the proxy saw, set from the connection"
    if name == b"host":
        return "from :authority (HTTP/2)" if http2 else "stand-in from the SNI or the default site"
    if name in (b"client-cert", b"client-cert-chain"):
        return "the client certificate the handshake verified (RFC 9440)"
    if name == b"upgrade" or name == b"connection":
        return "the upgrade offer, sent with Connection: upgrade (RFC 9110 7.8)"
    if name == b"te":
        return "trailers accepted (RFC 9110 10.1.4)"
    return "added by the proxy"


def _why_replaced(name: bytes, trusted: bool, http2: bool) -> str:
    if name in _FORWARDING:
        if trusted:
            return "the client is in trusted_proxies: its value kept, this hop appended"
        return "set from the connection: the client is not in trusted_proxies"
    if name == b"host":
        return "from the absolute-form target (RFC 9110 7.2)"
    if name == b"cookie" and http2:
        return "the client's cookie fields joined into one (RFC 9113 8.2.3)"
    if name == b"te":
        return "only 'trailers' is forwarded"
    if name in (b"client-cert", b"client-cert-chain"):
        return "the client certificate the handshake verified (RFC 9440)"
    return "rewritten by the proxy"


# --- who is traced ----------------------------------------------------------------------------


class Tracer:
    """The names given with --trace (lowercased; '*' for every connection), owned by the
    server so a SIGHUP keeps them, and the counter that numbers traced connections."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(n.strip().lower().rstrip(".") for n in names if n.strip())
        self.everything = "*" in self.names
        self._numbers = itertools.count(1)
        trace_log.setLevel(logging.INFO)  # whatever log_level says: the user asked for it

    def wants(self, server_name: str | None) -> bool:
        if self.everything:
            return True
        if not server_name:
            return False  # a connection without SNI is traced by '*' only
        return server_name.lower().rstrip(".") in self.names

    def start(
        self, peer: str, local: str, accepted_at: float, hello: HelloVerdict | None
    ) -> ConnectionTrace | None:
        """The trace of a connection whose ClientHello was peeked at, or None if not traced."""
        server_name = hello.server_name if hello is not None else None
        if not self.wants(server_name):
            return None
        trace = ConnectionTrace(next(self._numbers), accepted_at)
        trace.accepted(peer, local, hello)
        return trace


# --- one traced connection ------------------------------------------------------------------


class ConnectionTrace:
    """The trace of one client connection and of its requests."""

    def __init__(self, number: int, accepted_at: float, emit: Any = None) -> None:
        self.tag = f"c{number}"
        self.accepted_at = accepted_at
        self.requests = 0
        self.key_shares: tuple[int, ...] = ()
        self.handshake_seconds = 0.0
        self.proxy_closed = False  # the proxy ended the connection first
        self._emit = emit if emit is not None else trace_log.info

    def say(self, text: str, tag: str | None = None) -> None:
        self._emit(f"trace {tag or self.tag} {text}")

    def accepted(self, peer: str, local: str, hello: HelloVerdict | None) -> None:
        self.say(f"1. DNS and TCP: accepted {peer} on {local}")
        if hello is None or hello.state != "hello":
            self.say("2. ClientHello and SNI: the first bytes are no TLS ClientHello")
            return
        self.key_shares = hello.key_shares
        sni = hello.server_name or "none (the client connected by IP address)"
        alpn = ",".join(hello.alpn) or "none (HTTP/1.1 then)"
        versions = ",".join(version_name(v) for v in hello.versions if not _is_grease(v))
        shares = ",".join(group_name(g) for g in hello.key_shares if not _is_grease(g)) or "none"
        self.say(
            f"2. ClientHello and SNI: SNI {sni}; ALPN offered {alpn}; TLS versions offered "
            f"{versions}; key shares offered {shares}"
        )

    def handshake_done(self, ssl_object: Any, now: float) -> None:
        """Steps 3 and 4, once the handshake is complete."""
        self.handshake_seconds = now - self.accepted_at
        installed = getattr(ssl_object, "tlsproxy_cert", None)
        sni = getattr(ssl_object, "tlsproxy_sni", None)
        if installed is not None:
            info = installed.info
            self.say(
                f"3. Certificate choice: site {installed.spec_name!r}, "
                f"{certificate_match(sni, info.hosts)}; subject {info.subject}, issuer "
                f"{info.issuer}, serial {info.serial:x}, not_after "
                f"{info.not_after:%Y-%m-%dT%H:%M:%SZ}"
            )
        version = ssl_object.version()
        cipher = ssl_object.cipher()
        alpn = ssl_object.selected_alpn_protocol()
        protocol = "HTTP/2" if alpn == "h2" else "HTTP/1.1"
        self.say(
            f"4. Handshake: done in {_ms(self.handshake_seconds)}: {version}, cipher "
            f"{cipher[0] if cipher else '-'}, key exchange "
            f"{negotiated_group(version, self.key_shares)}, "
            f"{_RESUMED if ssl_object.session_reused else 'new session'}, "
            f"ALPN {alpn or 'none'}: {protocol}"
        )

    def handshake_failed(self, reason: str, now: float) -> None:
        self.say(f"4. Handshake: failed after {_ms(now - self.accepted_at)}: {reason}")

    def request(self, label: str, now: float) -> RequestTrace:
        self.requests += 1
        return RequestTrace(self, f"{self.tag}.{label}", now)

    def closed(self, by_client: bool, error: BaseException | None) -> None:
        who = "the client closed it" if by_client else "the proxy closed it"
        if error is not None:
            who += f" ({error})"
        self.say(f"end: {who} after {self.requests} request(s)")


def certificate_match(sni: str | None, hosts: Sequence[str]) -> str:
    """How the SNI name found the certificate: exact, one-label wildcard, or default site."""
    if not sni:
        return "the default site's (the client sent no SNI)"
    if sni in hosts:
        return f"exact match for {sni}"
    _, dot, parent = sni.partition(".")
    if dot and f"*.{parent}" in hosts:
        return f"wildcard match: *.{parent} covers {sni}"
    return f"the default site's (SNI {sni!r} is no site's name)"


class RequestTrace:
    """One request of a traced connection: steps 5 to 8 and the timings."""

    __slots__ = (
        "conn",
        "connect_started",
        "connected",
        "first_byte",
        "head_at",
        "http2",
        "received",
        "retries",
        "started",
        "tag",
    )

    def __init__(self, conn: ConnectionTrace, tag: str, head_at: float) -> None:
        self.conn = conn
        self.tag = tag
        self.head_at = head_at  # when the request head was complete
        self.started = head_at  # when its first byte came (HTTP/1.1 says it)
        self.received: list[tuple[bytes, bytes]] = []
        self.http2 = False  # the head came as HTTP/2 fields (pseudo-header fields first)
        self.connect_started = 0.0
        self.connected = 0.0
        self.first_byte = 0.0
        self.retries = 0

    def say(self, text: str) -> None:
        self.conn.say(text, self.tag)

    def head(
        self,
        request_line: str,
        fields: Sequence[tuple[bytes, bytes]],
        how: str,
        first_byte_at: float | None = None,
    ) -> None:
        """Step 5: the request head as received (names as h11 or h2 gave them: lowercase)."""
        self.received = list(fields)
        self.http2 = bool(fields) and fields[0][0].startswith(b":")
        if first_byte_at is not None:
            self.started = first_byte_at
        self.say(f"5. HTTP inside TLS: {how}: {request_line}")
        for line in field_lines(fields):
            self.say(f"     {line}")

    def routed(self, sni: str | None, host: bytes | None, site: str) -> None:
        self.say(f"6. Routing: {routing_words(sni, host)}: site {site!r}")

    def refused(self, sni: str | None, host: bytes | None, status: int, why: str) -> None:
        self.say(f"6. Routing: {routing_words(sni, host)}: answered {status}: {why}")

    def forwarded(self, head: bytes, *, trusted: bool) -> None:
        """Step 7: the head sent upstream, as a diff against the client's."""
        http2 = self.http2
        request_line, sent = head_fields(head)
        changes = header_diff(self.received, sent, trusted=trusted, http2=http2)
        if http2:
            pseudo = [n.decode() for n, _ in self.received if n.startswith(b":")]
            changes.insert(
                0,
                Change(
                    "removed",
                    ", ".join(pseudo).encode(),
                    (),
                    (),
                    f"HTTP/2 pseudo-header fields: the request line is now "
                    f"{request_line.decode('latin-1')!r}",
                ),
            )
        kept = len(sent) - sum(1 for c in changes if c.kind != "removed")
        self.say(
            f"7. Forwarding: {request_line.decode('latin-1')}: {len(changes)} change(s), "
            f"{kept} field(s) as the client sent them"
        )
        for change in changes:
            for line in change.lines():
                self.say(f"     {line}")

    def upstream(self, pool: Any, slot: Any, reused: bool, now: float) -> None:
        servers = ", ".join(
            f"{s.server.label} {len(s.idle)} idle/{s.outstanding} in flight" for s in pool.slots
        )
        policy = getattr(pool.balancer, "policy", "?")
        how = (
            "only server" if len(pool.slots) == 1 else f"chosen by {policy} among {len(pool.slots)}"
        )
        if reused:
            conn = "reused an idle keep-alive connection"
        else:
            conn = "no idle connection: opening a new one"
            self.connect_started = now
        self.say(
            f"7. Forwarding: upstream {pool.name!r} server {slot.server.label} ({how}); "
            f"pool after the choice: {servers}; {conn}"
        )

    def connect_done(self, error: BaseException | None, now: float) -> None:
        self.connected = now
        if error is None:
            self.say(f"7. Forwarding: connected in {_ms(now - self.connect_started)}")
        else:
            self.say(
                f"7. Forwarding: connect failed after {_ms(now - self.connect_started)}: {error}"
            )

    def upstream_failed(self, error: Any, retrying: bool) -> None:
        if retrying:
            self.retries += 1
        then = "retrying" if retrying else "no retry"
        self.say(f"7. Forwarding: the upstream failed ({error}): {then}")

    def response_started(self, status: int, now: float) -> None:
        if not self.first_byte:
            self.first_byte = now
        self.say(f"9. Response: the app answered {status}")

    def tunnel(self, offer: bytes | None) -> None:
        protocol = offer.decode("latin-1") if offer else "?"
        self.say(f"9. Response: 101, upgraded to {protocol}: bytes now pass both ways as they are")

    def finished(self, status: int, body_in: int, bytes_out: int, now: float) -> None:
        parts = [f"head {_ms(self.head_at - self.started)}"]
        if self.connect_started:
            parts.append(f"upstream connect {_ms(self.connected - self.connect_started)}")
        if self.first_byte:
            parts.append(f"first response byte {_ms(self.first_byte - self.head_at)}")
        parts.append(f"last byte {_ms(now - self.head_at)}")
        retries = f", {self.retries} retry" if self.retries else ""
        self.say(
            f"9. Response: done: {status}, {bytes_out} bytes to the client, {body_in} "
            f"request body bytes{retries}; handshake {_ms(self.conn.handshake_seconds)}, "
            f"{', '.join(parts)}"
        )


def routing_words(sni: str | None, host: bytes | None) -> str:
    host_text = host.decode("latin-1") if host else "none"
    return f"Host {host_text}, SNI {sni or 'none'}"


REFUSALS = {
    400: "the Host header is missing or invalid",
    404: "no site has that Host and there is no default_site",
    405: "CONNECT is not served",
    413: "the body is over max_body_bytes",
    502: "the site's upstream is not there",
    503: "no server of the upstream can take a request (all down)",
}


UPSTREAM_ANSWERS = {
    502: "Bad Gateway: the upstream gave no answer",
    503: "no server of the upstream can take a request (all down)",
    504: "Gateway Timeout: the upstream was too slow",
}


def refusal_reason(status: int, sni: str | None, host: bytes | None, router: Any) -> str:
    """Why routing (or what follows it) answered `status` itself."""
    if status == 421:
        from proxy.downstream.routing import normalize_host

        site = router.site_for_name(normalize_host(host))
        served = router.site_for_name(normalize_host(sni)) if sni else None
        if site is not None and served is not None and site is not served:
            return (
                f"Misdirected Request: Host belongs to site {site.name!r} but the certificate "
                f"served for SNI {sni} belongs to site {served.name!r}"
            )
        if site is not None and served is None:
            return (
                f"Misdirected Request: SNI {sni or 'none'} got the default site's certificate, "
                f"and Host belongs to site {site.name!r}"
            )
        return "Misdirected Request: this connection's handshake was not that site's client_auth"
    return REFUSALS.get(status, "answered by the proxy")


_RESUMED = "resumed session (no public-key work)"


def _ms(seconds: float) -> str:
    return f"{max(0.0, seconds) * 1000:.1f}ms"
