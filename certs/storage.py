"""Files under data_dir: the one place that knows the paths.

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
import fcntl
import json
import os
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LockTimeout
from .files import refuse_passphrase
from .x509_lite import leaf_info

DIR_MODE = 0o700
KEY_MODE = 0o600
# Certificates are public, but a data_dir is private to the proxy's user: keep one mode.
CERT_MODE = 0o600
# Renewal state files are written at this size (JSON padded with spaces), so that an update
# fits in the file's own blocks when the file system is full.
STATE_SIZE = 4096

_UNSAFE = re.compile(r"[^a-z0-9._-]")
# How often to re-read a cert/key pair that did not match: a writer replaces key.pem and then
# cert.pem, so a reader may land between the two renames for a few microseconds.
_PAIR_READ_ATTEMPTS = 5


def safe_name(name: str) -> str:
    """A file-system-safe, collision-resistant form of a certificate name ("*.a.test" ->
    "wildcard_.a.test")."""
    lowered = name.lower().replace("*", "wildcard_")
    safe = _UNSAFE.sub("_", lowered)
    if safe in ("", ".", ".."):
        raise ValueError(f"unusable storage name {name!r}")
    return safe


def write_atomic(path: Path, data: bytes, *, mode: int = KEY_MODE) -> None:
    """Replace `path` with `data` so that readers see either the old or the new content."""
    # O_EXCL on a random name rather than tempfile.mkstemp: the same guarantee, without
    # importing tempfile (and shutil, bz2, lzma with it) into the long-running proxy.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, mode)  # before any byte lands: a key is never readable by others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


# write_atomic's temporary files: "." + the file's name + "." + pid + "." + 12 hex + ".tmp".
_TEMP_FILE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{12}\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    # A zombie writes nothing more: a killed writer whose parent died too waits as one until
    # PID 1 reaps it, which in a container may be never.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: take the kill(0) answer
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def _overwrite_in_place(path: Path, data: bytes) -> bool:
    """Write `data` over an existing file at least as large, in the blocks it has (a full file
    system has none to give a new one). A reader may meet a torn write; state readers accept
    anything unreadable as no state."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size < len(data):
            return False
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some file systems refuse fsync on directories.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def ensure_dir(path: Path) -> Path:
    """mkdir -p where every directory it creates is 0700 (Path.mkdir(parents=True) would give
    the missing parents, data_dir itself among them, the umask's default mode)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process got there first
            directory.mkdir(mode=DIR_MODE)
    return path


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
        ca = self.root / "ca"
        return CAFiles(
            root_cert=ca / "root.pem",
            root_key=ca / "root.key",
            intermediate_cert=ca / "intermediate.pem",
            intermediate_key=ca / "intermediate.key",
        )

    def certificate_dir(self, name: str) -> Path:
        return self.root / "certificates" / safe_name(name)

    def cert_path(self, name: str) -> Path:
        return self.certificate_dir(name) / "cert.pem"

    def key_path(self, name: str) -> Path:
        return self.certificate_dir(name) / "key.pem"

    def previous_cert_path(self, name: str) -> Path:
        return self.certificate_dir(name) / "cert.prev.pem"

    def previous_key_path(self, name: str) -> Path:
        return self.certificate_dir(name) / "key.prev.pem"

    def state_path(self, name: str) -> Path:
        return self.certificate_dir(name) / "state.json"

    def lock_path(self, name: str) -> Path:
        return self.root / "locks" / f"{safe_name(name)}.lock"

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
        """Delete what atomic writes left behind when their writer was killed (kill -9, a
        power cut): `.NAME.PID.HEX.tmp` files of processes that are gone. They may hold
        private keys, and nothing would ever read or remove them."""
        removed = []
        if not self.root.is_dir():
            return removed
        for directory, _, files in os.walk(self.root):
            for name in files:
                match = _TEMP_FILE.match(name)
                if match is None or _alive(int(match.group(1))):
                    continue
                path = Path(directory) / name
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
        return removed

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
        path = self.lock_path(name)
        ensure_dir(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, KEY_MODE)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or None
                        raise LockTimeout(path, holder, timeout) from None
                    time.sleep(min(poll, remaining))
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
