"""`tlsproxy reverse-proxy --from HOST[:PORT] --to ADDR`: a whole proxy from two flags.

The flags become the same TOML-shaped document a config file would hold, and `parse_config`
turns it into the Config that `run` gets: one code path from there on, so the command cannot
drift from what a config file does. Flags name themselves in errors ("--to: ...").

Which CA signs HOST's certificate is decided from the name alone, as Caddy does: names that no
public CA will ever certify (RFC 6761 special-use names, .internal, single labels, IP
literals) get the local CA; every other name goes to ACME (Let's Encrypt unless told).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from proxy.config import Config, parse_config, parse_host_pattern, parse_upstream_server
from proxy.errors import ConfigError

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"

# RFC 6761 (localhost, test, example, invalid), RFC 6762 (local), RFC 8375 (home.arpa) and
# ICANN's .internal (2024): no public CA issues for them, so ACME could only fail.
LOCAL_SUFFIXES = ("localhost", "test", "internal", "local", "home.arpa", "example", "invalid")

DEFAULT_HTTPS_PORT = 443
DEFAULT_HTTP_PORT = 80


def issuer_for(host: str) -> Literal["internal", "acme"]:
    """ "internal" (the local CA) for a name only this machine or network can mean, else
    "acme". `host` is normalised (lowercase, no trailing dot)."""
    try:
        ipaddress.ip_address(host)
        return "internal"
    except ValueError:
        pass
    if "." not in host:  # a single label ("localhost", "myapp"): never publicly certified
        return "internal"
    if any(host == s or host.endswith("." + s) for s in LOCAL_SUFFIXES):
        return "internal"
    return "acme"


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$XDG_DATA_HOME/tlsproxy, else ~/.local/share/tlsproxy (the XDG base directory spec:
    a relative XDG_DATA_HOME is invalid and ignored)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_DATA_HOME", "")
    if not base or not os.path.isabs(base):
        base = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "share")
    return Path(base) / "tlsproxy"


@dataclass(frozen=True)
class Origin:
    host: str  # normalised; an IPv6 literal without brackets
    port: int | None  # None: the standard ports (443, and 80 for redirects and http-01)


def parse_from(text: str) -> Origin:
    """ "app.example.com", "app.test:8443", "https://app.test:8443", "[::1]:8443"."""
    value = text.strip()
    scheme, sep, rest = value.partition("://")
    if sep:
        if scheme.lower() != "https":
            raise ConfigError(
                "--from", f"tlsproxy serves https only; got the scheme {scheme!r} in {text!r}"
            )
        value = rest
    if "/" in value:
        raise ConfigError("--from", f"expected HOST or HOST:PORT, without a path, got {text!r}")
    port_text: str | None = None
    if value.startswith("["):
        host, sep, after = value[1:].partition("]")
        if not sep or (after and not after.startswith(":")):
            raise ConfigError("--from", f"expected [IPv6] or [IPv6]:PORT, got {text!r}")
        port_text = after[1:] if after else None
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:  # a name, or a bare IPv6 literal
        host = value
    if not host:
        raise ConfigError("--from", f"expected a host name, got {text!r}")
    name = parse_host_pattern(host, "--from")
    if name.startswith("*."):
        raise ConfigError(
            "--from",
            f"{host!r}: a wildcard certificate needs the dns-01 challenge; use a config file",
        )
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError("--from", f"port must be a number from 1 to 65535, got {text!r}")
        port = int(port_text)
    return Origin(name, port)


def upstream_address(text: str) -> str:
    """--to as a config `servers` entry: "HOST:PORT", ":PORT" (this machine), "unix:PATH"."""
    value = text.strip()
    if value.startswith(":"):
        value = "127.0.0.1" + value
    elif value.isdigit():
        value = "127.0.0.1:" + value
    try:
        parse_upstream_server(value, "--to", Path.cwd())
    except ConfigError:
        raise ConfigError("--to", f"expected HOST:PORT, :PORT or unix:PATH, got {text!r}") from None
    return value


def ipv6_available() -> bool:
    """Whether this machine can listen on IPv6 (containers often cannot)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _bind_hosts(host: str, ipv6: bool) -> list[str]:
    # Loopback names can only be reached from this machine: serving them on every interface
    # would show a development app to the network for nothing. An IP literal names the one
    # address to listen on. Any other name listens everywhere, as Caddy does.
    if host == "localhost" or host.endswith(".localhost"):
        return ["127.0.0.1", "[::1]"] if ipv6 else ["127.0.0.1"]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ["0.0.0.0", "[::]"] if ipv6 else ["0.0.0.0"]
    return [f"[{ip}]" if ip.version == 6 else str(ip)]


