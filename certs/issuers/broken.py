"""Makes the broken certificates of certs.broken, from the local CA (and, for "untrusted-root",
from a second CA that nobody trusts, kept in data_dir beside the first).

Not an Issuer: nothing here answers a CSR, and nothing made here may pass the manager's checks.
Needs `cryptography`: an isolated manager runs this in certs.crypto_worker.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509

from ..broken import BROKEN_KINDS, untrusted_ca_files, wrong_host
from ..errors import IssuanceError
from ..keys import chain_to_pem, generate_private_key, private_key_to_pem
from ..storage import CERT_MODE, KEY_MODE, CAFiles, Storage
from .local_ca import (
    MAX_BACKDATE,
    LocalCA,
    issued_by,
    leaf_certificate,
    make_intermediate,
    make_root,
)

# These are never renewed (a renewal would have to break them again), so the ones that are
# meant to be valid in time outlive any test run by far, whatever local_ca.leaf_lifetime says:
# a 10 s lifetime must not turn a wrong-host certificate into an expired one.
VALID_FOR = timedelta(days=90)
# Expired: valid for 29 days up to yesterday; not yet valid: from 30 days on, for 30 days.
EXPIRED_FROM, EXPIRED_UNTIL = timedelta(days=30), timedelta(days=1)
NOT_YET_FROM, NOT_YET_UNTIL = timedelta(days=30), timedelta(days=60)

UNTRUSTED_LABEL = "tlsproxy untrusted test"
UNTRUSTED_LOCK = "broken-untrusted-ca"


def make_broken(
    kind: str,
    hosts: tuple[str, ...],
    local_ca: LocalCA,
    storage: Storage,
    now: datetime,
    *,
    lock_timeout: float = 60.0,
) -> tuple[bytes, bytes]:
    """(PEM chain as it is to be served, PEM key) of a certificate of `kind` for `hosts`."""
    if kind not in BROKEN_KINDS:
        raise IssuanceError(f"unknown kind of broken certificate {kind!r}")
    key = generate_private_key()
    public = key.public_key()
    valid_from = now - MAX_BACKDATE
    valid_until = min(now + VALID_FOR, local_ca.intermediate.not_valid_after_utc)
    chain: list[x509.Certificate]
    if kind == "expired":
        leaf = local_ca.sign_leaf(
            public, hosts, not_before=now - EXPIRED_FROM, not_after=now - EXPIRED_UNTIL
        )
        chain = [leaf, local_ca.intermediate]
    elif kind == "not-yet-valid":
        leaf = local_ca.sign_leaf(
            public, hosts, not_before=now + NOT_YET_FROM, not_after=now + NOT_YET_UNTIL
        )
        chain = [leaf, local_ca.intermediate]
    elif kind == "wrong-host":
        leaf = local_ca.sign_leaf(
            public, (wrong_host(hosts),), not_before=valid_from, not_after=valid_until
        )
        chain = [leaf, local_ca.intermediate]
    elif kind == "incomplete-chain":
        chain = [local_ca.sign_leaf(public, hosts, not_before=valid_from, not_after=valid_until)]
    elif kind == "self-signed":
        leaf = leaf_certificate(
            public,
            hosts,
            not_before=valid_from,
            not_after=now + VALID_FOR,
            issuer=None,
            signing_key=key,
        )
        chain = [leaf]
    else:  # untrusted-root
        other = untrusted_ca(storage, now, lock_timeout=lock_timeout)
        until = min(now + VALID_FOR, other.intermediate.not_valid_after_utc)
        leaf = other.sign_leaf(public, hosts, not_before=valid_from, not_after=until)
        # The root goes with the chain, as a server that ships its whole bundle does: clients
        # then name the real fault ("self-signed certificate in certificate chain") instead of
        # the missing issuer that "incomplete-chain" is about.
        chain = [leaf, other.intermediate, other.root]
    return chain_to_pem(chain), private_key_to_pem(key)


def untrusted_ca(storage: Storage, now: datetime, *, lock_timeout: float = 60.0) -> LocalCA:
    """The CA of "untrusted-root" certificates: made once per data_dir, again once expired."""
    files = untrusted_ca_files(storage)
    found = _read_untrusted(storage, files, now)
    if found is not None:
        return found
    # Two proxies on one data_dir must end up with one untrusted CA, as with the local CA.
    with storage.lock(UNTRUSTED_LOCK, timeout=lock_timeout):
        found = _read_untrusted(storage, files, now)
        if found is not None:
            return found
        root, root_key = make_root(now, UNTRUSTED_LABEL)
        intermediate, key = make_intermediate(root, root_key, now, UNTRUSTED_LABEL)
        storage.write(files.intermediate_key, private_key_to_pem(key), mode=KEY_MODE)
        storage.write(files.intermediate_cert, chain_to_pem([intermediate]), mode=CERT_MODE)
        storage.write(files.root_cert, chain_to_pem([root]), mode=CERT_MODE)
        return LocalCA(root, intermediate, key)


def _read_untrusted(storage: Storage, files: CAFiles, now: datetime) -> LocalCA | None:
    from ..keys import key_matches_certificate, load_certificates, load_private_key

    root_pem = storage.read(files.root_cert)
    inter_pem = storage.read(files.intermediate_cert)
    key_pem = storage.read(files.intermediate_key)
    if root_pem is None or inter_pem is None or key_pem is None:
        return None
    try:
        root, intermediate = load_certificates(root_pem)[0], load_certificates(inter_pem)[0]
        key = load_private_key(key_pem)
    except (ValueError, TypeError):
        return None  # made again: nothing of value is lost, nobody trusts it
    if now >= intermediate.not_valid_after_utc - VALID_FOR or now >= root.not_valid_after_utc:
        return None
    if not issued_by(intermediate, root) or not key_matches_certificate(key, intermediate):
        return None
    return LocalCA(root, intermediate, key)  # type: ignore[arg-type]
