"""Certificates the user brings as PEM files (`tls = {cert = ..., key = ...}`).

Every problem becomes a CertificateFileError naming the file and the reason, so that
`tlsproxy check` and `run` can print one line and exit 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .errors import CertificateFileError
from .keys import dns_names, key_matches_certificate, load_certificates, load_private_key
from .selection import uncovered_hosts

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"


@dataclass(frozen=True)
class KeyPair:
    chain: list[x509.Certificate]  # leaf first
    key: PrivateKeyTypes

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def read_file(path: Path) -> bytes:
    """The bytes of a file, or a CertificateFileError that says plainly why not."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateFileError(path, "file not found") from None
    except IsADirectoryError:
        raise CertificateFileError(path, "is a directory, not a file") from None
    except PermissionError:
        raise CertificateFileError(path, "permission denied (not readable)") from None
    except OSError as e:
        raise CertificateFileError(path, f"cannot read: {e.strerror or e}") from None


def parse_chain(path: Path, data: bytes) -> list[x509.Certificate]:
    try:
        return load_certificates(data)
    except ValueError as e:
        if "no PEM certificate" in str(e):
            raise CertificateFileError(path, "no PEM certificate found") from None
        raise CertificateFileError(path, f"not a valid PEM certificate ({e})") from None


def parse_key(path: Path, data: bytes) -> PrivateKeyTypes:
    if b"PRIVATE KEY-----" not in data:
        raise CertificateFileError(path, "no PEM private key found")
    try:
        return load_private_key(data)
    except TypeError:
        raise CertificateFileError(
            path, "private key is encrypted (a key without a passphrase is needed)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateFileError(path, f"not a valid PEM private key ({e})") from None


def check_validity(path: Path, leaf: x509.Certificate, now: datetime) -> None:
    if now >= leaf.not_valid_after_utc:
        when = leaf.not_valid_after_utc.strftime(_TIME_FORMAT)
        raise CertificateFileError(path, f"certificate expired on {when}")
    if now < leaf.not_valid_before_utc:
        when = leaf.not_valid_before_utc.strftime(_TIME_FORMAT)
        raise CertificateFileError(path, f"certificate is not valid before {when}")


def check_hosts(path: Path, leaf: x509.Certificate, hosts: Sequence[str]) -> None:
    names = dns_names(leaf)
    missing = uncovered_hosts(hosts, names)
    if missing:
        named = ", ".join(names) if names else "no DNS names"
        raise CertificateFileError(
            path, f"certificate does not cover {', '.join(missing)} (it names: {named})"
        )


def load_key_pair(cert_file: Path, key_file: Path, hosts: Sequence[str], now: datetime) -> KeyPair:
    """Read and check a user's chain and key; the first problem found is raised."""
    chain = parse_chain(cert_file, read_file(cert_file))
    key = parse_key(key_file, read_file(key_file))
    leaf = chain[0]
    if not key_matches_certificate(key, leaf):
        raise CertificateFileError(
            key_file, f"private key does not match the certificate in {cert_file}"
        )
    check_validity(cert_file, leaf, now)
    check_hosts(cert_file, leaf, hosts)
    return KeyPair(chain, key)
