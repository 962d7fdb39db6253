"""The built-in local CA (`tls = "internal"`): a root, an intermediate, short-lived leaves.

The root (10 years) only ever signs intermediates (1 year, renewed here when a third of it is
left); leaves are signed by the intermediate. So the root key is touched once a year at most,
and a leaf, an intermediate or its key can leak or roll over without users re-trusting anything:
they trust the root once (`tlsproxy ca`). The root carries no name constraints on purpose: the
local CA serves whatever names the user configures (internal domains included), and a
constraint list would have to be known before the root is made.
Leaves live days (7 by default), so a copied leaf key is worth little, and renewal runs often
enough that it is known to work.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import CertificateFileError, IssuanceError
from ..files import parse_key, read_file
from ..keys import (
    certificate_to_pem,
    chain_to_pem,
    generate_private_key,
    key_matches_certificate,
    load_certificates,
    load_private_key,
    private_key_to_pem,
    subject_alt_name,
)
from ..models import CertSpec
from ..renewal import DEFAULT_LEAF_LIFETIME, needs_renewal
from ..storage import CERT_MODE, KEY_MODE, Storage

log = logging.getLogger("tlsproxy.certs")

ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=365)
# Leaves start a little in the past so that a client whose clock is slightly behind accepts
# them; capped at a tenth of the lifetime so that short test lifetimes stay meaningful.
MAX_BACKDATE = timedelta(minutes=1)
CA_LOCK_NAME = "local-ca"
# The CA's names: organization "<label> CA", common names "<label> root|intermediate <tag>".
LABEL = "tlsproxy local"

_SERVER_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
# A root the user brings ([local_ca] root_cert/root_key) may have any of these keys; the local
# CA's own keys (its root, intermediates, leaves) are EC P-256.
CAKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
# (certificate, key) of a root the user brings.
RootFiles = tuple[Path, Path]
# Where the key of a root the local CA made goes when the user's root replaces it.
REPLACED_ROOT_KEY = "root.key.replaced"


def _now(clock: Callable[[], float]) -> datetime:
    # Whole seconds: that is all X.509 can hold, and tests compare against it.
    return datetime.fromtimestamp(int(clock()), UTC)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    # A CA signs certificates and CRLs; a leaf's EC key only signs the handshake (it never
    # encrypts a premaster secret, so no key_encipherment).
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_name(kind: str, tag: str, label: str) -> x509.Name:
    # A random tag tells apart the CAs of several installs that a user may have trusted.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{label} CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{label} {kind} {tag}"),
        ]
    )


def make_root(
    now: datetime, label: str = LABEL
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A root named "<label> root <random tag>", organization "<label> CA"."""
    key = generate_private_key()
    name = _ca_name("root", secrets.token_hex(4), label)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - MAX_BACKDATE)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _signing_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign the message itself: no separate hash may be given.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _root_tag(root: x509.Certificate) -> str:
    """The tag the intermediates' names carry: the random one of a root made here, else a
    short fingerprint (a root the user brought may have no CN at all, or any CN)."""
    names = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    if cn.startswith(f"{LABEL} root ") and cn.split():
        return cn.split()[-1]
    return root.fingerprint(hashes.SHA256())[:4].hex()


