"""The one place that names storage keys (certmagic's keys.go idea).

A key is a "/"-separated path of safe segments ("certificates/app.test/cert.pem"). The file
backend maps it to data_dir/<key>; the redis backend to "<prefix>:data:<key>". Both the legacy
data_dir API (certs.storage.Storage) and the backends take their names from here, so a key a
manager writes today through a path is the key `tlsproxy storage copy` moves.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^a-z0-9._-]")
# Segments of a key: what safe_name produces, plus upper case for HTTP-01 tokens (base64url).
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,255}")

CERTIFICATES = "certificates"
CA = "ca"
ACME = "acme"
HTTP01 = "challenges/http-01"
# data_dir's own top-level directories, not storage: the file backend's lock files, and the
# running proxy's control socket (proxy.server's runtime directory). No key lives under them.
LOCKS = "locks"
RESERVED = (LOCKS, "run")

# Lock names (not keys): one per certificate name, plus these.
CA_LOCK = "local-ca"
ACME_ACCOUNT_LOCK = "acme-account"

# Private keys: the values written 0600 in data_dir.
_PRIVATE_SUFFIXES = (".key", ".key.replaced", "/key.pem", "/key.prev.pem")


def safe_name(name: str) -> str:
    """A file-system-safe, collision-resistant form of a certificate name ("*.a.test" ->
    "wildcard_.a.test")."""
    lowered = name.lower().replace("*", "wildcard_")
    safe = _UNSAFE.sub("_", lowered)
    if safe in ("", ".", ".."):
        raise ValueError(f"unusable storage name {name!r}")
    return safe


def check_key(key: str) -> str:
    """`key` itself when it is a usable key; ValueError otherwise. No empty, "." or ".."
    segment, no leading "/": a key can never name a file outside data_dir."""
    parts = key.split("/")
    for part in parts:
        if part in (".", "..") or not _SEGMENT.fullmatch(part):
            raise ValueError(f"unusable storage key {key!r}")
    if parts[0] in RESERVED:
        raise ValueError(f"storage key {key!r}: {parts[0]}/ is data_dir's own, not storage")
    return key


def check_prefix(prefix: str) -> str:
    """A key prefix for list/subscribe: "" (everything) or a key."""
    return prefix if prefix == "" else check_key(prefix.rstrip("/"))


def join(*parts: str) -> str:
    return "/".join(parts)


def is_private(key: str) -> bool:
    """Whether the value under `key` is a private key (a 0600 file in data_dir)."""
    return key.endswith(_PRIVATE_SUFFIXES)


# -- certificates ---------------------------------------------------------------------------
def certificate_prefix(name: str) -> str:
    return join(CERTIFICATES, safe_name(name))


def cert(name: str) -> str:
    """The chain, leaf first."""
    return join(certificate_prefix(name), "cert.pem")


def private_key(name: str) -> str:
    return join(certificate_prefix(name), "key.pem")


def previous_cert(name: str) -> str:
    return join(certificate_prefix(name), "cert.prev.pem")


def previous_key(name: str) -> str:
    return join(certificate_prefix(name), "key.prev.pem")


def state(name: str) -> str:
    """Renewal state: failures, last error, next attempt, ARI window (JSON)."""
    return join(certificate_prefix(name), "state.json")


# -- the local CA ---------------------------------------------------------------------------
CA_ROOT_CERT = join(CA, "root.pem")
CA_ROOT_KEY = join(CA, "root.key")
CA_INTERMEDIATE_CERT = join(CA, "intermediate.pem")
CA_INTERMEDIATE_KEY = join(CA, "intermediate.key")
CA_CLIENT_INTERMEDIATE_CERT = join(CA, "client-intermediate.pem")
CA_CLIENT_INTERMEDIATE_KEY = join(CA, "client-intermediate.key")


# -- ACME -----------------------------------------------------------------------------------
def acme_account_key(directory_slug: str) -> str:
    return join(ACME, safe_name(directory_slug), "account.key")


def acme_account(directory_slug: str) -> str:
    return join(ACME, safe_name(directory_slug), "account.json")


def http01_token(token: str) -> str:
    """A pending HTTP-01 challenge's key authorization, so that any instance can answer it."""
    return check_key(join(HTTP01, token))


def is_segment(name: str) -> bool:
    """Whether `name` can be one segment of a key (a file name the file backend lists)."""
    return _SEGMENT.fullmatch(name) is not None and name not in (".", "..")
