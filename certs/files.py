"""Certificates the user brings as PEM files (`tls = {cert = ..., key = ...}`).

Every problem becomes a CertificateFileError naming the file and the reason, so that
`tlsproxy check` and `run` can print one line and exit 2.

`load_key_pair` is the full check (it parses the key with `cryptography`, imported only when it
runs: `tlsproxy run` does it in a child process, certs.crypto_worker). The other functions here
need no `cryptography`, so the serving process uses them too and says the same words.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CertificateFileError
from .models import CertInfo
from .selection import uncovered_hosts
from .x509_lite import leaf_info

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"
# PKCS#8 "ENCRYPTED PRIVATE KEY" blocks and traditional OpenSSL "Proc-Type: 4,ENCRYPTED" ones.
_ENCRYPTED_MARKERS = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")
ENCRYPTED_KEY_REASON = "private key is encrypted (a key without a passphrase is needed)"


@dataclass(frozen=True)
class KeyPair:
    chain: list[x509.Certificate]  # leaf first
    key: PrivateKeyTypes
    info: CertInfo  # of the leaf

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
    from .keys import load_certificates

    try:
        return load_certificates(data)
    except ValueError as e:
        raise _chain_error(path, e) from None


def _chain_error(path: Path, error: ValueError) -> CertificateFileError:
    if "no PEM certificate" in str(error):
        return CertificateFileError(path, "no PEM certificate found")
    return CertificateFileError(path, f"not a valid PEM certificate ({error})")


def refuse_passphrase() -> bytes:
    """The password callback for ssl's load_cert_chain: without one, OpenSSL would ask for an
    encrypted key's passphrase on the terminal and wait."""
    raise ssl.SSLError(1, ENCRYPTED_KEY_REASON)


def is_encrypted_key(data: bytes) -> bool:
    return any(marker in data for marker in _ENCRYPTED_MARKERS)


def parse_key(path: Path, data: bytes) -> PrivateKeyTypes:
    from cryptography.exceptions import UnsupportedAlgorithm

    from .keys import load_private_key

    if b"PRIVATE KEY-----" not in data:
        raise CertificateFileError(path, "no PEM private key found")
    try:
        return load_private_key(data)
    except TypeError:
        raise CertificateFileError(path, ENCRYPTED_KEY_REASON) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateFileError(path, f"not a valid PEM private key ({e})") from None


def read_info(path: Path, data: bytes) -> CertInfo:
    """The leaf's facts, read without `cryptography` (certs.x509_lite)."""
    try:
        return leaf_info(data)
    except ValueError as e:
        raise _chain_error(path, e) from None


def check_validity(path: Path, info: CertInfo, now: datetime) -> None:
    if now >= info.not_after:
        when = info.not_after.strftime(_TIME_FORMAT)
        raise CertificateFileError(path, f"certificate expired on {when}")
    if now < info.not_before:
        when = info.not_before.strftime(_TIME_FORMAT)
        raise CertificateFileError(path, f"certificate is not valid before {when}")


def check_hosts(path: Path, info: CertInfo, hosts: Sequence[str]) -> None:
    names = info.hosts
    missing = uncovered_hosts(hosts, names)
    if missing:
        named = ", ".join(names) if names else "no DNS names"
        raise CertificateFileError(
            path, f"certificate does not cover {', '.join(missing)} (it names: {named})"
        )


def load_key_pair(cert_file: Path, key_file: Path, hosts: Sequence[str], now: datetime) -> KeyPair:
    """Read and check a user's chain and key; the first problem found is raised."""
    from .keys import key_matches_certificate

    chain_pem = read_file(cert_file)
    chain = parse_chain(cert_file, chain_pem)
    key = parse_key(key_file, read_file(key_file))
    leaf = chain[0]
    if not key_matches_certificate(key, leaf):
        raise CertificateFileError(
            key_file, f"private key does not match the certificate in {cert_file}"
        )
    info = read_info(cert_file, chain_pem)
    check_validity(cert_file, info, now)
    check_hosts(cert_file, info, hosts)
    return KeyPair(chain, key, info)
