"""The few facts the serving process needs from a certificate, read without `cryptography`.

Why: importing `cryptography` costs the long-running `tlsproxy run` about 10 MiB of resident
memory for the whole life of the process, while all it needs from a certificate it serves is a
handful of fields for logs, renewal timing and `tlsproxy certs`. Checking signatures and keys is
left to the TLS library (`ssl.SSLContext.load_cert_chain`) and to a short-lived child process
(certs.crypto_worker), so this module only *reads* DER: it trusts nothing it returns.

What it reads (RFC 5280 4.1): tbsCertificate's serial, issuer, validity, subject and the
subjectAltName extension's dNSNames. Names are rendered as `cryptography`'s
`Name.rfc4514_string()` renders them (RDNs last to first, short names for the attribute types
cryptography knows, a dotted OID otherwise, RFC 4514 escaping), so that the same certificate reads
the same in every process. Anything malformed is a ValueError that says what and where.
"""

from __future__ import annotations

import binascii
import ipaddress
import re
from datetime import UTC, datetime

from .models import CertInfo
from .selection import normalize_host

_PEM_BLOCK = re.compile(
    rb"-----BEGIN (X509 )?CERTIFICATE-----(.*?)-----END (X509 )?CERTIFICATE-----", re.DOTALL
)

# Universal tags met in certificates.
_BOOLEAN, _INTEGER, _BIT_STRING, _OCTET_STRING, _OID = 0x01, 0x02, 0x03, 0x04, 0x06
_UTC_TIME, _GENERALIZED_TIME, _UNIVERSAL, _BMP = 0x17, 0x18, 0x1C, 0x1E
_SEQUENCE, _SET = 0x30, 0x31
_VERSION_TAG, _EXTENSIONS_TAG = 0xA0, 0xA3  # [0] and [3] EXPLICIT, constructed
_ISSUER_UID_TAG, _SUBJECT_UID_TAG = 0x81, 0x82  # [1] and [2] IMPLICIT, primitive
_DNS_NAME_TAG = 0x82  # GeneralName dNSName [2] IMPLICIT IA5String
_IP_ADDRESS_TAG = 0x87  # GeneralName iPAddress [7] IMPLICIT OCTET STRING (4 or 16 bytes)

_SAN_OID = "2.5.29.17"
# The short names `cryptography` uses in rfc4514_string (its _NAMEOID_TO_NAME).
_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.6": "C",
    "2.5.4.9": "STREET",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}


def pem_blocks(pem: bytes) -> list[bytes]:
    """The DER of every CERTIFICATE block of a PEM bundle, in file order. ValueError when there
    is none or a block is not valid base64."""
    blocks = []
    for match in _PEM_BLOCK.finditer(pem):
        body = b"".join(match.group(2).split())
        try:
            der = binascii.a2b_base64(body, strict_mode=True)
        except binascii.Error as e:
            raise ValueError(f"certificate block {len(blocks) + 1}: bad base64 ({e})") from None
        if not der:
            raise ValueError(f"certificate block {len(blocks) + 1}: empty")
        blocks.append(der)
    if not blocks:
        raise ValueError("no PEM certificate found")
    return blocks


def leaf_info(pem: bytes) -> CertInfo:
    """The CertInfo of the first certificate of a PEM chain."""
    return cert_info_der(pem_blocks(pem)[0])


def cert_info_der(der: bytes) -> CertInfo:
    """The CertInfo of one DER certificate. ValueError when it is not one."""
    try:
        return _cert_info(der)
    except (IndexError, UnicodeDecodeError) as e:  # a length that runs past its parent
        raise ValueError(f"malformed certificate ({e})") from None


# -- DER ---------------------------------------------------------------------------------


