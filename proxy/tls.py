"""TLS termination: the server contexts and the SNI callback that picks a certificate.

How a handshake finds its certificate: the listener's context has no certificate of its own. When
the ClientHello arrives, OpenSSL calls `CertificateSelector.on_server_name` with the name the
client asked for (or None for a bare-IP client). The callback looks the name up in the in-memory
certificate cache (exact name, then a one-label wildcard, then the default site) and switches the
connection to that certificate's own context, whose chain is then sent. The callback runs inside
the handshake on the event loop, so it only reads a dict: no disk, no issuance, no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import ssl
import sys
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from certs.files import refuse_passphrase
from certs.models import ClientAuthSpec, Installed
from proxy.downstream.forwarding import client_cert_lines
from proxy.downstream.responses import PLAIN_HTTP_ON_TLS_PORT
from proxy.logs import tls_log

# Mozilla "intermediate": TLS 1.2 with forward-secret AEAD suites only; TLS 1.3's suites are all
# AEAD and forward-secret already. No DHE: it needs custom parameters and adds nothing over ECDHE.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
# ALPN, in the server's order of preference (OpenSSL picks the first the client also offers).
ALPN_H2 = ["h2", "http/1.1"]
ALPN_HTTP1 = ["http/1.1"]
_alpn_protocols = ALPN_H2  # [server] http2; contexts take it when they are made

# The raw socket of the handshake in progress, for the SNI callback. The accept loop sets it in
# the task that runs one handshake; each task has its own context, and the event loop runs the
# TLS layer's callbacks (so this SNI callback too) in the context the transport was made in.
handshake_socket_fd: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "handshake_socket_fd", default=None
)
# A TLS record: alert (21), version 3.3 (TLS 1.2, what TLS 1.3 records also say), length 2,
# fatal (2), unrecognized_name (112). Plaintext, as every record before the ServerHello is.
UNRECOGNIZED_NAME_ALERT = bytes((21, 3, 3, 0, 2, 2, 112))
# The same with handshake_failure (40): the connection started with the wrong front context.
HANDSHAKE_FAILURE_ALERT = bytes((21, 3, 3, 0, 2, 2, 40))
# OpenSSL's reasons for refusing a client certificate (or its absence). Its alert for them
# (certificate_required in TLS 1.3, handshake_failure or the verify error's in TLS 1.2) is
# encrypted in TLS 1.3 and follows the records already sent, so only OpenSSL's own output
# buffer has it right: DirectSSLObject writes that buffer out before the TLS layer closes.
CLIENT_CERT_REASONS = frozenset(
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED", "NO_CERTIFICATES_RETURNED")
)
# OpenSSL's reasons for refusing a client it shares no protocol version or cipher (or curve, or
# signature algorithm) with. Its alert (protocol_version, handshake_failure) answers the
# ClientHello, before anything else was sent, and is flushed by hand like the one above: nginx
# sends it, and a client then says why ("tlsv1 alert protocol version") instead of "connection
# reset". Kept to a list: other failures may come after records the client already has, or
# (CALLBACK_FAILED) had their alert written by the SNI callback.
NOTHING_IN_COMMON_REASONS = {
    "UNSUPPORTED_PROTOCOL": "no TLS version in common (TLS 1.2 and 1.3 are served)",
    "VERSION_TOO_LOW": "no TLS version in common (TLS 1.2 and 1.3 are served)",
    "NO_PROTOCOLS_AVAILABLE": "no TLS version in common (TLS 1.2 and 1.3 are served)",
    "WRONG_SSL_VERSION": "no TLS version in common (TLS 1.2 and 1.3 are served)",
    "NO_SHARED_CIPHER": "no cipher in common (AES-GCM or ChaCha20, with ECDHE in TLS 1.2)",
    "NO_SHARED_GROUPS": "no key exchange group in common",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no signature algorithm in common with the certificate",
}
# OpenSSL's own errors for a plain HTTP request (or a proxy's CONNECT) where a ClientHello
# should be: it sees "GET ", "POST", "HEAD", "PUT " or "CONNECT" in the first record header.
PLAIN_HTTP_REASONS = frozenset(("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"))


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(TLS12_CIPHERS)
    context.set_alpn_protocols(_alpn_protocols)
    # Compression invites CRIME; renegotiation is a DoS lever (RFC 9113 9.2.1 forbids it in h2).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Session tickets stay on (OpenSSL's default): resumption saves a full handshake per reconnect.
    return context


def offer_http2(enabled: bool, contexts: Iterable[ssl.SSLContext] = ()) -> None:
    """[server] http2: the ALPN list of every context made from now on, and of `contexts`
    already made. OpenSSL asks for ALPN after the SNI callback switched the connection to its
    certificate's context, so the front and the certificate contexts all need the same list;
    a reload keeps certificate contexts (and their session tickets), so they change in place."""
    global _alpn_protocols
    _alpn_protocols = ALPN_H2 if enabled else ALPN_HTTP1
    for context in contexts:
        context.set_alpn_protocols(_alpn_protocols)


def server_context(
    cert_file: Path, key_file: Path, client_ca: Path | None = None
) -> ssl.SSLContext:
    """A context serving one certificate chain; the certs package builds one per certificate.
    OpenSSL checks here that the key belongs to the chain's first certificate.

    `client_ca` (a client_auth site): the CAs client certificates are verified against. Only
    the store is used: whether a certificate is asked for was decided by the front context
    the connection started with (see FrontContexts)."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(str(cert_file), str(key_file), password=refuse_passphrase)
    if client_ca is not None:
        context.load_verify_locations(cafile=str(client_ca))
    return context


class DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose write/pending are the C methods themselves, and whose read lets a
    client half-close.

    The event loop's TLS layer calls these for every record it decrypts or encrypts, and
    ssl.SSLObject's own methods are Python functions that only forward to the C object
    (`self._sslobj`): binding the C methods on the instance skips a Python frame per call,
    several per request. The calls stay positional, as uvloop's and asyncio's TLS layers make
    them. `do_handshake` stays a Python method: it answers plain HTTP sent to this TLS port.

    `read` stays one too, for the client's close_notify. Both event loops' TLS layers shut the
    connection down when they read one, so a client that half-closes after its request (TLS 1.3
    allows it, RFC 8446 6.1; socat and ncat do it at the end of their input) would lose the
    response. Once the connection's protocol has set `on_close_notify`, a close_notify is not
    passed on as end of data: the callback hears of it, reads report "no more data yet" from
    then on, and one byte left in the incoming buffer keeps the TLS layer from reading the FIN
    that follows (see flow.hold_tls_reads). When the protocol closes, OpenSSL, which knows the
    close_notify came, answers with its own and the connection ends as usual."""

    on_close_notify: Callable[[], None] | None
    close_notified: bool

    @classmethod
    def _create(  # type: ignore[override]
        cls, incoming: ssl.MemoryBIO, *args: object, **kwargs: object
    ) -> DirectSSLObject:
        self = super()._create(incoming, *args, **kwargs)  # type: ignore[arg-type]
        # wrap_bio passes the outgoing BIO second, positionally (both event loops use it).
        self._outgoing = args[0] if args else kwargs.get("outgoing")
        c_object = self._sslobj  # type: ignore[attr-defined]
        self._c_read = c_object.read
        self.write = c_object.write  # type: ignore[method-assign]
        self.pending = c_object.pending  # type: ignore[method-assign]
        self._incoming = incoming
        self.on_close_notify = None
        self.close_notified = False
        return self

    def read(self, size: int = 1024, buffer: bytearray | None = None) -> bytes | int:  # type: ignore[override]
        if self.close_notified:
            raise ssl.SSLWantReadError("the client half-closed: nothing more will be read")
        result = self._c_read(size) if buffer is None else self._c_read(size, buffer)
        if result or self.on_close_notify is None:
            return result
        # OpenSSL returns nothing (b"" or 0) only for the client's close_notify.
        self.close_notified = True
        self._incoming.write(b"\0")  # never parsed: every read stops above from now on
        self.on_close_notify()
        raise ssl.SSLWantReadError("the client half-closed")

    def do_handshake(self) -> None:
        try:
            self._sslobj.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLError as exc:
            # OpenSSL itself recognizes a plain HTTP request where a ClientHello should be
            # (its "http request" error): answering it costs the other handshakes nothing.
            if exc.reason in PLAIN_HTTP_REASONS:
                _write_before_tls(PLAIN_HTTP_ON_TLS_PORT)
            elif exc.reason in CLIENT_CERT_REASONS or exc.reason in NOTHING_IN_COMMON_REASONS:
                self._flush_alert()
            raise

    def _flush_alert(self) -> None:
        """Send the alert OpenSSL wrote for a refused client certificate: both event loops'
        TLS layers close on a failed handshake without sending what is pending. The records
        before it went out when the handshake last waited for the client, so this follows
        them in order."""
        outgoing = self._outgoing
        if isinstance(outgoing, ssl.MemoryBIO) and outgoing.pending:
            _write_raw(outgoing.read())
            _linger_after_alert()


# How long a socket refused with an alert is kept open, reading and dropping what comes, and
# how many at once (each holds a file descriptor that max_connections does not count).
ALERT_LINGER = 1.0
ALERT_LINGER_MAX = 64
_lingering = 0


def _linger_after_alert() -> None:
    """Keep the socket of a refused handshake open a moment after its alert. A TLS 1.3 client
    learns that its certificate was refused only after it finished the handshake, and it sends
    its first bytes at once (an HTTP/2 client its preface): the TLS layer's close, with those
    bytes unread, would send a reset, and a reset can reach the client before it read the
    alert (curl then says "getpeername() failed"). A duplicate of the socket outlives the TLS
    layer's close; it reads and drops what the client sends until the client closes, or
    ALERT_LINGER, and then closes with nothing unread: a FIN, not a reset."""
    global _lingering
    fd = handshake_socket_fd.get()
    if fd is None or _lingering >= ALERT_LINGER_MAX:
        return
    try:
        loop = asyncio.get_running_loop()
        held = os.dup(fd)
    except (OSError, RuntimeError):
        return
    _lingering += 1

    def close() -> None:
        global _lingering
        _lingering -= 1
        loop.remove_reader(held)
        timer.cancel()
        with contextlib.suppress(OSError):
            os.close(held)

    def drain() -> None:
        try:
            data = os.read(held, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            close()

    timer = loop.call_later(ALERT_LINGER, close)
    loop.add_reader(held, drain)


class CertificateLookup(Protocol):
    def lookup(self, server_name: str | None) -> Installed | None: ...
    def lookup_exact_or_wildcard(self, server_name: str) -> Installed | None: ...


class SiteNames(Protocol):
    def site_for_name(self, name: str | None) -> object | None: ...


def normalize_server_name(name: str | None) -> str | None:
    # One trailing dot, as certs.selection.normalize_host strips: the cache and the site
    # lookup must agree on the name, or "localhost.." looks like a site without a certificate.
    if not name:
        return None
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    return name or None


def _quiet_undecodable_server_names(previous: Callable[..., object]) -> Callable[..., object]:
    """CPython's ssl decodes the ClientHello's server name before calling the SNI callback; a
    name that is not ASCII fails that decoding, the handshake is refused, and the error is
    printed as an "Exception ignored" traceback. Any client could fill the log with those: the
    hook says it once per handshake, in one debug line, and passes everything else on."""

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        # The "object" CPython reports is the server name's bytes.
        if isinstance(unraisable.exc_value, UnicodeDecodeError) and isinstance(
            unraisable.object, bytes
        ):
            if tls_log.isEnabledFor(logging.DEBUG):
                tls_log.debug("refusing handshake: the server name is not ASCII")
            return
        previous(unraisable)

    hook.tlsproxy = True  # type: ignore[attr-defined]
    return hook


def install_sni_decode_hook() -> None:
    if not getattr(sys.unraisablehook, "tlsproxy", False):
        sys.unraisablehook = _quiet_undecodable_server_names(sys.unraisablehook)


# A client_auth site's front context is shared by its certificates with the same client CAs.
FrontKey = tuple[str, ClientAuthSpec, tuple[bytes, ...]]


class CertificateSelector:
    """Owns the listener context and its SNI callback. `cache` (and `sites`, the configured
    names) are swapped whole on SIGHUP or when certificates change; a handshake reads whichever
    is current when its ClientHello comes.

    Client certificates (client_auth sites): OpenSSL takes a connection's verify mode from the
    context it was created with, and switching contexts in the SNI callback does not change it
    (SSL_set_SSL_CTX copies no verify mode; nginx calls SSL_set_verify after the switch, which
    Python does not expose). So the mode is chosen before the handshake: the listener peeks at
    the ClientHello (proxy.client_hello) and starts the connection with `front_context(name)`,
    the plain `context` or one that asks for a certificate on behalf of that site. The CA it is
    verified against is the site's certificate context's store, which the switch does bring.
    Each such site has its own front contexts, so a session ticket (encrypted under the front
    context's key) is never accepted by another site's. The SNI callback refuses a handshake
    whose front context is not the one its site needs (fail closed: a name the peek could not
    read, a ClientHello split in a way the peek did not follow, a reload in between)."""

    def __init__(self, cache: CertificateLookup, sites: SiteNames | None = None) -> None:
        self.cache = cache
        self.sites = sites
        self.context = self._new_front(ssl.CERT_NONE)
        self._fronts: dict[FrontKey, ssl.SSLContext] = {}
        # The CA store of each certificate context, read once: a renewal brings a new context
        # with the same store, and must not retire the front its site's connections start with.
        self._stores: weakref.WeakKeyDictionary[ssl.SSLContext, tuple[bytes, ...]] = (
            weakref.WeakKeyDictionary()
        )
        install_sni_decode_hook()

    def _new_front(self, verify_mode: ssl.VerifyMode) -> ssl.SSLContext:
        context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        context.sni_callback = self.on_server_name
        context.sslobject_class = DirectSSLObject
        context.verify_mode = verify_mode
        return context

    def update(
        self, cache: CertificateLookup, sites: SiteNames | None, *, http2: bool | None = None
    ) -> None:
        """A reload's certificates and sites; front contexts of sites gone are dropped.
        `http2`: the reload's [server] http2, for every context from the next handshake on."""
        self.cache = cache
        self.sites = sites
        entries = getattr(cache, "entries", None)
        installed = entries() if entries is not None else []
        if entries is not None:
            keep = {self._front_key(i) for i in installed if i.client_auth is not None}
            self._fronts = {k: v for k, v in self._fronts.items() if k in keep}
        if http2 is not None:
            contexts = [self.context, *self._fronts.values(), *(i.context for i in installed)]
            offer_http2(http2, contexts)

    @property
    def asks_client_certificates(self) -> bool:
        """Whether any configured site has client_auth: only then does the listener peek."""
        return bool(getattr(self.sites, "client_auth", False))

    def front_context(self, server_name: str | None) -> ssl.SSLContext:
        """The context a connection whose ClientHello asks for `server_name` starts with."""
        installed = self.choose(server_name)
        if installed is None or installed.client_auth is None:
            return self.context
        key = self._front_key(installed)
        context = self._fronts.get(key)
        if context is None:
            # A reload changed the site's client CAs (or its client_auth): sessions resumed
            # from the old front context's tickets, which skip verification, must not be
            # accepted any more. The old front goes with them. A renewal of the site's own
            # certificate keeps the store, so it keeps the front and its tickets too.
            self._fronts = {k: v for k, v in self._fronts.items() if k[0] != key[0]}
            required = installed.client_auth.required
            context = self._new_front(ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL)
            self._fronts[key] = context
        return context

    def choose(self, server_name: str | None) -> Installed | None:
        """The certificate for a ClientHello's name: the name's own (exact, then wildcard),
        else the default site's, unless the name belongs to a site whose certificate does
        not exist yet (an ACME order in flight): that handshake fails rather than showing a
        certificate for another name."""
        cache = self.cache
        if server_name:
            installed = cache.lookup_exact_or_wildcard(server_name)
            if installed is not None:
                return installed
            sites = self.sites
            if sites is not None and sites.site_for_name(normalize_server_name(server_name)):
                return None
        return cache.lookup(None)

    def on_server_name(
        self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> int | None:
        installed = self.choose(server_name)
        if installed is None:
            # The peer address is not known here; the listener logs the failure with it.
            if tls_log.isEnabledFor(logging.DEBUG):
                tls_log.debug(
                    "refusing handshake: no certificate for %s",
                    repr(server_name) if server_name else "a client without SNI (no default_site)",
                )
            _send_unrecognized_name()
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        if installed.client_auth is None:
            front_ok = context is self.context
        else:
            front_ok = context is self._fronts.get(self._front_key(installed))
        if not front_ok:
            if tls_log.isEnabledFor(logging.DEBUG):
                tls_log.debug(
                    "refusing handshake for %r: it did not start as site %r's client_auth "
                    "needs (its ClientHello was not read before the handshake)",
                    server_name,
                    installed.spec_name,
                )
            _write_raw(HANDSHAKE_FAILURE_ALERT)
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        ssl_object.context = installed.context
        ssl_object.tlsproxy_sni = normalize_server_name(server_name)  # type: ignore[attr-defined]
        ssl_object.tlsproxy_cert = installed  # type: ignore[attr-defined]
        if tls_log.isEnabledFor(logging.DEBUG):
            # Said after the handshake, with the peer (log_handshake): why the default site.
            ssl_object.tlsproxy_fallback = self._fallback_reason(server_name)  # type: ignore[attr-defined]
        return None

    def _fallback_reason(self, server_name: str | None) -> str | None:
        """Why a handshake got the default site's certificate, or None when it got its own."""
        if not server_name:
            return "the client sent no SNI (it connected by IP address, or it is very old)"
        if self.cache.lookup_exact_or_wildcard(server_name) is not None:
            return None
        return f"SNI {server_name!r} is no site's name"

    def _front_key(self, installed: Installed) -> FrontKey:
        assert installed.client_auth is not None
        store = self._stores.get(installed.context)
        if store is None:
            store = tuple(installed.context.get_ca_certs(binary_form=True))
            self._stores[installed.context] = store
        return (installed.spec_name, installed.client_auth, store)


def _send_unrecognized_name() -> None:
    """Tell the client why, as nginx's ssl_reject_handshake does. OpenSSL puts the alert in
    its output buffer, but asyncio's and uvloop's TLS layers close the connection on a failed
    handshake without sending that buffer, so the client would only see the connection close.
    Nothing has been sent on this connection yet (this runs while the ClientHello is read), so
    the same plaintext alert record written straight to the socket is what OpenSSL would have
    sent."""
    _write_raw(UNRECOGNIZED_NAME_ALERT)


def _write_before_tls(data: bytes) -> None:
    """Write to the socket of the handshake in progress, before any TLS record went out (so
    in clear text), while the TLS layer still owns the socket and has not closed it."""
    _write_raw(data)


def _write_raw(data: bytes) -> None:
    """Write bytes straight to the socket of the handshake in progress, behind the TLS
    layer's back (it has nothing buffered then: it is waiting for the client, or failing)."""
    fd = handshake_socket_fd.get()
    if fd is not None:
        try:
            os.write(fd, data)
        except OSError:
            pass  # the client is gone, or its window is full: it sees the close anyway


def describe_handshake(ssl_object: ssl.SSLObject | None, peer: object) -> str:
    """The debug line per handshake: what the client asked for and what it got."""
    if ssl_object is None:
        return f"{peer}: no TLS"
    installed: Installed | None = getattr(ssl_object, "tlsproxy_cert", None)
    sni = getattr(ssl_object, "tlsproxy_sni", None)
    cipher = ssl_object.cipher()
    if installed is not None:
        info = installed.info
        cert = (
            f"cert={installed.spec_name!r} subject={info.subject!r} serial={info.serial:x} "
            f"not_after={info.not_after:%Y-%m-%dT%H:%M:%SZ}"
        )
    else:
        cert = "cert=?"
    return (
        f"handshake {peer} sni={sni or '-'} {cert} version={ssl_object.version()} "
        f"cipher={cipher[0] if cipher else '-'} alpn={ssl_object.selected_alpn_protocol() or '-'} "
        f"resumed={'yes' if ssl_object.session_reused else 'no'}"
    )


def log_handshake(ssl_object: ssl.SSLObject | None, peer: object) -> None:
    if tls_log.isEnabledFor(logging.DEBUG):
        tls_log.debug(describe_handshake(ssl_object, peer))
        fallback = getattr(ssl_object, "tlsproxy_fallback", None)
        if fallback:
            installed = getattr(ssl_object, "tlsproxy_cert", None)
            tls_log.debug(
                "%s: served the default site's certificate (%r): %s",
                peer,
                installed.spec_name if installed is not None else "?",
                fallback,
            )


def client_certificate_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The DER of the client's certificate and of the chain it was verified with (leaf first),
    or [] when the client sent none. A resumed session has its leaf only: OpenSSL verified the
    chain when the session was made and keeps no chain in a session."""
    leaf = ssl_object.getpeercert(binary_form=True)
    if not leaf:
        return []
    # Public from Python 3.13; 3.11 and 3.12 have it on the C object only.
    verified = getattr(ssl_object, "get_verified_chain", None)
    if verified is None:
        verified = ssl_object._sslobj.get_verified_chain  # type: ignore[attr-defined]
    chain = verified() or []
    ders = [item if isinstance(item, bytes) else item.public_bytes(_ENCODING_DER) for item in chain]
    if ders and ders[0] == leaf:
        ders = ders[1:]
    return [leaf, *ders]


_ENCODING_DER = 2  # _ssl.ENCODING_DER, for the Certificate objects of Python < 3.13


# The header lines of chains verified in full handshakes, by (the site's certificate context,
# the leaf): a session resumed from one of them shows its leaf only, and its front context
# (hence its certificate context) is the one that verified it. Bounded; starts over when full.
_VERIFIED: dict[tuple[ssl.SSLContext, bytes], bytes] = {}
_VERIFIED_MAX = 1024


def client_cert_header(ssl_object: ssl.SSLObject) -> bytes:
    """Client-Cert and Client-Cert-Chain lines (RFC 9440) for a connection's verified client
    certificate; b"" when the client presented none. Once per connection."""
    chain = client_certificate_chain(ssl_object)
    if not chain:
        return b""
    key = (ssl_object.context, chain[0])
    if ssl_object.session_reused:
        known = _VERIFIED.get(key)
        # Unknown (evicted): the leaf alone; RFC 9440 makes the chain optional.
        return known if known is not None else client_cert_lines(chain)
    lines = client_cert_lines(chain)
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()
    _VERIFIED[key] = lines
    return lines
