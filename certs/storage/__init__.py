"""Storage: the contract and its backends, and the data_dir API the managers use.

    certs.storage.contract   the contract (Backend), KeyInfo, Lock, StorageError, locked()
    certs.storage.keys       the one key builder: every name below comes from it
    certs.storage.file       the `file` backend (FileBackend) and the atomic-file primitives
    certs.storage.redis      the `redis` backend (imported only when configured)
    certs.storage.crypt      AES-256-GCM of private keys (imported only when configured)
    open_backend(settings)   the backend `[storage]` names

`Storage` below is the API the managers use. It speaks in paths under data_dir, because the
TLS library (load_cert_chain) and the crypto child process read certificates from files. With
the `file` backend data_dir is the store itself. With a shared backend (`redis`), data_dir is
this instance's working copy of it: every write goes to the shared store first, then to the
file; every read asks the shared store and brings the file up to date with its answer. When
the shared store cannot be reached, reads fall back to the working copy (an instance keeps
serving, and starts, with what it has) and `last_error` says why; writes and locks fail, so
nothing is issued that the other instances would not know about.

Layout (all directories 0700, every private key 0600):
    data_dir/ca/{root,intermediate}.{pem,key}          the local CA
    data_dir/certificates/<name>/cert.pem key.pem      current chain (leaf first) and key
    data_dir/certificates/<name>/cert.prev.pem ...     the version they replaced
    data_dir/certificates/<name>/state.json            renewal failures and last error, for
                                                       `tlsproxy certs` in another process
    data_dir/locks/<name>.lock                         one flock per name (file backend)
    data_dir/<anything else>                           free for others, via path()
The key of a file is its path under data_dir (certs.storage.keys), in every backend.

Every write is atomic (temp file in the same directory, fsync, rename) so that a crash or a
concurrent reader never sees half a file. File-backend locks are flock(2) on a lock file: the
kernel drops them when the holder dies, so a stale lock cannot outlive its process; the
holder's pid is written into the file only to name it in a timeout error. Shared-backend locks
expire unless their holder refreshes them (certs.storage.contract).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import refuse_passphrase
from ..x509_lite import leaf_info
from . import keys
from .contract import (
    DEFAULT_LOCK_TTL,
    Backend,
    KeyInfo,
    Lock,
    LockLost,
    StorageError,
    StorageSettings,
    Subscription,
    locked,
)
from .file import (
    CERT_MODE,
    DIR_MODE,
    KEY_MODE,
    FileBackend,
    acquire_flock,
    ensure_dir,
    lock_path,
    release_flock,
    remove_stale_temp_files,
    write_atomic,
)
from .file import fsync_dir as _fsync_dir
from .file import overwrite_in_place as _overwrite_in_place
from .keys import safe_name
from .open import copy_all, open_backend

__all__ = [
    "CERT_MODE",
    "DIR_MODE",
    "KEY_MODE",
    "STATE_SIZE",
    "Backend",
    "CAFiles",
    "FileBackend",
    "KeyInfo",
    "Lock",
    "LockLost",
    "Storage",
    "StorageError",
    "StorageSettings",
    "StoredCertificate",
    "copy_all",
    "ensure_dir",
    "keys",
    "locked",
    "open_backend",
    "safe_name",
    "write_atomic",
]

# Renewal state files are written at this size (JSON padded with spaces), so that an update
# fits in the file's own blocks when the file system is full.
STATE_SIZE = 4096

log = logging.getLogger("tlsproxy.certs")

# How often to re-read a cert/key pair that did not match: a writer replaces key.pem and then
# cert.pem, so a reader may land between the two renames for a few microseconds.
_PAIR_READ_ATTEMPTS = 5


def _pair_matches(cert_path: Path, key_path: Path) -> bool:
    """Whether the TLS library accepts this chain with this key; False when the key is not the
    leaf's (a writer may be between its two renames); ValueError when either is unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path, password=refuse_passphrase)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            return False
        raise ValueError(f"{key_path}: unusable with {cert_path} ({e})") from None
    except FileNotFoundError:
        return False  # replaced between our reads: read again
    return True


def _lock_of(key: str) -> str:
    """The (safe) name of the lock its writers hold while writing `key`."""
    parts = key.split("/")
    if parts[0] == keys.CERTIFICATES and len(parts) > 2:
        return parts[1]
    if parts[0] == keys.CA:
        return keys.CA_LOCK
    if parts[0] == keys.ACME:
        return keys.ACME_ACCOUNT_LOCK
    return ""


@dataclass(frozen=True)
class StoredCertificate:
    chain_pem: bytes
    key_pem: bytes
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class CAFiles:
    root_cert: Path
    root_key: Path
    intermediate_cert: Path
    intermediate_key: Path


