"""Issuers turn a CSR into a certificate chain.

An issuer is synchronous and may block (the `acme` client does): the manager always calls it from
a worker thread, under the storage lock for that certificate name.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

from ..models import CertSpec


@runtime_checkable
class Issuer(Protocol):
    # Shown in logs and `tlsproxy certs`, e.g. "local CA" or the ACME directory URL.
    name: str

    def issue(self, spec: CertSpec, csr_pem: bytes) -> bytes:
        """A PEM chain, leaf first, for the key and names in `csr_pem` (all of spec.hosts).
        Raises certs.errors.IssuanceError (or any exception: the manager logs it and retries
        later with a growing delay)."""
        ...


@runtime_checkable
class RenewalInfoIssuer(Issuer, Protocol):
    """An issuer that can tell when to renew (ACME ARI, RFC 9773)."""

    def renewal_window(self, spec: CertSpec, chain_pem: bytes) -> tuple[datetime, datetime] | None:
        """The CA's suggested window for renewing this chain's leaf, or None when unknown.
        May block (network): called from a worker thread."""
        ...


__all__ = ["Issuer", "RenewalInfoIssuer"]
