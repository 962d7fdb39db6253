"""Pure routing: which configured site answers a request, from the TLS SNI name and the Host header.

Names are compared after `normalize_host`: lowercase, one trailing dot removed, port removed.
IPv6 literals are returned WITHOUT brackets ("[::1]:8443" -> "::1"), the form `proxy.config`
uses for site hosts and listener addresses, so a site listing "::1" matches a Host of "[::1]".

Lookup order (as certmagic's handshake does): exact name, then a one-label wildcard
("*.example.test" matches "a.example.test", neither "a.b.example.test" nor "example.test").

Misdirected requests (RFC 9110 15.5.20): the certificate a TLS client accepted was chosen by its
SNI; a Host served by a different site than the one that certificate belongs to gets 421 so that
a browser reusing a connection across names retries on a fresh one. Like Caddy's strict SNI/Host
check, a known SNI with an unknown Host is also 421, not the default site: the client asked for
one of our names and then for something else on the same connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from certs.models import ClientAuthSpec
    from proxy.config import Site

_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")
_IPV6_CHARS = frozenset("0123456789abcdef:.")
_DIGITS = frozenset("0123456789")
# Routing results are cached per (sni, host) pair; real traffic has few distinct pairs, and a
# client sending random Hosts only makes the cache start over, never grow past this.
_CACHE_MAX = 4096

BAD_REQUEST = 400
NOT_FOUND = 404
MISDIRECTED = 421


def _port_ok(port: str) -> bool:
    # RFC 3986 allows an empty port ("host:"); anything else must be a decimal port number.
    return len(port) <= 5 and _DIGITS.issuperset(port)


def normalize_host(name: str | bytes | None) -> str | None:
    """The comparable form of a Host header or SNI name, or None if it is empty or invalid.

    Lowercased, port stripped, one trailing dot stripped; IPv6 literals without brackets.
    """
    if not name:
        return None
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            return None
    name = name.lower()
    if name[0] == "[":
        end = name.find("]")
        if end < 0:
            return None
        rest = name[end + 1 :]
        if rest and (rest[0] != ":" or not _port_ok(rest[1:])):
            return None
        name = name[1:end]
        if ":" not in name or not _IPV6_CHARS.issuperset(name):
            return None
        return name
    if name.count(":") > 1:  # a bare IPv6 literal (config and SNI-less callers spell it so)
        return name if _IPV6_CHARS.issuperset(name) else None
    host, _, port = name.partition(":")
    if port and not _port_ok(port):
        return None
    if host.endswith("."):
        host = host[:-1]
    if (
        not host
        or host[0] == "."
        or host[-1] == "."
        or ".." in host
        or not _HOST_CHARS.issuperset(host)
    ):
        return None
    return host


def match_name(pattern: str, name: str) -> bool:
    """Whether a normalized name matches a site host: exactly, or "*.parent" by one label."""
    if pattern == name:
        return True
    if pattern.startswith("*."):
        label, dot, parent = name.partition(".")
        return bool(label and dot) and parent == pattern[2:]
    return False


class Router:
    """Maps SNI names and Host headers to sites. Immutable: a config reload builds a new one."""

    __slots__ = ("_cache", "_exact", "_wildcard", "client_auth", "default")

    def __init__(self, sites: Sequence[Site], default_site: str | None = None) -> None:
        # Whether any site asks for client certificates (the listener then peeks at hellos).
        self.client_auth = any(getattr(site, "client_auth", None) for site in sites)
        self._exact: dict[str, Site] = {}
        self._wildcard: dict[str, Site] = {}  # "*.example.test" is stored under "example.test"
        for site in sites:
            for host in site.hosts:
                if host.startswith("*."):
                    self._wildcard.setdefault(host[2:], site)
                else:
                    self._exact.setdefault(normalize_host(host) or host, site)
        self.default: Site | None = None
        if default_site is not None:
            self.default = self.site_for_name(normalize_host(default_site) or default_site)
            if self.default is None:
                raise ValueError(f"default_site {default_site!r} is not a host of any site")
        self._cache: dict[tuple[str | None, bytes | None], tuple[Site | None, int]] = {}

    def site_for_name(self, name: str | None) -> Site | None:
        """The site for a normalized name: exact match, then one-label wildcard; no default."""
        if not name:
            return None
        site = self._exact.get(name)
        if site is not None:
            return site
        label, dot, parent = name.partition(".")
        if label and dot:
            return self._wildcard.get(parent)
        return None

    def route(self, sni: str | None, host: bytes | None) -> tuple[Site | None, int]:
        """(site, 0) for the site that serves this request, or (None, status) to answer with.

        `sni` is the name the client sent in its ClientHello (None without SNI), `host` the raw
        Host header value. 400: Host missing or invalid. 421: the certificate chosen for the SNI
        belongs to another site than the Host's. 404: Host unknown and no default site (with one,
        an unknown Host goes to it). Without SNI (a bare IP) the Host alone decides.
        """
        key = (sni, host)
        result = self._cache.get(key)
        if result is None:
            result = self._route(sni, host)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = result
        return result

    def _route(self, sni: str | None, host: bytes | None) -> tuple[Site | None, int]:
        name = normalize_host(host)
        if name is None:
            return None, BAD_REQUEST
        site = self.site_for_name(name)
        if sni:
            served = self.site_for_name(normalize_host(sni))
            if served is not None:
                # The SNI named one of our sites and its certificate was served: a Host of
                # another site is misdirected (its certificate was never shown to the client).
                # An unknown Host falls through to the default site or 404, as in nginx.
                if site is not None and site is not served:
                    return None, MISDIRECTED
            elif self.default is not None and site is not None and site is not self.default:
                # An unknown SNI got the default site's certificate (the TLS layer refuses it
                # otherwise): any Host of another site is misdirected.
                return None, MISDIRECTED
        if site is None:
            site = self.default
            if site is None:
                return None, NOT_FOUND
        return site, 0


def client_auth_allows(site: Site, verified: tuple[str, ClientAuthSpec] | None) -> bool:
    """May a request for `site`, which has client_auth, be served on a connection whose
    handshake enforced `verified` ((site name, its client_auth), or None when it asked for
    no certificate)? Only when that handshake was this site's, under the same client_auth.

    The SNI/Host checks above do not cover it: a client without SNI gets the default site's
    certificate and then the Host alone decides; and a reload may add or change client_auth
    between a connection's handshake and its requests. Such a request gets 421: the client
    may retry on a connection of its own for that name, where its certificate is asked for."""
    auth = site.client_auth
    if auth is None:
        return True
    if verified is None:
        return False
    name, spec = verified
    return name == site.name and spec.ca == auth.ca and spec.required == auth.required
