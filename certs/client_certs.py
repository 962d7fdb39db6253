"""Client certificates from the local CA, for sites with `client_auth = { ca = "internal" }`.

They come from their own intermediate, `ca/client-intermediate.pem`, signed by the same root as
the server intermediate. Why not the server intermediate: it carries ExtendedKeyUsage serverAuth
(what it may sign is limited to TLS servers), and OpenSSL refuses a client certificate whose
issuing CA lists an EKU without clientAuth. Why not the root itself: the root key is meant to be
touched once a year at most (local_ca.py); handing out client certificates is a manual, repeated
act. A separate intermediate keeps both properties: a leaked server intermediate cannot mint
client identities, a leaked client intermediate cannot impersonate a site, and clients still
verify against the one root that `ca = "internal"` names.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import CertificateFileError, IssuanceError
from .issuers.local_ca import (
    CA_LOCK_NAME,
    MAX_BACKDATE,
    CAKey,
    LocalCA,
    RootFiles,
    _authority_key_id,
    _key_usage,
    _now,
    _parse_cert,
    _parse_key_file,
    issued_by,
    load_user_root,
    make_intermediate,
)
from .keys import (
    certificate_to_pem,
    chain_to_pem,
    generate_private_key,
    key_matches_certificate,
    private_key_to_pem,
)
from .renewal import needs_renewal
from .storage import CERT_MODE, KEY_MODE, Storage, write_atomic

log = logging.getLogger("tlsproxy.certs")

# Handed out by hand and revoked by replacing the CA, so longer than a server leaf; never longer
# than the intermediate that signs it.
CLIENT_CERT_LIFETIME = timedelta(days=365)
_CLIENT_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
# A file name and a common name at once: no path separators, no leading dot, fits a CN.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$")


def client_intermediate_files(storage: Storage) -> tuple[Path, Path]:
    ca = storage.ca_files().root_cert.parent
    return ca / "client-intermediate.pem", ca / "client-intermediate.key"


def _load_client_intermediate(
    storage: Storage, ca: LocalCA, root_key: CAKey | None, now_s: float
) -> tuple[x509.Certificate, CAKey]:
    cert_path, key_path = client_intermediate_files(storage)
    pem = storage.read(cert_path)
    cert = _parse_cert(cert_path, pem) if pem else None
    key = _parse_key_file(storage, key_path)
    now = _now(lambda: now_s)
    usable = (
        cert is not None
        and key is not None
        and now < cert.not_valid_after_utc
        and issued_by(cert, ca.root)
        and key_matches_certificate(key, cert)
    )
    if usable:
        assert cert is not None and key is not None
        due = needs_renewal(cert.not_valid_before_utc, cert.not_valid_after_utc, now)
        if not due or root_key is None:
            return cert, key
    if root_key is None:
        raise CertificateFileError(
            storage.ca_files().root_key, "missing: needed to sign the client intermediate"
        )
    cert, key = make_intermediate(ca.root, root_key, now, kind="client CA", usage=_CLIENT_AUTH)
    storage.write(key_path, private_key_to_pem(key), mode=KEY_MODE)
    storage.write(cert_path, certificate_to_pem(cert), mode=CERT_MODE)
    log.info("issued local client CA intermediate valid until %s", cert.not_valid_after_utc)
    return cert, key


def issue_client_certificate(
    data_dir: Path,
    name: str,
    *,
    lifetime: timedelta = CLIENT_CERT_LIFETIME,
    clock: Callable[[], float] = time.time,
    root_files: RootFiles | None = None,
    storage: Storage | None = None,
) -> tuple[bytes, bytes]:
    """(chain PEM: the client certificate then its intermediate, key PEM) for `name`, from the
    local CA in `data_dir` (created if missing). It verifies against the local CA's root."""
    if not _NAME.match(name):
        raise IssuanceError(
            f"client name {name!r}: use 1 to 64 letters, digits, '_', '-', '.', '@' "
            "(not starting with '.' or '-')"
        )
    storage = storage if storage is not None else Storage(Path(data_dir))
    ca = LocalCA.load_or_create(storage, clock=clock, root_files=root_files)
    with storage.lock(CA_LOCK_NAME, timeout=60.0):
        if root_files is not None:  # the user's root key stays in the user's file
            root_key = load_user_root(root_files, _now(clock))[1]
        else:
            root_key = _parse_key_file(storage, storage.ca_files().root_key)
        inter, inter_key = _load_client_intermediate(storage, ca, root_key, clock())
    key = generate_private_key()
    now = _now(clock)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(inter.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - MAX_BACKDATE)
        .not_valid_after(min(now + lifetime, inter.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(_CLIENT_AUTH, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(inter), critical=False)
        .sign(inter_key, hashes.SHA256())
    )
    return chain_to_pem([leaf, inter]), private_key_to_pem(key)


def write_client_certificate(
    data_dir: Path,
    name: str,
    out_dir: Path,
    *,
    clock: Callable[[], float] = time.time,
    root_files: RootFiles | None = None,
    storage: Storage | None = None,
) -> tuple[Path, Path]:
    """Issue a client certificate for `name` and write `NAME.pem` (the chain) and `NAME.key`
    (mode 0600) into `out_dir`; returns their paths. Blocking (key generation, file I/O)."""
    chain_pem, key_pem = issue_client_certificate(
        Path(data_dir), name, clock=clock, root_files=root_files, storage=storage
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    write_atomic(key_path, key_pem, mode=KEY_MODE)
    write_atomic(cert_path, chain_pem, mode=0o644)
    return cert_path, key_path