def build_document(
    origin: Origin,
    to: str,
    *,
    data_dir: Path,
    http_port: int | Literal["default"] | None = "default",
    email: str | None = None,
    staging: bool = False,
    directory: str | None = None,
    ca_bundle: str | None = None,
    internal_certs: bool = False,
    access_log: str = "text",
    log_level: str = "info",
    ipv6: bool = False,
) -> dict[str, Any]:
    """The TOML document a user would have written for these flags."""
    tls = "internal" if internal_certs else issuer_for(origin.host)
    binds = _bind_hosts(origin.host, ipv6)
    https_port = origin.port if origin.port is not None else DEFAULT_HTTPS_PORT
    if http_port == "default":
        # Like Caddy: the standard ports get the redirect (and http-01) port too; an explicit
        # port means "this port and nothing else".
        http_port = DEFAULT_HTTP_PORT if origin.port is None else None
    if tls == "acme" and http_port is None:
        raise ConfigError(
            "--from",
            f"{origin.host} gets its certificate over ACME, whose http-01 challenge comes to "
            "port 80, which an explicit port does not bind: add --http-port 80 (or the port "
            "that port 80 is forwarded to)",
        )
    if tls == "internal":
        acme_flags = (
            ("--email", email),
            ("--staging", staging),
            ("--directory", directory),
            ("--ca-bundle", ca_bundle),
        )
        for flag, value in acme_flags:
            if value:
                raise ConfigError(
                    flag, f"{origin.host} gets its certificate from the local CA, not over ACME"
                )
    if staging and directory:
        raise ConfigError("--staging", "give --staging or --directory, not both")
    document: dict[str, Any] = {
        "server": {
            "https": [f"{b}:{https_port}" for b in binds],
            "http": [] if http_port is None else [f"{b}:{http_port}" for b in binds],
            "data_dir": str(data_dir),
            "default_site": origin.host,  # clients without SNI (an IP literal) get it too
            "access_log": access_log,
            "log_level": log_level,
        },
        "site": [{"hosts": [origin.host], "tls": tls, "upstream": "app"}],
        "upstream": {"app": {"servers": [to]}},
    }
    if tls == "acme":
        acme: dict[str, Any] = {
            "directory": directory or (LETS_ENCRYPT_STAGING if staging else LETS_ENCRYPT)
        }
        if email:
            acme["email"] = email
        if ca_bundle:
            acme["ca_bundle"] = ca_bundle
        document["acme"] = acme
    return document


# Config keys the flags fill, for errors raised once the document is a Config (check_config).
FLAG_OF_KEY = {
    "server.data_dir": "--data-dir",
    "acme.directory": "--directory",
    "acme.ca_bundle": "--ca-bundle",
    "acme.email": "--email",
    "acme": "--directory",
    "server.https[0]": "--from",
    "server.http[0]": "--http-port",
    "site[0].hosts[0]": "--from",
    "upstream.app.servers[0]": "--to",
}


def as_flag_error(exc: ConfigError) -> ConfigError:
    """The same error, naming the flag the user typed instead of a config key they never saw."""
    flag = FLAG_OF_KEY.get(exc.key)
    return exc if flag is None else ConfigError(flag, exc.message)


def build_config(document: Mapping[str, Any]) -> Config:
    try:
        return parse_config(document, Path.cwd(), source=None)
    except ConfigError as exc:
        raise as_flag_error(exc) from None
