"""Plain data passed between certs/ and its callers. No I/O here."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

Source = Literal["internal", "acme", "files"]


@dataclass(frozen=True)
class ClientAuthSpec:
    """A site that asks for client certificates: the CA they must chain to ("internal": the
    local CA's root) and whether a client without one is refused."""

    ca: Path | Literal["internal"]
    required: bool = True


@dataclass(frozen=True)
class CertSpec:
    """What a site asks for; proxy/ builds these from its config."""

    name: str  # stable id, the site's first host, e.g. "localhost"
    hosts: tuple[str, ...]  # lowercased, no trailing dot; may contain "*.example.test"
    source: Source
    cert_file: Path | None = None  # for "files": PEM chain (leaf first)
    key_file: Path | None = None
    challenge: str | None = None  # for "acme"
    broken: str | None = None  # for tests: a certs.broken kind, served instead of a good one
    # The certificate's context also verifies client certificates against this CA.
    client_auth: ClientAuthSpec | None = None


@dataclass(frozen=True)
class CertInfo:
    """Parsed facts of a leaf, for logs and `tlsproxy certs`."""

    subject: str
    issuer: str
    serial: int
    not_before: datetime  # aware, UTC
    not_after: datetime  # aware, UTC
    hosts: tuple[str, ...]  # SAN dNSNames, lowercased


@dataclass(frozen=True)
class Installed:
    """One certificate ready for handshakes."""

    spec_name: str
    context: ssl.SSLContext
    info: CertInfo
    cert_file: Path
    key_file: Path
    # The spec's: the context verifies client certificates against its CA, and the TLS layer
    # asks for a certificate only when it is set.
    client_auth: ClientAuthSpec | None = None


@dataclass(frozen=True)
class CertStatus:
    """One line of `tlsproxy certs`."""

    name: str
    hosts: tuple[str, ...]
    source: str
    issuer: str | None
    not_after: datetime | None
    next_renewal: datetime | None
    renewal_reason: str
    last_error: str | None
