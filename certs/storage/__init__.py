"""Storage: the contract and its backends, and the data_dir API the managers use today.

    certs.storage.contract   the contract (Backend), KeyInfo, Lock, StorageError, locked()
    certs.storage.keys       the one key builder: every name below comes from it
    certs.storage.file       the `file` backend (FileBackend) and the atomic-file primitives
    certs.storage.redis      the `redis` backend (imported only when configured)
    certs.storage.crypt      AES-256-GCM of private keys (imported only when configured)
    open_backend(settings)   the backend `[storage]` names

`Storage` below is the data_dir API the managers still use: paths, because the TLS library
and the crypto child process read certificates from files. It is not yet built on the
contract (the file backend shares its primitives and layout, so both see the same keys).

Layout (all directories 0700, every private key 0600):
    data_dir/ca/{root,intermediate}.{pem,key}          the local CA
    data_dir/certificates/<name>/cert.pem key.pem      current chain (leaf first) and key
    data_dir/certificates/<name>/cert.prev.pem ...     the version they replaced
    data_dir/certificates/<name>/state.json            renewal failures and last error, for
                                                       `tlsproxy certs` in another process
    data_dir/locks/<name>.lock                         one flock per name
    data_dir/<anything else>                           free for others, via path()

Every write is atomic (temp file in the same directory, fsync, rename) so that a crash or a
concurrent reader never sees half a file. Locks are flock(2) on a lock file: the kernel drops
them when the holder dies, so a stale lock cannot outlive its process; the holder's pid is
written into the file only to name it in a timeout error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import refuse_passphrase
from ..x509_lite import leaf_info
from . import keys
from .contract import (
    Backend,
    KeyInfo,
    Lock,
    LockLost,
    StorageError,
    StorageSettings,
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
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)

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
        ensure_dir(path.parent)
        write_atomic(path, data, mode=mode)

    @staticmethod
    def read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    # -- certificates --------------------------------------------------------------------
    def save_certificate(self, name: str, chain_pem: bytes, key_pem: bytes) -> StoredCertificate:
        """Store a new chain and key; the pair they replace is kept as *.prev.pem.

        The key goes in before the chain: a reader always checks that the pair matches and
        re-reads if it caught the moment between the two renames (load_certificate).
        """
        directory = ensure_dir(self.certificate_dir(name))
        cert_path, key_path = self.cert_path(name), self.key_path(name)
        old_cert, old_key = self.read(cert_path), self.read(key_path)
        if old_cert is not None and old_key is not None:
            write_atomic(self.previous_key_path(name), old_key, mode=KEY_MODE)
            write_atomic(self.previous_cert_path(name), old_cert, mode=CERT_MODE)
        write_atomic(key_path, key_pem, mode=KEY_MODE)
        write_atomic(cert_path, chain_pem, mode=CERT_MODE)
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
                self.read(cert_path),
                self.read(key_path),
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
        """Make sure a state file exists, at its fixed size, while there is room for one."""
        if not self.state_path(name).exists():
            with contextlib.suppress(OSError):
                self.save_state(name, {})

    # -- locking -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, timeout: float = 60.0, poll: float = 0.05) -> Iterator[None]:
        """Exclusive across processes (and across threads: each call opens its own file).

        Blocks the calling thread while waiting: call it from a worker thread, not the event
        loop. Raises LockTimeout after `timeout` seconds.
        """
        fd = acquire_flock(self.lock_path(name), timeout, poll)
        try:
            yield
        finally:
            release_flock(fd)
