"""Values sealed at rest: a wrapper around any backend.

AES-256-GCM (from `cryptography`), a random 96-bit nonce per value, and the key's name as
associated data: a value copied under another key does not open. Every value is sealed, not
only private keys: what matters as much as secrecy is that nobody without the secret can plant
a value the proxy accepts. A planted HTTP-01 token would be served by every instance (and
would let its planter pass validation for our names at any CA); a planted local-CA root would
be trusted for client certificates. Someone who can write to the store but lacks the secret
can still delete values or put back older ones that were sealed (deny service), nothing more.
"""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .contract import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_LOCK_TTL,
    Backend,
    ChangeCallback,
    KeyInfo,
    Lock,
    StorageError,
    Subscription,
)

# Marks an encrypted value (and its format's version): a reader tells it from a plain PEM.
MAGIC = b"tlsproxy-aes256gcm-v1:"
NONCE_SIZE = 12


def read_secret(path: Path) -> bytes:
    """The 32-byte secret in `path`: raw, hex (64 characters) or base64 (`openssl rand -base64
    32`). StorageError naming the file otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StorageError(f"{path}: cannot read the encryption key: {e.strerror or e}") from None
    if len(raw) == 32:
        return raw
    text = raw.strip()
    decoded = []
    with contextlib.suppress(ValueError):  # UnicodeDecodeError and binascii.Error are ones
        decoded.append(bytes.fromhex(text.decode("ascii")))
    with contextlib.suppress(ValueError):
        decoded.append(base64.b64decode(text, validate=True))
    for secret in decoded:
        if len(secret) == 32:
            return secret
    raise StorageError(
        f"{path}: not an encryption key: expected 32 bytes (raw, 64 hex digits or base64, "
        "e.g. `openssl rand -base64 32`)"
    )


class EncryptedBackend:
    """`inner` with every value sealed; every other operation passes through."""

    def __init__(self, inner: Backend, secret: bytes) -> None:
        self.inner = inner
        self.kind = inner.kind
        self._aead = AESGCM(secret)

    def describe(self) -> str:
        return f"{self.inner.describe()}, encrypted"

    def store(self, key: str, value: bytes) -> None:
        nonce = os.urandom(NONCE_SIZE)
        self.inner.store(key, MAGIC + nonce + self._aead.encrypt(nonce, value, key.encode()))

    def load(self, key: str) -> bytes | None:
        value = self.inner.load(key)
        if value is None:
            return None
        if not value.startswith(MAGIC):
            # Accepting it would let anyone who can write to the store plant a value.
            raise StorageError(
                f"{self.inner.describe()}: {key} is stored unencrypted while "
                "encryption_key_file is set (copy it in again with `tlsproxy storage copy`)"
            )
        body = value[len(MAGIC) :]
        try:
            return self._aead.decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], key.encode())
        except InvalidTag:
            raise StorageError(
                f"{self.inner.describe()}: {key} does not decrypt: a different "
                "encryption_key_file, or a value moved from another key"
            ) from None

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str, recursive: bool) -> list[str]:
        return self.inner.list(prefix, recursive)

    def stat(self, key: str) -> KeyInfo | None:
        return self.inner.stat(key)

    def lock(
        self, name: str, ttl: float = DEFAULT_LOCK_TTL, timeout: float = DEFAULT_LOCK_TIMEOUT
    ) -> Lock:
        return self.inner.lock(name, ttl=ttl, timeout=timeout)

    def unlock(self, name: str) -> None:
        self.inner.unlock(name)

    def subscribe(self, prefix: str, callback: ChangeCallback) -> Subscription:
        return self.inner.subscribe(prefix, callback)

    def close(self) -> None:
        self.inner.close()
