"""certs.x509_lite reads what `cryptography` reads, field by field, on the certificates we meet:
local-CA leaves and intermediates, and certificates made by the openssl CLI (RSA and EC, many
RDNs with characters RFC 4514 escapes, no SAN, dates after 2049 in GeneralizedTime)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from certs.issuers.local_ca import LocalCA
from certs.keys import cert_info, generate_private_key, make_csr
from certs.models import CertSpec
from certs.storage import Storage
from certs.x509_lite import cert_info_der, leaf_info, pem_blocks

from .factory import make_ca, make_leaf

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")


def assert_same_as_cryptography(pem: bytes) -> None:
    expected = cert_info(x509.load_pem_x509_certificate(pem))
    got = leaf_info(pem)
    for field in ("subject", "issuer", "serial", "not_before", "not_after", "hosts"):
        assert getattr(got, field) == getattr(expected, field), field
    assert got == expected


def openssl_cert(tmp_path: Path, *args: str, key: str = "rsa:2048") -> bytes:
    out = tmp_path / "cert.pem"
    cmd = ["openssl", "req", "-x509", "-newkey", key, "-nodes", "-keyout", str(tmp_path / "k")]
    subprocess.run([*cmd, "-out", str(out), *args], check=True, capture_output=True)
    return out.read_bytes()


def test_local_ca_leaf_and_intermediate(tmp_path):
    ca = LocalCA.load_or_create(Storage(tmp_path))
    spec = CertSpec("long", ("x" * 70 + ".test", "A.test", "*.b.test"), "internal")
    chain = ca.issue(spec, make_csr(generate_private_key(), spec.hosts))
    assert_same_as_cryptography(chain)
    _, intermediate = pem_blocks(chain)
    assert intermediate == ca.intermediate.public_bytes(Encoding.DER)
    assert_same_as_cryptography(ca.root_pem)
    long_named = leaf_info(chain)
    assert long_named.subject == ""  # a first host over 64 characters leaves the subject empty
    inter = cert_info_der(intermediate)
    assert inter.subject.startswith("CN=tlsproxy local intermediate ")
    assert inter.hosts == ()


def test_local_ca_leaf_for_ip_addresses_names_them_in_ip_entries(tmp_path):
    ca = LocalCA.load_or_create(Storage(tmp_path))
    spec = CertSpec("127.0.0.1", ("127.0.0.1", "::1", "app.test"), "internal")
    chain = ca.issue(spec, make_csr(generate_private_key(), spec.hosts))
    assert_same_as_cryptography(chain)
    assert leaf_info(chain).hosts == ("app.test", "127.0.0.1", "::1")  # names, then IPs
    san = x509.load_pem_x509_certificate(chain).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


def test_factory_leaf_without_san_and_chain_order(tmp_path):
    ca = make_ca("files CA")
    leaf, _ = make_leaf(ca, [])
    pem = leaf.public_bytes(Encoding.PEM)
    root_pem = ca[0].public_bytes(Encoding.PEM)
    assert_same_as_cryptography(pem + root_pem)
    assert leaf_info(pem).hosts == ()
    assert len(pem_blocks(b"junk before\n" + pem + b"between\n" + root_pem)) == 2


@needs_openssl
@pytest.mark.parametrize("key", ["rsa:2048", "ec", "ed25519"])
def test_openssl_many_rdns_escapes_and_generalized_time(tmp_path, key):
    subject = (
        '/C=DE/ST=Some\\, State/L= leading space/O=Org "Q" <x>;y/OU=a\\+b/OU=#hash'
        "/CN=Mixed.Case.test /emailAddress=ops@example.test/serialNumber=42/DC=example"
        "/UID=user\\\\1"
    )
    args = ["-subj", subject, "-days", "10000", "-utf8"]
    args += ["-addext", "subjectAltName=DNS:A.Example.TEST,DNS:*.Wild.test.,IP:127.0.0.1"]
    if key == "ec":
        args = ["-pkeyopt", "ec_paramgen_curve:P-384", *args]
    pem = openssl_cert(tmp_path, *args, key=key)
    assert_same_as_cryptography(pem)
    info = leaf_info(pem)
    assert info.not_after.year > 2049  # GeneralizedTime from 2050 on
    assert info.hosts == ("a.example.test", "*.wild.test", "127.0.0.1")  # IPs come last
    assert "1.2.840.113549.1.9.1=ops@example.test" in info.subject
    assert "\\#hash" in info.subject and "CN=Mixed.Case.test\\ " in info.subject


@needs_openssl
def test_openssl_multivalued_rdn_non_ascii_and_no_san(tmp_path):
    subject = "/O=Ünïcödé Org/CN=one+OU=two/L=Zürich"
    pem = openssl_cert(tmp_path, "-subj", subject, "-multivalue-rdn", "-utf8", "-days", "3")
    assert_same_as_cryptography(pem)
    assert leaf_info(pem).hosts == ()


@needs_openssl
def test_openssl_utctime_and_negative_looking_serial(tmp_path):
    # A serial whose first byte has the top bit set gets a leading 0x00 in DER; both readers
    # must see the same positive number.
    pem = openssl_cert(tmp_path, "-subj", "/CN=s", "-set_serial", "0x80aabbcc", "-days", "1")
    assert_same_as_cryptography(pem)
    info = leaf_info(pem)
    assert info.serial == 0x80AABBCC
    assert info.not_after - info.not_before == timedelta(days=1)
    assert info.not_after.tzinfo is UTC


def test_utctime_century_rule():
    # 1950..2049 in UTCTime: a certificate made with dates on both sides of the pivot.
    ca = make_ca("old CA")
    leaf, _ = make_leaf(
        ca,
        ["old.test"],
        not_before=datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
        not_after=datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),
    )
    pem = leaf.public_bytes(Encoding.PEM)
    assert_same_as_cryptography(pem)
    assert leaf_info(pem).not_before.year == 1999


@pytest.mark.parametrize(
    "kind",
    ["T61String", "OctetString", "IA5String", "BMPString", "UniversalString", "PrintableString"],
)
def test_attribute_value_types_read_as_cryptography_reads_them(kind):
    from cryptography.x509.name import _ASN1Type

    ca_cert, ca_key = make_ca()
    value = "Ab c" if kind == "PrintableString" else "é, ü+ä"
    attributes = [
        x509.NameAttribute(x509.ObjectIdentifier("1.2.3.4"), value, getattr(_ASN1Type, kind)),
        x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, b"\x01\x02\xff", _ASN1Type.BitString),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(ca_key.public_key())
        .serial_number(7)
        .not_valid_before(datetime(2026, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2026, 2, 1, tzinfo=UTC))
        .sign(ca_key, hashes.SHA256())
    )
    assert_same_as_cryptography(cert.public_bytes(Encoding.PEM))


# -- malformed input ----------------------------------------------------------------------


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"


@pytest.fixture
def good_der():
    leaf, _ = make_leaf(make_ca(), ["good.test"])
    return leaf.public_bytes(Encoding.DER)


def test_no_pem_block():
    with pytest.raises(ValueError, match="no PEM certificate found"):
        pem_blocks(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def test_garbage_base64():
    with pytest.raises(ValueError, match="bad base64"):
        pem_blocks(b"-----BEGIN CERTIFICATE-----\nnot*base64!\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="empty"):
        pem_blocks(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")


@pytest.mark.parametrize("cut", [1, 2, 10, 100, -1, -40])
def test_truncated(good_der, cut):
    with pytest.raises(ValueError, match=r"truncated|malformed|expected|bad length"):
        leaf_info(_pem(good_der[:cut]))


def test_wrong_outer_tag(good_der):
    with pytest.raises(ValueError, match="expected tag 0x30, found 0x31"):
        cert_info_der(b"\x31" + good_der[1:])


def test_trailing_data(good_der):
    with pytest.raises(ValueError, match="trailing data"):
        cert_info_der(good_der + b"\x00\x00")


def test_wrong_inner_tag(good_der):
    # The serial number's INTEGER tag (after the [0] version) turned into an OCTET STRING.
    position = good_der.index(b"\xa0\x03\x02\x01\x02") + 5  # just after the [0] version
    assert good_der[position] == 0x02
    broken = good_der[:position] + b"\x04" + good_der[position + 1 :]
    with pytest.raises(ValueError, match="expected tag 0x02"):
        cert_info_der(broken)


def test_impossible_date(good_der):
    leaf = x509.load_der_x509_certificate(good_der)
    stamp = leaf.not_valid_after_utc.strftime("%y%m%d%H%M%SZ").encode()
    broken = good_der.replace(stamp, stamp[:2] + b"13" + stamp[4:])  # month 13
    with pytest.raises(ValueError, match="impossible date"):
        cert_info_der(broken)


def test_indefinite_length(good_der):
    with pytest.raises(ValueError, match="indefinite length"):
        cert_info_der(b"\x30\x80" + good_der[4:])
