"""Keys, CSRs and PEM helpers over `cryptography`. No file I/O: bytes in, bytes out."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import NameOID

from .models import CertInfo
from .selection import normalize_host

_PEM_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """EC P-256: fast to make at start-up (well under a millisecond) and accepted everywhere."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_to_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def chain_to_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(certificate_to_pem(c) for c in certs)


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in file order. ValueError when there is none or one
    does not parse."""
    if _PEM_CERT_MARKER not in pem:
        raise ValueError("no PEM certificate found")
    return x509.load_pem_x509_certificates(pem)


def load_private_key(pem: bytes) -> PrivateKeyTypes:
    """ValueError when the PEM holds no key or does not parse; TypeError when it is encrypted
    (we have no way to ask for a password)."""
    return serialization.load_pem_private_key(pem, password=None)


def public_key_der(key_or_cert: PrivateKeyTypes | x509.Certificate) -> bytes:
    public = key_or_cert.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_matches_certificate(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    return public_key_der(key) == public_key_der(cert)


def make_csr(key: CertificateIssuerPrivateKeyTypes, hosts: Sequence[str]) -> bytes:
    """A PEM CSR naming every host in the SAN; the CN is left out (CAs ignore or reject it, and
    a wildcard or a long name does not fit in it)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(subject_alt_name(hosts), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def subject_alt_name(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """dNSName entries, and iPAddress ones for IP literals: clients match an address they
    connected to only against an iPAddress entry (RFC 6125 / RFC 9525)."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The SAN's names, IP addresses included (as text), in the form hosts are compared in."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    names = [normalize_host(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(names)


def common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else None
    return value if isinstance(value, str) else None


def cert_info(cert: x509.Certificate) -> CertInfo:
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        hosts=dns_names(cert),
    )