class _Reader:
    """Walks the TLVs of one DER value."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def done(self) -> bool:
        return self.pos >= len(self.data)

    def peek_tag(self) -> int | None:
        return None if self.done() else self.data[self.pos]

    def read(self, expected: int | None = None) -> tuple[int, bytes]:
        data = self.data
        if self.done():
            raise ValueError(f"{self.what}: truncated (expected a value)")
        tag = data[self.pos]
        if tag & 0x1F == 0x1F:
            raise ValueError(f"{self.what}: unsupported high tag number")
        if expected is not None and tag != expected:
            raise ValueError(f"{self.what}: expected tag 0x{expected:02x}, found 0x{tag:02x}")
        if self.pos + 1 >= len(data):
            raise ValueError(f"{self.what}: truncated length")
        first = data[self.pos + 1]
        pos = self.pos + 2
        if first < 0x80:
            length = first
        elif first == 0x80:
            raise ValueError(f"{self.what}: indefinite length is not DER")
        else:
            count = first & 0x7F
            if count > 4 or pos + count > len(data):
                raise ValueError(f"{self.what}: bad length")
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        end = pos + length
        if end > len(data):
            raise ValueError(f"{self.what}: truncated (value runs past the end)")
        self.pos = end
        return tag, data[pos:end]

    def sub(self, expected: int, what: str) -> _Reader:
        return _Reader(self.read(expected)[1], what)


def _cert_info(der: bytes) -> CertInfo:
    outer = _Reader(der, "certificate")
    cert = outer.sub(_SEQUENCE, "certificate")
    if not outer.done():
        raise ValueError("certificate: trailing data after the certificate")
    tbs = cert.sub(_SEQUENCE, "tbsCertificate")
    cert.read(_SEQUENCE)  # signatureAlgorithm
    cert.read(_BIT_STRING)  # signatureValue
    if tbs.peek_tag() == _VERSION_TAG:
        tbs.read()
    serial_bytes = tbs.read(_INTEGER)[1]
    if not serial_bytes:
        raise ValueError("certificate: empty serial number")
    serial = int.from_bytes(serial_bytes, "big", signed=True)
    tbs.read(_SEQUENCE)  # signature
    issuer = _name(tbs.read(_SEQUENCE)[1], "issuer")
    validity = tbs.sub(_SEQUENCE, "validity")
    not_before = _time(*validity.read(), "notBefore")
    not_after = _time(*validity.read(), "notAfter")
    subject = _name(tbs.read(_SEQUENCE)[1], "subject")
    tbs.read(_SEQUENCE)  # subjectPublicKeyInfo
    hosts: tuple[str, ...] = ()
    while not tbs.done():
        tag, value = tbs.read()
        if tag == _EXTENSIONS_TAG:
            hosts = _san_dns_names(value)
        elif tag not in (_ISSUER_UID_TAG, _SUBJECT_UID_TAG):
            raise ValueError(f"tbsCertificate: unexpected tag 0x{tag:02x}")
    return CertInfo(subject, issuer, serial, not_before, not_after, hosts)


def _oid(value: bytes, what: str) -> str:
    if not value or value[-1] & 0x80:
        raise ValueError(f"{what}: malformed object identifier")
    arcs, current = [], 0
    for byte in value:
        current = (current << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(current)
            current = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def _time(tag: int, value: bytes, what: str) -> datetime:
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{what}: not an ASCII time") from None
    if tag == _UTC_TIME:
        match = re.fullmatch(r"(\d\d)(\d{10})Z", text)
        if match is None:
            raise ValueError(f"{what}: malformed UTCTime {text!r}")
        year = int(match.group(1))
        # RFC 5280 4.1.2.5.1: YY >= 50 is 19YY, otherwise 20YY.
        text = f"{1900 + year if year >= 50 else 2000 + year}{match.group(2)}Z"
    elif tag != _GENERALIZED_TIME:
        raise ValueError(f"{what}: expected UTCTime or GeneralizedTime, found tag 0x{tag:02x}")
    match = re.fullmatch(r"(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(?:\.(\d{1,6}))?Z", text)
    if match is None:
        raise ValueError(f"{what}: malformed GeneralizedTime {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    micro = int((match.group(7) or "0").ljust(6, "0"))
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)
    except ValueError as e:
        raise ValueError(f"{what}: impossible date {text!r} ({e})") from None


def _name(value: bytes, what: str) -> str:
    rdns = []
    sequence = _Reader(value, what)
    while not sequence.done():
        rdn = sequence.sub(_SET, what)
        attributes = []
        while not rdn.done():
            pair = rdn.sub(_SEQUENCE, what)
            oid = _oid(pair.read(_OID)[1], what)
            start = pair.pos
            tag, raw = pair.read()
            value = _attribute_value(tag, raw, pair.data[start : pair.pos])
            attributes.append(f"{_SHORT_NAMES.get(oid, oid)}={_escape(value)}")
        if not attributes:
            raise ValueError(f"{what}: empty relative distinguished name")
        rdns.append("+".join(attributes))
    return ",".join(reversed(rdns))


def _attribute_value(tag: int, raw: bytes, encoded: bytes) -> str | bytes:
    # As cryptography reads them: the bytes of a BIT STRING as they are, BMPString and
    # UniversalString in their wide encodings, and every other type as UTF-8 (even the types
    # that should be ASCII or T.61).
    if tag == _BIT_STRING:
        return raw
    codec = {_BMP: "utf-16-be", _UNIVERSAL: "utf-32-be"}.get(tag, "utf-8")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        # RFC 4514's "#" and the hex of the whole encoding: these names are only shown in logs
        # and `tlsproxy certs`, not worth refusing a certificate over.
        return encoded


def _escape(value: str | bytes) -> str:
    """RFC 4514 2.4, exactly as cryptography's _escape_dn_value does it."""
    if not value:
        return ""
    if isinstance(value, bytes):
        return "#" + value.hex()
    for special in ("\\", '"', "+", ",", ";", "<", ">"):
        value = value.replace(special, "\\" + special)
    value = value.replace("\0", "\\00")
    if value[0] == "#" or (value[0] == " " and len(value) > 1):
        value = "\\" + value
    if value[-1] == " ":
        value = value[:-1] + "\\ "
    return value


def _san_dns_names(value: bytes) -> tuple[str, ...]:
    extensions = _Reader(value, "extensions").sub(_SEQUENCE, "extensions")
    while not extensions.done():
        extension = extensions.sub(_SEQUENCE, "extension")
        oid = _oid(extension.read(_OID)[1], "extension")
        if extension.peek_tag() == _BOOLEAN:
            extension.read()
        content = extension.read(_OCTET_STRING)[1]
        if oid != _SAN_OID:
            continue
        names = _Reader(content, "subjectAltName").sub(_SEQUENCE, "subjectAltName")
        hosts, addresses = [], []  # names first, then addresses, as keys.dns_names has them
        while not names.done():
            tag, raw = names.read()
            if tag == _DNS_NAME_TAG:
                try:
                    hosts.append(normalize_host(raw.decode("ascii")))
                except UnicodeDecodeError:
                    raise ValueError("subjectAltName: dNSName is not ASCII") from None
            elif tag == _IP_ADDRESS_TAG and len(raw) in (4, 16):
                addresses.append(str(ipaddress.ip_address(raw)))
        return (*hosts, *addresses)
    return ()