def make_intermediate(
    root: x509.Certificate,
    root_key: CAKey,
    now: datetime,
    label: str = LABEL,
    *,
    kind: str = "intermediate",
    usage: x509.ExtendedKeyUsage = _SERVER_AUTH,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An intermediate under `root`; `usage` limits what it may sign (a leaked intermediate
    key can then only mint that kind of certificate)."""
    key = generate_private_key()
    tag = _root_tag(root)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_ca_name(kind, tag, label))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - MAX_BACKDATE)
        .not_valid_after(min(now + INTERMEDIATE_LIFETIME, root.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(usage, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(root), critical=False)
        .sign(root_key, _signing_hash(root_key))  # type: ignore[arg-type]
    )
    return cert, key


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:  # a root brought by the user may lack it
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def load_user_root(files: RootFiles, now: datetime) -> tuple[x509.Certificate, CAKey]:
    """The root the user brought ([local_ca] root_cert, root_key), checked as a root the local
    CA can issue its intermediates under; CertificateFileError naming the file at fault."""
    cert_path, key_path = files
    cert = _parse_cert(cert_path, read_file(cert_path))
    key = parse_key(key_path, read_file(key_path))
    if not isinstance(key, CAKey):
        raise CertificateFileError(key_path, f"unsupported key type {type(key).__name__}")
    if not key_matches_certificate(key, cert):
        raise CertificateFileError(key_path, f"is not the key of the certificate in {cert_path}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateFileError(cert_path, "not a CA certificate (no basicConstraints CA:TRUE)")
    if constraints.path_length == 0:
        raise CertificateFileError(
            cert_path, "pathlen:0 lets it sign leaves only, and the local CA needs an intermediate"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise CertificateFileError(cert_path, "its keyUsage does not allow signing certificates")
    if now >= cert.not_valid_after_utc:
        raise CertificateFileError(cert_path, f"expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert, key


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class _CAState:
    root: x509.Certificate
    root_key: CAKey | None  # None when the user moved it offline
    intermediate: x509.Certificate | None
    intermediate_key: ec.EllipticCurvePrivateKey | None


class LocalCA:
    """An Issuer (certs.issuers.Issuer) over the CA kept in storage."""

    name = "local CA"

    def __init__(
        self,
        root: x509.Certificate,
        intermediate: x509.Certificate,
        intermediate_key: ec.EllipticCurvePrivateKey,
        *,
        leaf_lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.intermediate = intermediate
        self._intermediate_key = intermediate_key
        self.leaf_lifetime = leaf_lifetime
        self._clock = clock

    # -- loading -------------------------------------------------------------------------
    @staticmethod
    def read_stored(storage: Storage) -> _CAState | None:
        """What storage holds (None when there is no root yet). Read only: safe for
        `tlsproxy check`. A file that exists but does not parse is a CertificateFileError."""
        files = storage.ca_files()
        root_pem = storage.read(files.root_cert)
        if root_pem is None:
            return None
        root = _parse_cert(files.root_cert, root_pem)
        root_key = _parse_key_file(storage, files.root_key)
        inter_pem = storage.read(files.intermediate_cert)
        intermediate = _parse_cert(files.intermediate_cert, inter_pem) if inter_pem else None
        inter_key = _parse_key_file(storage, files.intermediate_key)
        return _CAState(root, root_key, intermediate, inter_key)

    @classmethod
    def load_or_create(
        cls,
        storage: Storage,
        *,
        leaf_lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
        clock: Callable[[], float] = time.time,
        lock_timeout: float = 30.0,
        root_files: RootFiles | None = None,
    ) -> LocalCA:
        """The CA in storage, created or repaired when needed. With `root_files` (a root the
        user brings), that root replaces the stored one (once; its key stays where the user
        keeps it, never copied to storage) and signs the intermediates."""
        now = _now(clock)
        user = load_user_root(root_files, now) if root_files is not None else None
        state = cls._read(storage, user)
        if state is None or cls._needs_work(state, now):
            # Checked again under the lock: two proxies starting at once on one data_dir must
            # end up with one CA, not two.
            with storage.lock(CA_LOCK_NAME, timeout=lock_timeout):
                state = cls._repair(storage, cls._read(storage, user), now, user)
        assert state.intermediate is not None and state.intermediate_key is not None
        return cls(
            state.root,
            state.intermediate,
            state.intermediate_key,
            leaf_lifetime=leaf_lifetime,
            clock=clock,
        )

    @classmethod
    def _read(
        cls, storage: Storage, user: tuple[x509.Certificate, CAKey] | None
    ) -> _CAState | None:
        state = cls.read_stored(storage)
        if user is None:
            return state
        if state is None or state.root != user[0]:
            return None  # the user's root is not in storage yet: _repair puts it there
        return _CAState(user[0], user[1], state.intermediate, state.intermediate_key)

    @staticmethod
    def _adopt(storage: Storage, root: x509.Certificate) -> None:
        """Store the user's root in place of the one there (clients trusting the old one
        must trust this one now). The old root's key is kept aside, not deleted: it is the
        only copy, and a stored root must never sit beside a key that is not its own."""
        files = storage.ca_files()
        old_key = storage.read(files.root_key)
        if old_key is not None:
            aside = files.root_key.with_name(REPLACED_ROOT_KEY)
            storage.write(aside, old_key, mode=KEY_MODE)
            files.root_key.unlink()
            log.warning("local CA: the previous root's key was moved to %s", aside)
        storage.write(files.root_cert, certificate_to_pem(root), mode=CERT_MODE)
        log.info(
            "local CA: using the root from local_ca.root_cert: %s", root.subject.rfc4514_string()
        )

    @staticmethod
    def _intermediate_usable(state: _CAState, now: datetime) -> bool:
        return (
            state.intermediate is not None
            and state.intermediate_key is not None
            and now < state.intermediate.not_valid_after_utc
            and issued_by(state.intermediate, state.root)
            and key_matches_certificate(state.intermediate_key, state.intermediate)
        )

    @classmethod
    def _needs_work(cls, state: _CAState, now: datetime) -> bool:
        if now >= state.root.not_valid_after_utc or not cls._intermediate_usable(state, now):
            return True
        assert state.intermediate is not None
        inter = state.intermediate
        due = needs_renewal(inter.not_valid_before_utc, inter.not_valid_after_utc, now)
        return due and state.root_key is not None

    @classmethod
    def _repair(
        cls,
        storage: Storage,
        state: _CAState | None,
        now: datetime,
        user: tuple[x509.Certificate, CAKey] | None = None,
    ) -> _CAState:
        files = storage.ca_files()
        if state is None and user is not None:
            cls._adopt(storage, user[0])
            state = cls._read(storage, user)
            assert state is not None
        if state is None or now >= state.root.not_valid_after_utc:
            if state is not None:
                log.warning("local CA root expired; creating a new one (clients must trust it)")
            root, root_key = make_root(now)
            storage.write(files.root_key, private_key_to_pem(root_key), mode=KEY_MODE)
            storage.write(files.root_cert, certificate_to_pem(root), mode=CERT_MODE)
            log.info("created local CA root %s", root.subject.rfc4514_string())
            state = _CAState(root, root_key, None, None)
        if not cls._needs_work(state, now):
            return state
        if state.root_key is None:
            if cls._intermediate_usable(state, now):
                log.warning(
                    "local CA intermediate is due for renewal but %s is absent", files.root_key
                )
                return state
            raise CertificateFileError(files.root_key, "missing: needed to sign a new intermediate")
        inter, inter_key = make_intermediate(state.root, state.root_key, now)
        storage.write(files.intermediate_key, private_key_to_pem(inter_key), mode=KEY_MODE)
        storage.write(files.intermediate_cert, certificate_to_pem(inter), mode=CERT_MODE)
        log.info("issued local CA intermediate valid until %s", inter.not_valid_after_utc)
        return _CAState(state.root, state.root_key, inter, inter_key)

    # -- using ---------------------------------------------------------------------------
    @property
    def root_pem(self) -> bytes:
        return certificate_to_pem(self.root)

    def issued(self, leaf: x509.Certificate) -> bool:
        """Whether `leaf` chains to the current intermediate (not to a CA since replaced)."""
        return issued_by(leaf, self.intermediate)

    def issue(self, spec: CertSpec, csr_pem: bytes) -> bytes:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise IssuanceError(f"{spec.name}: unreadable CSR ({e})") from e
        if not csr.is_signature_valid:
            raise IssuanceError(f"{spec.name}: CSR signature does not verify")
        leaf = self.sign_leaf(csr.public_key(), spec.hosts)
        return chain_to_pem([leaf, self.intermediate])

    def sign_leaf(
        self,
        public_key: ec.EllipticCurvePublicKey,
        hosts: tuple[str, ...],
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> x509.Certificate:
        """A leaf from the intermediate, valid from now for the leaf lifetime unless told
        otherwise (certs.issuers.broken dates some in the past or the future)."""
        now = _now(self._clock)
        backdate = min(MAX_BACKDATE, self.leaf_lifetime / 10)
        backdate = timedelta(seconds=int(backdate.total_seconds()))
        return leaf_certificate(
            public_key,
            hosts,
            not_before=now - backdate if not_before is None else not_before,
            not_after=(
                min(now + self.leaf_lifetime, self.intermediate.not_valid_after_utc)
                if not_after is None
                else not_after
            ),
            issuer=self.intermediate,
            signing_key=self._intermediate_key,
        )


def leaf_certificate(
    public_key: ec.EllipticCurvePublicKey,
    hosts: tuple[str, ...],
    *,
    not_before: datetime,
    not_after: datetime,
    issuer: x509.Certificate | None,
    signing_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    """A TLS server leaf for `hosts` as the local CA makes them, signed by `signing_key` as
    `issuer`; with no issuer, self-signed (`signing_key` is then the leaf's own key)."""
    if not hosts:
        raise IssuanceError("a certificate needs at least one host name")
    subject = (
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
        if len(hosts[0]) <= 64
        else x509.Name([])
    )
    authority_key_id = (
        _authority_key_id(issuer)
        if issuer is not None
        else x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(_SERVER_AUTH, critical=False)
        # SAN is critical when the subject is empty (RFC 5280 4.2.1.6).
        .add_extension(subject_alt_name(hosts), critical=len(subject) == 0)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_id, critical=False)
    )
    return builder.sign(signing_key, hashes.SHA256())


def _parse_cert(path: Path, data: bytes) -> x509.Certificate:
    try:
        return load_certificates(data)[0]
    except ValueError as e:
        raise CertificateFileError(path, f"not a valid PEM certificate ({e})") from None


def _parse_key_file(storage: Storage, path: Path) -> CAKey | None:
    data = storage.read(path)
    if data is None:
        return None
    try:
        key = load_private_key(data)
    except (ValueError, TypeError) as e:
        raise CertificateFileError(path, f"not a usable PEM private key ({e})") from None
    if not isinstance(key, CAKey):
        # A root put in data_dir/ca by hand may be RSA; what the local CA makes is EC.
        raise CertificateFileError(path, f"unsupported key type {type(key).__name__}")
    return key