class Storage:
    def __init__(
        self,
        data_dir: Path,
        shared: Backend | None = None,
        settings: StorageSettings | None = None,
    ) -> None:
        self.root = Path(data_dir)
        # The store shared with other instances; None: data_dir is the store (file backend).
        self.shared = shared
        # What opened it, so that a crypto child process can open the same store.
        self.settings = settings if settings is not None else StorageSettings()
        # The shared store's last failure (None once a call succeeded again), for
        # `tlsproxy certs` and the logs: reads fall back to data_dir meanwhile.
        self.last_error: str | None = None
        # Shared locks held here, by safe name: a write under one that expired is refused
        # (LockLost) rather than overwriting what the lock's next holder stores.
        self._held: dict[str, Lock] = {}
        self._held_guard = threading.Lock()

    @classmethod
    def open(cls, data_dir: Path, settings: StorageSettings) -> Storage:
        """data_dir alone (file backend) or data_dir as the working copy of a shared store.
        StorageError when the shared store cannot be opened (redis-py missing, a bad key
        file); an unreachable Redis is not an error here (see the class docstring)."""
        if settings.backend == "file":
            return cls(data_dir, None, settings)
        return cls(data_dir, open_backend(settings, Path(data_dir)), settings)

    def describe(self) -> str:
        return self.shared.describe() if self.shared is not None else f"data_dir {self.root}"

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()

    def _key(self, path: Path) -> str:
        """The storage key of a path under data_dir."""
        try:
            return keys.check_key(path.relative_to(self.root).as_posix())
        except ValueError:
            raise ValueError(f"{path}: not a storage path under {self.root}") from None

    def _shared_failed(self, error: StorageError) -> None:
        if self.last_error is None:
            log.warning("%s; using data_dir's copy meanwhile", error)
        self.last_error = str(error)

    def _shared_ok(self) -> None:
        if self.last_error is not None:
            log.warning("%s: reachable again", self.describe())
            self.last_error = None

    def ping(self) -> None:
        """StorageError unless the shared store answers (a no-op for the file backend)."""
        if self.shared is not None:
            self.shared.exists(keys.CA_ROOT_CERT)

    # -- paths ---------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        """A path under data_dir for other parts of certs/ (e.g. the ACME account)."""
        return self.root.joinpath(*(safe_name(p) for p in parts))

    def ca_files(self) -> CAFiles:
        return CAFiles(
            root_cert=self.root / keys.CA_ROOT_CERT,
            root_key=self.root / keys.CA_ROOT_KEY,
            intermediate_cert=self.root / keys.CA_INTERMEDIATE_CERT,
            intermediate_key=self.root / keys.CA_INTERMEDIATE_KEY,
        )

    def certificate_dir(self, name: str) -> Path:
        return self.root / keys.certificate_prefix(name)

    def cert_path(self, name: str) -> Path:
        return self.root / keys.cert(name)

    def key_path(self, name: str) -> Path:
        return self.root / keys.private_key(name)

    def previous_cert_path(self, name: str) -> Path:
        return self.root / keys.previous_cert(name)

    def previous_key_path(self, name: str) -> Path:
        return self.root / keys.previous_key(name)

    def state_path(self, name: str) -> Path:
        return self.root / keys.state(name)

    def lock_path(self, name: str) -> Path:
        return lock_path(self.root, name)

    # -- generic files -------------------------------------------------------------------
    def write(self, path: Path, data: bytes, *, mode: int = KEY_MODE) -> None:
        """Store `data` at `path`: in the shared store first (StorageError when it cannot
        take it, and then data_dir is left as it was), then in data_dir."""
        if self.shared is not None:
            key = self._key(path)
            held = self._held.get(_lock_of(key))
            if held is not None:
                held.check()
            try:
                self.shared.store(key, data)
            except StorageError as e:
                self._shared_failed(e)
                raise
            self._shared_ok()
        ensure_dir(path.parent)
        write_atomic(path, data, mode=mode)

    def read(self, path: Path) -> bytes | None:
        """The bytes stored at `path`, None when there are none. With a shared store, its
        answer, which also brings data_dir's copy up to date; data_dir's copy when the shared
        store cannot be reached."""
        if self.shared is None:
            return self.read_file(path)
        try:
            value = self.shared.load(self._key(path))
        except StorageError as e:
            self._shared_failed(e)
            return self.read_file(path)
        self._shared_ok()
        if value is not None and self.read_file(path) != value:
            mode = KEY_MODE if keys.is_private(self._key(path)) else CERT_MODE
            ensure_dir(path.parent)
            write_atomic(path, value, mode=mode)
        return value

    def exists(self, path: Path) -> bool:
        return self.read(path) is not None

    @staticmethod
    def read_file(path: Path) -> bytes | None:
        """data_dir's copy only."""
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    # -- certificates --------------------------------------------------------------------
    def save_certificate(self, name: str, chain_pem: bytes, key_pem: bytes) -> StoredCertificate:
        """Store a new chain and key; the pair they replace is kept as *.prev.pem.

        The key goes in before the chain: a reader always checks that the pair matches and
        re-reads if it caught the moment between the two writes (load_certificate).
        """
        directory = ensure_dir(self.certificate_dir(name))
        cert_path, key_path = self.cert_path(name), self.key_path(name)
        old_cert, old_key = self.read(cert_path), self.read(key_path)
        if old_cert is not None and old_key is not None:
            self.write(self.previous_key_path(name), old_key, mode=KEY_MODE)
            self.write(self.previous_cert_path(name), old_cert, mode=CERT_MODE)
        self.write(key_path, key_pem, mode=KEY_MODE)
        self.write(cert_path, chain_pem, mode=CERT_MODE)
        _fsync_dir(directory)
        return StoredCertificate(chain_pem, key_pem, cert_path, key_path)

    def load_certificate(self, name: str) -> StoredCertificate | None:
        """The stored pair, or None when there is none. ValueError when the files exist but do
        not parse or do not belong together.

        The pair is checked by the TLS library that will serve it (load_cert_chain refuses a
        key that does not match the leaf), not by `cryptography`, which the long-running proxy
        does not import (certs.crypto_worker). The bytes are read before and after that check:
        when they did not change, the check was about exactly these bytes.
        """
        cert_path, key_path = self.cert_path(name), self.key_path(name)
        for attempt in range(_PAIR_READ_ATTEMPTS):
            chain_pem, key_pem = self.read(cert_path), self.read(key_path)
            if chain_pem is None or key_pem is None:
                return None
            leaf_info(chain_pem)  # ValueError naming what is wrong with the chain
            if _pair_matches(cert_path, key_path) and (
                self.read_file(cert_path),
                self.read_file(key_path),
            ) == (chain_pem, key_pem):
                return StoredCertificate(chain_pem, key_pem, cert_path, key_path)
            if attempt + 1 < _PAIR_READ_ATTEMPTS:
                time.sleep(0.01)
        raise ValueError(f"{key_path} does not match {cert_path}")

    def load_state(self, name: str) -> dict[str, Any]:
        raw = self.read(self.state_path(name))
        if raw is None:
            return {}
        try:
            state = json.loads(raw)
        except ValueError:
            return {}  # a state file is a cache of facts, never worth failing over
        return state if isinstance(state, dict) else {}

    def save_state(self, name: str, state: dict[str, Any]) -> None:
        """Record a certificate's renewal state. Written at a fixed size (JSON padded with
        spaces): when the file system is full, which is when a renewal's error matters most,
        the new state overwrites the old in the blocks it already has instead of failing."""
        data = json.dumps(state, sort_keys=True, indent=1).encode()
        if len(data) < STATE_SIZE:
            data = data.ljust(STATE_SIZE - 1) + b"\n"
        path = self.state_path(name)
        try:
            self.write(path, data, mode=CERT_MODE)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not _overwrite_in_place(path, data):
                raise

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete what atomic writes of killed writers left behind (certs.storage.file)."""
        return remove_stale_temp_files(self.root)

    def reserve_state(self, name: str) -> None:
        """Make sure data_dir holds a state file, at its fixed size, while there is room for
        one. Only data_dir's copy: a new instance must not blank the shared state."""
        path = self.state_path(name)
        if not path.exists():
            data = b"{}".ljust(STATE_SIZE - 1) + b"\n"
            with contextlib.suppress(OSError):
                ensure_dir(path.parent)
                write_atomic(path, data, mode=CERT_MODE)

    def sync_certificate(self, name: str) -> bool:
        """Bring data_dir's copy of `name`'s chain up to date with the shared store; whether
        it changed (another instance stored a new one). Always False for the file backend."""
        if self.shared is None:
            return False
        path = self.cert_path(name)
        before = self.read_file(path)
        return self.read(path) not in (None, before)

    def watch_certificates(self, callback: Callable[[str | None], None]) -> Subscription | None:
        """Call `callback(safe name)` when another instance stores a certificate, or
        `callback(None)` after a gap in which changes may have been missed (from a backend
        thread). None for the file backend: nothing tells it."""
        if self.shared is None:
            return None

        def changed(key: str) -> None:
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == "cert.pem":
                callback(parts[1])
            elif len(parts) == 1:
                callback(None)

        return self.shared.subscribe(keys.CERTIFICATES, changed)

    # -- locking -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, timeout: float = 60.0, poll: float = 0.05) -> Iterator[None]:
        """Exclusive across processes (and across threads: each call opens its own file), and
        across instances with a shared store (its lock expires after DEFAULT_LOCK_TTL unless
        refreshed, so a killed holder frees the name).

        Blocks the calling thread while waiting: call it from a worker thread, not the event
        loop. Raises LockTimeout after `timeout` seconds.
        """
        if self.shared is not None:
            try:
                held = self.shared.lock(name, ttl=DEFAULT_LOCK_TTL, timeout=timeout)
            except StorageError as e:
                self._shared_failed(e)
                raise
            with self._held_guard:
                self._held[safe_name(name)] = held
            try:
                yield
            finally:
                with self._held_guard:
                    if self._held.get(safe_name(name)) is held:
                        del self._held[safe_name(name)]
                self.shared.unlock(name)
            return
        fd = acquire_flock(self.lock_path(name), timeout, poll)
        try:
            yield
        finally:
            release_flock(fd)
