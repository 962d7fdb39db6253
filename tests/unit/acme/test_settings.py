"""validate_settings, what `tlsproxy check` runs over [acme]: each unusable file named."""

from __future__ import annotations

from pathlib import Path

import pytest

from certs.errors import CertificateFileError
from certs.issuers.acme import AcmeSettings, DnsUpdateSettings, validate_settings

from .test_dns01 import TSIG_KEYGEN


def settings(ca_bundle: Path | None = None, tsig: Path | None = None) -> AcmeSettings:
    dns = None
    if tsig is not None:
        dns = DnsUpdateSettings("127.0.0.1", 53, tsig, None, 60.0)
    return AcmeSettings(
        directory="https://acme.test/dir",
        email=None,
        default_challenge="http-01",
        ca_bundle=ca_bundle,
        eab_kid=None,
        eab_hmac_key=None,
        profile=None,
        dns=dns,
    )


def _ca_pem() -> bytes:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_nothing_to_check() -> None:
    validate_settings(settings())


def test_good_files(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(_ca_pem())
    (tmp_path / "tsig.key").write_text(TSIG_KEYGEN)
    validate_settings(settings(tmp_path / "ca.pem", tmp_path / "tsig.key"))


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "cannot read CA bundle"), (b"hello", "not a PEM CA bundle")],
)
def test_bad_ca_bundle_is_named(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CertificateFileError) as info:
        validate_settings(settings(ca_bundle=path))
    assert info.value.path == path and reason in info.value.reason


def test_bad_tsig_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tsig.key"
    path.write_text("key {")
    with pytest.raises(CertificateFileError) as info:
        validate_settings(settings(tsig=path))
    assert info.value.path == path and "TSIG" in info.value.reason
