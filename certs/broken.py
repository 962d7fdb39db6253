"""Broken certificates on demand (a local badssl): what each kind is, and whether a stored one
still is what it should be. Pure, and free of `cryptography`: the serving process and the config
parser use it; certs.issuers.broken makes the certificates.

Each kind gets exactly one thing wrong, and everything else is what the local CA would issue for
the site, so that a client trusting the local CA's root and connecting with one of the site's
names refuses it for that one reason only (what a test of an HTTPS client wants to prove).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from .models import CertInfo
from .selection import normalize_host, uncovered_hosts, wildcard_parent
from .storage import CAFiles, Storage
from .x509_lite import leaf_info, pem_blocks

BrokenKind = Literal[
    "expired",
    "not-yet-valid",
    "wrong-host",
    "self-signed",
    "untrusted-root",
    "incomplete-chain",
]

# What is wrong with each, in the words of logs, `tlsproxy check` and the README.
BROKEN_KINDS: dict[str, str] = {
    "expired": "valid until yesterday",
    "not-yet-valid": "valid from 30 days from now",
    "wrong-host": "issued for another name",
    "self-signed": "signed by its own key",
    "untrusted-root": "from a root no client trusts",
    "incomplete-chain": "served without its intermediate",
}

# Reserved: a site's first host never contains "_" (config checks host names), so no real
# certificate's storage name can start with this.
_STORAGE_PREFIX = "broken_"
# RFC 2606 reserves .invalid: no real name, and no sensible site, ends with it.
_WRONG_HOST = "wrong-host.invalid"


def untrusted_ca_files(storage: Storage) -> CAFiles:
    """Where the CA of "untrusted-root" certificates lives in data_dir. Its root key is not
    kept: a new intermediate comes with a new root (nobody trusts either)."""
    directory = ("broken", "untrusted-ca")
    return CAFiles(
        root_cert=storage.path(*directory, "root.pem"),
        root_key=storage.path(*directory, "root.key"),
        intermediate_cert=storage.path(*directory, "intermediate.pem"),
        intermediate_key=storage.path(*directory, "intermediate.key"),
    )


def storage_name(kind: str, name: str) -> str:
    """Where a site's broken certificate of this kind is kept, apart from its good one: turning
    `broken` off serves the good one again, untouched, and on again reuses this one."""
    return f"{_STORAGE_PREFIX}{kind}_{name}"


def wrong_host(hosts: tuple[str, ...]) -> str:
    """A name none of `hosts` matches. Candidates differ in their number of labels and a host
    pattern matches names of one length only, so one of len(hosts) + 1 of them is free."""
    for depth in range(len(hosts) + 1):
        candidate = "x." * depth + _WRONG_HOST
        if all(not _matches(h, candidate) for h in hosts):
            return candidate
    raise AssertionError("unreachable: a host pattern matches at most one candidate")


def _matches(pattern: str, name: str) -> bool:
    pattern = normalize_host(pattern)
    if pattern.startswith("*."):
        return wildcard_parent(name) == pattern[2:]
    return pattern == name


def still_broken(
    kind: str,
    hosts: tuple[str, ...],
    chain_pem: bytes,
    now: datetime,
    *,
    intermediate_pem: bytes | None,
    untrusted_intermediate_pem: bytes | None,
) -> bool:
    """Whether a stored certificate of `kind` is still wrong in that one way and right in every
    other, so that it can be served again (a not-yet-valid one ends up valid, the local CA's
    intermediate is replaced, the site's hosts change). Read without `cryptography`: the chain's
    second certificate is compared as bytes with the intermediate that should have signed it."""
    try:
        blocks = pem_blocks(chain_pem)
        info = leaf_info(chain_pem)
    except ValueError:
        return False
    valid_now = info.not_before <= now < info.not_after
    covered = not uncovered_hosts(hosts, info.hosts)
    from_local_ca = _second_is(blocks, intermediate_pem)
    if kind == "expired":
        return covered and from_local_ca and len(blocks) == 2 and info.not_after <= now
    if kind == "not-yet-valid":
        return covered and from_local_ca and len(blocks) == 2 and now < info.not_before
    if kind == "wrong-host":
        matched = [h for h in info.hosts if any(_matches(p, h) for p in hosts)]
        return valid_now and from_local_ca and len(blocks) == 2 and not matched and not covered
    if kind == "self-signed":
        return valid_now and covered and len(blocks) == 1 and info.issuer == info.subject
    if kind == "untrusted-root":
        return (
            valid_now
            and covered
            and len(blocks) == 3
            and _second_is(blocks, untrusted_intermediate_pem)
        )
    if kind == "incomplete-chain":
        issued = _issued_by_name(info, intermediate_pem)
        return valid_now and covered and len(blocks) == 1 and issued
    return False


def _second_is(blocks: list[bytes], intermediate_pem: bytes | None) -> bool:
    if intermediate_pem is None or len(blocks) < 2:
        return False
    try:
        return blocks[1] == pem_blocks(intermediate_pem)[0]
    except ValueError:
        return False


def _issued_by_name(info: CertInfo, intermediate_pem: bytes | None) -> bool:
    # By name only: a client never gets this leaf's intermediate, so which of the local CA's
    # intermediates signed it changes nothing a client can see.
    if intermediate_pem is None:
        return False
    try:
        return info.issuer == leaf_info(intermediate_pem).subject
    except ValueError:
        return False
