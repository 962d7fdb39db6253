"""The storage contract every backend implements (certmagic's Storage and Locker, in Python).

Synchronous, on purpose. Everything that touches storage today runs outside the event loop:
issuance and renewal in worker threads (asyncio.to_thread), the `acme` library (blocking
requests), the local CA in a child process (certs.crypto_worker), and the short CLI commands.
An async contract would make every one of them carry a loop, and the event loop itself never
needs storage: the SNI callback reads the in-memory cache only. Backends therefore block; an
async caller wraps a call in asyncio.to_thread, the way the managers already do.

Keys are "/"-separated (certs.storage.keys builds them). Values are bytes, stored and replaced
whole: a reader sees the old value or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from ..errors import CertError

# A lock's expiry when its holder stops refreshing it (killed): long enough to ride out a
# Redis restart (a refresh is tried every ttl/3, and one that succeeds within ttl keeps it),
# short enough that a dead holder's names are taken over in seconds. certmagic's file locks go
# stale after 10 s without a refresh, for the same reasons.
DEFAULT_LOCK_TTL = 15.0
DEFAULT_LOCK_TIMEOUT = 60.0
# How often the file backend looks for changes (it has no push notification).
DEFAULT_POLL_INTERVAL = 5.0


class StorageError(CertError):
    """The storage cannot be used right now (Redis unreachable, refused AUTH, a wrong
    encryption key): one line naming the storage, never its password."""


class LockLost(StorageError):
    """A lock's holder learned that the lock expired (or was taken) under it."""


@dataclass(frozen=True)
class KeyInfo:
    key: str
    size: int
    modified: float  # epoch seconds
    is_terminal: bool  # False for a "directory": a prefix other keys live under


class Lock:
    """A held lock. `lost` is set when the backend found it expired or taken over (the
    refresh failed for longer than its ttl): the holder must stop writing under it."""

    def __init__(self, name: str, ttl: float) -> None:
        self.name = name
        self.ttl = ttl
        self.lost = threading.Event()

    def check(self) -> None:
        """Raise LockLost if the lock is no longer ours; call it before writing under it."""
        if self.lost.is_set():
            raise LockLost(f"storage lock {self.name!r} was lost (expired after {self.ttl:g}s)")


class Subscription(Protocol):
    def close(self) -> None: ...


# Called with the key that changed (stored or deleted), from a backend thread. After a gap in
# which changes may have been missed (Redis reconnected) it is called with the prefix itself:
# "look again at everything under it".
ChangeCallback = Callable[[str], None]


def notify(callback: ChangeCallback, key: str) -> None:
    """Call back from a backend's thread: a failing callback is logged, the thread goes on."""
    try:
        callback(key)
    except Exception:
        logging.getLogger("tlsproxy.certs").exception("storage change callback failed: %s", key)


@runtime_checkable
class Backend(Protocol):
    kind: str  # "file" | "redis"

    def describe(self) -> str:
        """One line for humans and errors: where the data lives (no password)."""
        ...

    def store(self, key: str, value: bytes) -> None: ...

    def load(self, key: str) -> bytes | None:
        """The value, or None when there is none."""
        ...

    def delete(self, key: str) -> bool:
        """Remove the key; whether it existed."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str, recursive: bool) -> list[str]:
        """Sorted keys under `prefix` ("" for all). Not recursive: the keys and "directories"
        right under it; recursive: every terminal key below it."""
        ...

    def stat(self, key: str) -> KeyInfo | None: ...

    def lock(
        self, name: str, ttl: float = DEFAULT_LOCK_TTL, timeout: float = DEFAULT_LOCK_TIMEOUT
    ) -> Lock:
        """Wait up to `timeout` seconds for the named lock (LockTimeout after). The holder
        keeps it alive in the background until unlock(); a holder killed frees it after
        `ttl` seconds at most."""
        ...

    def unlock(self, name: str) -> None: ...

    def subscribe(self, prefix: str, callback: ChangeCallback) -> Subscription:
        """Call `callback(key)` for every key under `prefix` stored or deleted, by this
        process or another, until the subscription is closed."""
        ...

    def close(self) -> None: ...


@contextlib.contextmanager
def locked(
    backend: Backend,
    name: str,
    ttl: float = DEFAULT_LOCK_TTL,
    timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Iterator[Lock]:
    """`with locked(backend, name) as lock:` lock, then unlock whatever happens inside."""
    held = backend.lock(name, ttl=ttl, timeout=timeout)
    try:
        yield held
    finally:
        backend.unlock(name)


def redact_url(url: str) -> str:
    """The URL without its password, for logs, errors and `tlsproxy check`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class StorageSettings:
    """What `[storage]` says (proxy.config builds it; certs never imports proxy)."""

    backend: Literal["file", "redis"] = "file"
    url: str | None = None  # redis only; TLSPROXY_STORAGE_URL when set, else [storage] url
    prefix: str = "tlsproxy"
    encryption_key_file: Path | None = None

    def describe(self) -> str:
        """What `tlsproxy check` prints (no password)."""
        if self.backend == "file":
            return "file (data_dir)"
        assert self.url is not None
        text = f"redis {redact_url(self.url)} (prefix {self.prefix!r})"
        if self.encryption_key_file is not None:
            text += f", encrypted with {self.encryption_key_file}"
        return text
