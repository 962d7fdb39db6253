"""The configuration: a TOML document turned into frozen dataclasses.

Pure: `parse_config` takes the decoded TOML dict and the directory relative paths are resolved
against, and returns a `Config` or raises `ConfigError` naming the offending key (as a dotted
path such as ``site[1].upstream`` or ``limits.idle_timeout``). Only `load_config` touches the disk.
Files that the config names (certificates, TSIG keys) are checked by `tlsproxy check`, not here.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from certs.broken import BROKEN_KINDS
from certs.storage.contract import StorageSettings
from proxy.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Address:
    """A listener address. ``host`` is a literal IP ("::1" without brackets) or a name."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamServer:
    """One backend: TCP (host, port) or a unix socket (path)."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def label(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        assert self.host is not None
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.label


# The admin endpoint's address has the same two shapes as an upstream server's.
AdminAddress = UpstreamServer


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = 10.0
    header_read_timeout: float = 15.0
    idle_timeout: float = 75.0
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 60.0
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 100 * 1024 * 1024
    max_connections: int = 10000
    # nginx's client_body_timeout: the longest wait between two reads of a request body.
    body_read_timeout: float = 60.0
    # An upgraded connection (WebSocket) with no byte either way for this long is closed. Long
    # enough for apps that ping every few minutes; short enough that dead peers do not pile up.
    tunnel_idle_timeout: float = 3600.0


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


TlsSource = Literal["internal", "acme"] | TlsFiles


@dataclass(frozen=True)
class ClientAuth:
    """Mutual TLS for a site: the CA its client certificates must chain to ("internal": the
    local CA's root) and whether a client without one is refused."""

    ca: Path | Literal["internal"]
    required: bool = True


@dataclass(frozen=True)
class Site:
    hosts: tuple[str, ...]  # lowercased, no trailing dot; "*.example.test" allowed
    tls: TlsSource
    upstream: str
    challenge: str | None = None  # per-site ACME challenge override
    broken: str | None = None  # for tests: a kind of certificate clients must refuse
    client_auth: ClientAuth | None = None
    hsts: str | None = None  # the Strict-Transport-Security value, as configured
    # The whole header line, made once here so that a response pays one bytes join for it.
    hsts_header: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.hosts[0]


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    servers: tuple[UpstreamServer, ...] = ()
    balance: Literal["least_conn", "round_robin"] = "least_conn"
    # Pooled idle connections are dropped after this, shorter than uvicorn's own 5 s keep-alive,
    # so the pool never reuses a connection just as the app closes it.
    keepalive_timeout: float = 4.0
    max_idle_connections: int = 64
    retry_idempotent: bool = True  # replay GET/HEAD/OPTIONS/PUT/DELETE after a reset mid-request
    # Supervised workers (issue 4): servers are then the workers the proxy starts.
    command: str | None = None
    workers: int | Literal["auto"] = 1
    prestart: tuple[str, ...] = ()
    health: str | None = None
    health_interval: float = 5.0
    health_timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    fail_timeout: float = 10.0  # passive health: how long a failed server stays down
    max_memory: int | None = None
    max_requests: int | None = None
    max_requests_jitter: int = 0
    stop_timeout: float = 10.0  # SIGTERM to SIGKILL for workers
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AcmeDns:
    server: Address
    tsig_key: Path
    zone: str | None = None
    propagation_timeout: float = 60.0


@dataclass(frozen=True)
class AcmeConfig:
    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str | None = None
    challenge: Literal["http-01", "dns-01"] = "http-01"
    ca_bundle: Path | None = None
    eab_kid: str | None = None
    eab_hmac_key: str | None = None
    profile: str | None = None
    dns: AcmeDns | None = None


# The local CA's leaves: short-lived like Caddy's, long enough that a laptop asleep over a weekend
# wakes up to a certificate still valid. The bounds keep a typo from issuing a leaf per second
# or one that outlives the intermediate that signs it.
DEFAULT_LEAF_LIFETIME = 7 * 86400.0
MIN_LEAF_LIFETIME = 10.0
MAX_LEAF_LIFETIME = 365 * 86400.0


@dataclass(frozen=True)
class LocalCaSettings:
    leaf_lifetime: float = DEFAULT_LEAF_LIFETIME  # seconds
    # A root the user brings (PEM certificate and its key) instead of the one made in data_dir.
    root_cert: Path | None = None
    root_key: Path | None = None


@dataclass(frozen=True)
class ServerSettings:
    https: tuple[Address, ...] = (Address("0.0.0.0", 443),)
    http: tuple[Address, ...] = (Address("0.0.0.0", 80),)
    data_dir: Path = Path("./data")
    trusted_proxies: tuple[IPNetwork, ...] = ()
    default_site: str | None = None
    shutdown_grace: float = 30.0
    http2: bool = True  # ALPN offers h2 before http/1.1
    access_log: Literal["text", "json", "off"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # GET /metrics (and /status, /certs): TCP on loopback, or a unix socket; None is off.
    admin: AdminAddress | None = None
    admin_allow_remote: bool = False


@dataclass(frozen=True)
class Config:
    server: ServerSettings
    limits: Limits
    sites: tuple[Site, ...]
    upstreams: Mapping[str, UpstreamConfig]
    acme: AcmeConfig | None = None
    local_ca: LocalCaSettings = LocalCaSettings()
    # Where certificates, keys, the ACME account, the local CA and HTTP-01 tokens live
    # (certs.storage): data_dir, or a Redis shared by several instances.
    storage: StorageSettings = field(default_factory=StorageSettings)
    source: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def site_by_host(self, host: str) -> Site | None:
        for site in self.sites:
            if host in site.hosts:
                return site
        return None


# --- parsing -----------------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def parse_duration(value: object, key: str) -> float:
    """ "500ms", "10s", "2m", "1h", "1d" or a number of seconds; never negative."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration such as '10s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or (unit not in _DURATION_UNITS and unit != ""):
            raise ConfigError(
                key, f"expected a duration such as '500ms', '10s', '2m', '1h', got {value!r}"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS.get(unit or "s", 1.0)
    else:
        raise ConfigError(key, f"expected a duration such as '10s', got {value!r}")
    if seconds < 0 or not math.isfinite(seconds):
        raise ConfigError(key, f"must be a positive duration, got {value!r}")
    return seconds


def parse_size(value: object, key: str) -> int:
    """Bytes as a number or "64KiB", "100MiB", "1GB"."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size such as '64KiB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ConfigError(
                key, f"expected a size such as 65536, '64KiB' or '100MiB', got {value!r}"
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ConfigError(key, f"expected a size such as '64KiB', got {value!r}")
    if size < 0:
        raise ConfigError(key, f"must not be negative, got {value!r}")
    return size


def parse_address(value: object, key: str) -> Address:
    """ "127.0.0.1:8443", "[::1]:8443", "0.0.0.0:443", "localhost:8080"."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected 'HOST:PORT', got {value!r}")
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ConfigError(key, f"expected '[IPv6]:PORT', got {value!r}")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(key, f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ConfigError(key, f"expected 'HOST:PORT' (IPv6 as '[::1]:PORT'), got {value!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(key, f"port must be a number from 0 to 65535, got {value!r}")
    return Address(host, int(port_text))


def parse_host_pattern(value: object, key: str) -> str:
    """A DNS name or a one-label wildcard, normalised: lowercase, no trailing dot."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected a host name, got {value!r}")
    name = value.strip().lower().rstrip(".")
    labels = name.split(".")
    check = labels[1:] if labels[0] == "*" else labels
    if labels[0] == "*" and len(labels) < 2:
        raise ConfigError(key, f"a wildcard needs a parent domain, got {value!r}")
    try:  # an IP literal is a valid Host for a site reached by address
        return str(ipaddress.ip_address(name))  # one spelling, as certificates compare it
    except ValueError:
        pass
    if not all(_HOST_LABEL.match(label) for label in check):
        raise ConfigError(key, f"{value!r} is not a valid host name (wildcards only as '*.domain')")
    return name


class _Table:
    """A TOML table being consumed: every key must be taken, leftovers are 'unknown key' errors."""

    def __init__(self, data: object, key: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(key, f"expected a table, got {type(data).__name__}")
        self.data: dict[str, Any] = dict(data)
        self.key = key

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def take(self, name: str, default: Any = None) -> Any:
        return self.data.pop(name, default)

    def has(self, name: str) -> bool:
        return name in self.data

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.take(name, default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(self.path(name), f"expected a string, got {value!r}")
        return value

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.take(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                self.path(name), f"expected a whole number >= {minimum}, got {value!r}"
            )
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.take(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.path(name), f"expected true or false, got {value!r}")
        return value

    def duration(self, name: str, default: float) -> float:
        return parse_duration(self.take(name, default), self.path(name))

    def size(self, name: str, default: int) -> int:
        return parse_size(self.take(name, default), self.path(name))

    def string_list(self, name: str, default: list[str]) -> list[str]:
        value = self.take(name, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(self.path(name), f"expected a list of strings, got {value!r}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.take(name, default)
        if value not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise ConfigError(self.path(name), f"expected one of {options}, got {value!r}")
        return value

    def path_value(self, name: str, base: Path) -> Path | None:
        value = self.string(name)
        if value is None:
            return None
        if not value:
            raise ConfigError(self.path(name), "must not be empty")
        return _resolve(value, base)

    def finish(self) -> None:
        for name in self.data:
            raise ConfigError(self.path(name), "unknown key")


def _resolve(value: str, base: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base / path)


def _parse_server(table: _Table, base: Path) -> ServerSettings:
    https = tuple(
        parse_address(a, f"server.https[{i}]")
        for i, a in enumerate(table.string_list("https", ["0.0.0.0:443"]))
    )
    http = tuple(
        parse_address(a, f"server.http[{i}]")
        for i, a in enumerate(table.string_list("http", ["0.0.0.0:80"]))
    )
    if not https:
        raise ConfigError("server.https", "at least one https listener is needed")
    trusted: list[IPNetwork] = []
    for i, item in enumerate(table.string_list("trusted_proxies", [])):
        try:
            trusted.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"server.trusted_proxies[{i}]", f"{item!r} is not an IP address or CIDR"
            ) from None
    default_site = table.string("default_site")
    if default_site is not None:
        default_site = parse_host_pattern(default_site, "server.default_site")
    allow_remote = table.boolean("admin_allow_remote", False)
    admin = None
    admin_text = table.string("admin")
    if admin_text is not None:
        admin = parse_admin_address(admin_text, base, allow_remote=allow_remote)
    settings = ServerSettings(
        https=https,
        http=http,
        data_dir=table.path_value("data_dir", base) or _resolve("./data", base),
        trusted_proxies=tuple(trusted),
        default_site=default_site,
        shutdown_grace=table.duration("shutdown_grace", 30.0),
        http2=table.boolean("http2", True),
        access_log=table.choice("access_log", "text", ("text", "json", "off")),  # type: ignore[arg-type]
        log_level=table.choice("log_level", "info", ("debug", "info", "warning", "error")),  # type: ignore[arg-type]
        admin=admin,
        admin_allow_remote=allow_remote,
    )
    table.finish()
    return settings


def _parse_limits(table: _Table) -> Limits:
    d = Limits()
    limits = Limits(
        handshake_timeout=table.duration("handshake_timeout", d.handshake_timeout),
        header_read_timeout=table.duration("header_read_timeout", d.header_read_timeout),
        idle_timeout=table.duration("idle_timeout", d.idle_timeout),
        upstream_connect_timeout=table.duration(
            "upstream_connect_timeout", d.upstream_connect_timeout
        ),
        upstream_read_timeout=table.duration("upstream_read_timeout", d.upstream_read_timeout),
        max_header_bytes=table.size("max_header_bytes", d.max_header_bytes),
        max_body_bytes=table.size("max_body_bytes", d.max_body_bytes),
        max_connections=table.integer("max_connections", d.max_connections, minimum=1),
        body_read_timeout=table.duration("body_read_timeout", d.body_read_timeout),
        tunnel_idle_timeout=table.duration("tunnel_idle_timeout", d.tunnel_idle_timeout),
    )
    table.finish()
    for name in (
        "handshake_timeout",
        "header_read_timeout",
        "idle_timeout",
        "body_read_timeout",
        "tunnel_idle_timeout",
    ):
        if getattr(limits, name) <= 0:
            raise ConfigError(f"limits.{name}", "must be more than zero")
    if limits.max_header_bytes < 1024:
        raise ConfigError("limits.max_header_bytes", "must be at least 1KiB")
    return limits


def _parse_tls(value: object, key: str, base: Path) -> TlsSource:
    if value == "internal" or value == "acme":
        return value  # type: ignore[return-value]
    if isinstance(value, dict):
        table = _Table(value, key)
        cert = table.path_value("cert", base)
        key_path = table.path_value("key", base)
        if cert is None:
            raise ConfigError(f"{key}.cert", "missing: the PEM certificate chain file")
        if key_path is None:
            raise ConfigError(f"{key}.key", "missing: the PEM private key file")
        table.finish()
        return TlsFiles(cert, key_path)
    raise ConfigError(
        key, f"expected 'internal', 'acme' or {{ cert = PATH, key = PATH }}, got {value!r}"
    )


def _parse_client_auth(value: object, key: str, base: Path) -> ClientAuth:
    if not isinstance(value, dict):
        raise ConfigError(
            key, f"expected {{ ca = 'internal' or PATH, required = true or false }}, got {value!r}"
        )
    table = _Table(value, key)
    ca_raw = table.take("ca")
    if ca_raw is None:
        raise ConfigError(table.path("ca"), "missing: 'internal' or the PEM file of the client CA")
    if not isinstance(ca_raw, str) or not ca_raw.strip():
        raise ConfigError(table.path("ca"), f"expected 'internal' or a file path, got {ca_raw!r}")
    ca: Path | Literal["internal"] = "internal" if ca_raw == "internal" else _resolve(ca_raw, base)
    required = table.boolean("required", True)
    table.finish()
    return ClientAuth(ca=ca, required=required)


def _parse_site(table: _Table, base: Path) -> Site:
    hosts_raw = table.take("hosts")
    if hosts_raw is None:
        raise ConfigError(table.path("hosts"), "missing: the names this site answers")
    if isinstance(hosts_raw, str):
        hosts_raw = [hosts_raw]
    if not isinstance(hosts_raw, list) or not hosts_raw:
        raise ConfigError(table.path("hosts"), "expected a non-empty list of host names")
    hosts = tuple(
        parse_host_pattern(h, f"{table.path('hosts')}[{i}]") for i, h in enumerate(hosts_raw)
    )
    upstream = table.string("upstream")
    if not upstream:
        raise ConfigError(table.path("upstream"), "missing: the name of an [upstream.NAME] table")
    challenge = table.take("challenge")
    if challenge is not None and challenge not in ("http-01", "dns-01"):
        raise ConfigError(
            table.path("challenge"), f"expected 'http-01' or 'dns-01', got {challenge!r}"
        )
    tls = _parse_tls(table.take("tls", "internal"), table.path("tls"), base)
    client_auth = table.take("client_auth")
    hsts = parse_hsts(table.take("hsts"), table.path("hsts"))
    site = Site(
        hosts=hosts,
        tls=tls,
        upstream=upstream,
        challenge=challenge,
        broken=_parse_broken(table.take("broken"), table.path("broken"), tls),
        client_auth=None
        if client_auth is None
        else _parse_client_auth(client_auth, table.path("client_auth"), base),
        hsts=hsts,
        hsts_header=None if hsts is None else b"strict-transport-security: %s\r\n" % hsts.encode(),
    )
    table.finish()
    return site


_HSTS_DIRECTIVE = re.compile(r'[ \t]*([A-Za-z-]+)[ \t]*(?:=[ \t]*("?)([0-9]+)\2)?[ \t]*')
_HSTS_NAMES = {"max-age": "max-age", "includesubdomains": "includeSubDomains", "preload": "preload"}


def parse_hsts(value: object, key: str) -> str | None:
    """A Strict-Transport-Security value (RFC 6797 6.1): max-age=SECONDS, required, and
    optionally includeSubDomains and preload, each once. Anything else is refused rather than
    sent, since browsers ignore what they do not know and a typo would go unnoticed."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected a string such as 'max-age=300', got {value!r}")
    directives: list[str] = []  # rebuilt, so the header sent is exactly what was checked
    for part in value.split(";"):
        if not part.strip():
            continue  # a trailing ";" is harmless
        match = _HSTS_DIRECTIVE.fullmatch(part)
        name = _HSTS_NAMES.get(match.group(1).lower()) if match else None
        if match is None or name is None:
            raise ConfigError(
                key,
                f"{part.strip(' ')!r} is not an HSTS directive "
                "(max-age=SECONDS, includeSubDomains, preload)",
            )
        if any(d.partition("=")[0] == name for d in directives):
            raise ConfigError(key, f"{name} appears twice")
        seconds = match.group(3)
        if name == "max-age":
            if seconds is None:
                raise ConfigError(key, "max-age needs a number of seconds: max-age=300")
            directives.append(f"max-age={int(seconds)}")
        elif seconds is not None:
            raise ConfigError(key, f"{name} takes no value")
        else:
            directives.append(name)
    if not any(d.startswith("max-age=") for d in directives):
        raise ConfigError(key, f"needs max-age=SECONDS (RFC 6797), got {value!r}")
    return "; ".join(directives)


def _parse_broken(value: object, key: str, tls: TlsSource) -> str | None:
    """`broken = "KIND"`: the site serves a certificate of that kind (certs.broken), for tests
    that prove a client refuses it."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in BROKEN_KINDS:
        kinds = ", ".join(repr(k) for k in BROKEN_KINDS)
        raise ConfigError(key, f"expected one of {kinds}, got {value!r}")
    if tls != "internal":
        # Made from the local CA so that one thing only is wrong for a client trusting it;
        # an ACME CA or the user's files cannot be told to make such certificates.
        what = "acme" if tls == "acme" else "files"
        raise ConfigError(key, f"needs tls = 'internal' (the default), not {what}")
    return value


# sun_path is 108 bytes on Linux, the terminating NUL included: a longer path cannot be bound or
# connected to (bind says "AF_UNIX path too long" only once the proxy runs).
MAX_SOCKET_PATH = 107


def check_socket_path(path: str, key: str, what: str = "unix socket path") -> None:
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(
            key, f"{what} {path} is {size} bytes, over the kernel's limit of {MAX_SOCKET_PATH}"
        )


def parse_upstream_server(value: object, key: str, base: Path) -> UpstreamServer:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected 'HOST:PORT' or 'unix:/path', got {value!r}")
    text = value.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ConfigError(key, "unix: needs a socket path")
        resolved = str(_resolve(path, base))
        check_socket_path(resolved, key)
        return UpstreamServer(path=resolved)
    for prefix in ("http://",):
        if text.startswith(prefix):
            text = text[len(prefix) :].rstrip("/")
    address = parse_address(text, key)
    return UpstreamServer(host=address.host, port=address.port)


def parse_admin_address(value: str, base: Path, *, allow_remote: bool) -> AdminAddress:
    """`[server] admin`: metrics and status with no authentication, so loopback or a unix
    socket (file permissions guard it) unless the user says otherwise."""
    address = parse_upstream_server(value, "server.admin", base)
    if address.path is not None or allow_remote or _is_loopback(address.host or ""):
        return address
    raise ConfigError(
        "server.admin",
        f"{address.label} is not a loopback address: /metrics and /status have no "
        "authentication; use 127.0.0.1, ::1 or unix:/path, or set "
        "server.admin_allow_remote = true (and firewall the port)",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def _parse_upstream(name: str, table: _Table, base: Path) -> UpstreamConfig:
    d = UpstreamConfig(name=name)
    servers = tuple(
        parse_upstream_server(s, f"{table.path('servers')}[{i}]", base)
        for i, s in enumerate(table.string_list("servers", []))
    )
    command = table.string("command")
    if command is not None and not command.strip():
        raise ConfigError(table.path("command"), "must not be empty")
    if servers and command:
        raise ConfigError(table.path("command"), "give either servers or command, not both")
    if not servers and not command:
        raise ConfigError(table.path("servers"), "missing: give servers = [...] or command = '...'")
    if command and "{socket}" not in command and "{port}" not in command:
        raise ConfigError(
            table.path("command"), "must contain {socket} or {port}, where the worker listens"
        )
    workers_raw = table.take("workers", 1)
    if workers_raw != "auto" and (
        isinstance(workers_raw, bool) or not isinstance(workers_raw, int) or workers_raw < 1
    ):
        raise ConfigError(
            table.path("workers"), f"expected a number >= 1 or 'auto', got {workers_raw!r}"
        )
    health = table.string("health")
    if health is not None and not health.startswith("/"):
        raise ConfigError(
            table.path("health"), f"expected a path starting with '/', got {health!r}"
        )
    max_memory = table.take("max_memory")
    max_requests = table.take("max_requests")
    env_raw = table.take("env", {})
    if not isinstance(env_raw, dict) or not all(isinstance(v, str) for v in env_raw.values()):
        raise ConfigError(table.path("env"), "expected a table of strings")
    upstream = UpstreamConfig(
        name=name,
        servers=servers,
        balance=table.choice("balance", d.balance, ("least_conn", "round_robin")),  # type: ignore[arg-type]
        keepalive_timeout=table.duration("keepalive_timeout", d.keepalive_timeout),
        max_idle_connections=table.integer("max_idle_connections", d.max_idle_connections),
        retry_idempotent=table.boolean("retry_idempotent", d.retry_idempotent),
        command=command,
        workers=workers_raw,
        prestart=tuple(table.string_list("prestart", [])),
        health=health,
        health_interval=table.duration("health_interval", d.health_interval),
        health_timeout=table.duration("health_timeout", d.health_timeout),
        healthy_threshold=table.integer("healthy_threshold", d.healthy_threshold, minimum=1),
        unhealthy_threshold=table.integer("unhealthy_threshold", d.unhealthy_threshold, minimum=1),
        fail_timeout=table.duration("fail_timeout", d.fail_timeout),
        max_memory=None if max_memory is None else parse_size(max_memory, table.path("max_memory")),
        max_requests=None
        if max_requests is None
        else _Table({"v": max_requests}, table.key).integer("v", 0, minimum=1),
        max_requests_jitter=table.integer("max_requests_jitter", d.max_requests_jitter),
        stop_timeout=table.duration("stop_timeout", d.stop_timeout),
        env=tuple(sorted(env_raw.items())),
    )
    table.finish()
    return upstream


def _parse_local_ca(table: _Table, base: Path) -> LocalCaSettings:
    lifetime = table.duration("leaf_lifetime", DEFAULT_LEAF_LIFETIME)
    if not MIN_LEAF_LIFETIME <= lifetime <= MAX_LEAF_LIFETIME:
        raise ConfigError(
            table.path("leaf_lifetime"), f"must be between 10s and 365d, got {lifetime:g}s"
        )
    root_cert = table.path_value("root_cert", base)
    root_key = table.path_value("root_key", base)
    if (root_cert is None) != (root_key is None):
        missing = "root_key" if root_key is None else "root_cert"
        raise ConfigError(
            table.path(missing), "missing: a root of your own needs both root_cert and root_key"
        )
    table.finish()
    return LocalCaSettings(leaf_lifetime=lifetime, root_cert=root_cert, root_key=root_key)


def _parse_acme(table: _Table, base: Path) -> AcmeConfig:
    d = AcmeConfig()
    dns_table = table.take("dns")
    dns = None
    if dns_table is not None:
        t = _Table(dns_table, "acme.dns")
        server = t.string("server")
        if server is None:
            raise ConfigError("acme.dns.server", "missing: the DNS server taking RFC 2136 updates")
        tsig = t.path_value("tsig_key", base)
        if tsig is None:
            raise ConfigError("acme.dns.tsig_key", "missing: a BIND key file for TSIG")
        dns = AcmeDns(
            server=parse_address(server, "acme.dns.server"),
            tsig_key=tsig,
            zone=t.string("zone"),
            propagation_timeout=t.duration("propagation_timeout", 60.0),
        )
        t.finish()
    directory = table.string("directory", d.directory)
    if not directory or not directory.startswith(("https://", "http://")):
        raise ConfigError("acme.directory", f"expected an https:// URL, got {directory!r}")
    eab_kid, eab_hmac = table.string("eab_kid"), table.string("eab_hmac_key")
    if (eab_kid is None) != (eab_hmac is None):
        raise ConfigError(
            "acme.eab_hmac_key" if eab_hmac is None else "acme.eab_kid",
            "EAB needs both eab_kid and eab_hmac_key",
        )
    acme = AcmeConfig(
        directory=directory,
        email=table.string("email"),
        challenge=table.choice("challenge", d.challenge, ("http-01", "dns-01")),  # type: ignore[arg-type]
        ca_bundle=table.path_value("ca_bundle", base),
        eab_kid=eab_kid,
        eab_hmac_key=eab_hmac,
        profile=table.string("profile"),
        dns=dns,
    )
    table.finish()
    return acme


STORAGE_URL_ENV = "TLSPROXY_STORAGE_URL"
_STORAGE_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")
_STORAGE_SCHEMES = ("redis", "rediss", "unix")


def _parse_storage(table: _Table, base: Path, environ: Mapping[str, str]) -> StorageSettings:
    """[storage]. The URL may come from the environment instead (TLSPROXY_STORAGE_URL, which
    wins), so that a Redis password need not be written into the config file."""
    backend = table.choice("backend", "file", ("file", "redis"))
    explicit = {name for name in ("url", "prefix", "encryption_key_file") if table.has(name)}
    url = table.string("url")
    prefix = table.string("prefix", "tlsproxy")
    assert prefix is not None
    key_file = table.path_value("encryption_key_file", base)
    table.finish()
    if backend == "file":
        for name in sorted(explicit):
            # The file backend's private keys are read as files by the TLS library and the
            # crypto child process: encrypted ones would not load.
            raise ConfigError(table.path(name), 'only with backend = "redis"')
        return StorageSettings()
    if not _STORAGE_PREFIX.fullmatch(prefix):
        raise ConfigError(
            table.path("prefix"), f"expected 1 to 64 of A-Z a-z 0-9 . _ -, got {prefix!r}"
        )
    where = table.path("url")
    if environ.get(STORAGE_URL_ENV):
        url, where = environ[STORAGE_URL_ENV], STORAGE_URL_ENV
    if not url:
        raise ConfigError(
            where, f'missing: backend = "redis" needs a redis:// URL (or {STORAGE_URL_ENV})'
        )
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in _STORAGE_SCHEMES:
        # Never echo the URL: it may carry the password.
        raise ConfigError(where, "expected a redis://, rediss:// or unix:// URL")
    return StorageSettings(backend="redis", url=url, prefix=prefix, encryption_key_file=key_file)


def parse_config(data: Mapping[str, Any], base: Path, source: Path | None = None) -> Config:
    """Turn a decoded TOML document into a Config; relative paths resolve against `base`."""
    root = _Table(dict(data), "")
    server = _parse_server(_Table(root.take("server", {}), "server"), base)
    limits = _parse_limits(_Table(root.take("limits", {}), "limits"))

    upstreams_raw = root.take("upstream", {})
    if not isinstance(upstreams_raw, dict):
        raise ConfigError("upstream", "expected tables [upstream.NAME]")
    upstreams = {
        name: _parse_upstream(name, _Table(value, f"upstream.{name}"), base)
        for name, value in upstreams_raw.items()
    }

    sites_raw = root.take("site", [])
    if not isinstance(sites_raw, list) or not sites_raw:
        raise ConfigError("site", "at least one [[site]] is needed")
    sites = tuple(_parse_site(_Table(s, f"site[{i}]"), base) for i, s in enumerate(sites_raw))

    acme_raw = root.take("acme")
    acme = _parse_acme(_Table(acme_raw, "acme"), base) if acme_raw is not None else None
    local_ca = _parse_local_ca(_Table(root.take("local_ca", {}), "local_ca"), base)
    storage = _parse_storage(_Table(root.take("storage", {}), "storage"), base, os.environ)
    root.finish()

    seen: dict[str, int] = {}
    for i, site in enumerate(sites):
        if site.upstream not in upstreams:
            raise ConfigError(f"site[{i}].upstream", f"no [upstream.{site.upstream}] is defined")
        for host in site.hosts:
            if host in seen:
                raise ConfigError(
                    f"site[{i}].hosts", f"{host!r} is already a host of site[{seen[host]}]"
                )
            seen[host] = i
        if site.tls == "acme" and acme is None:
            raise ConfigError(f"site[{i}].tls", "tls = 'acme' needs an [acme] table")
        if site.tls == "acme" and acme is not None:
            wildcard = any(h.startswith("*.") for h in site.hosts)
            wants_dns = wildcard or (site.challenge or acme.challenge) == "dns-01"
            if wants_dns and acme.dns is None:
                reason = "a wildcard name needs dns-01" if wildcard else "dns-01"
                raise ConfigError(
                    f"site[{i}].hosts" if wildcard else f"site[{i}].tls",
                    f"{reason}: add [acme.dns]",
                )
    if server.default_site is not None and server.default_site not in seen:
        raise ConfigError(
            "server.default_site", f"{server.default_site!r} is not a host of any [[site]]"
        )
    return Config(
        server=server,
        limits=limits,
        sites=sites,
        upstreams=upstreams,
        acme=acme,
        local_ca=local_ca,
        storage=storage,
        source=source,
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a TOML file; relative paths in it resolve against its directory."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(str(file), f"cannot read config file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(str(file), "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(file), f"TOML syntax error: {exc}") from None
    return parse_config(data, file.resolve().parent, source=file.resolve())
