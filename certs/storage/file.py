"""The `file` backend: keys as files under data_dir, today's semantics.

Every write is atomic (temp file in the same directory, fsync, rename) so that a crash or a
concurrent reader never sees half a file; every file is 0600 and every directory 0700. Locks
are flock(2) on data_dir/locks/<name>.lock: the kernel drops them when the holder dies, so the
contract's ttl is moot here (nothing to refresh, nothing can expire under a live holder) and a
lock is never lost. Changes are found by polling (there is no one to push them).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat as stat_module
import threading
import time
from pathlib import Path

from ..errors import LockTimeout
from . import keys
from .contract import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_LOCK_TTL,
    DEFAULT_POLL_INTERVAL,
    ChangeCallback,
    KeyInfo,
    Lock,
    notify,
)

DIR_MODE = 0o700
KEY_MODE = 0o600
# Certificates are public, but a data_dir is private to the proxy's user: keep one mode.
CERT_MODE = 0o600


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
    fsync_dir(path.parent)


# write_atomic's temporary files: "." + the file's name + "." + pid + "." + 12 hex + ".tmp".
TEMP_FILE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{12}\.tmp$")


def alive(pid: int) -> bool:
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


def overwrite_in_place(path: Path, data: bytes) -> bool:
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


def fsync_dir(directory: Path) -> None:
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


def remove_stale_temp_files(root: Path) -> list[Path]:
    """Delete what atomic writes left behind when their writer was killed (kill -9, a power
    cut): `.NAME.PID.HEX.tmp` files of processes that are gone. They may hold private keys,
    and nothing would ever read or remove them."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for directory, _, files in os.walk(root):
        for name in files:
            match = TEMP_FILE.match(name)
            if match is None or alive(int(match.group(1))):
                continue
            path = Path(directory) / name
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def lock_path(root: Path, name: str) -> Path:
    return root / keys.LOCKS / f"{keys.safe_name(name)}.lock"


def acquire_flock(path: Path, timeout: float, poll: float = 0.05) -> int:
    """An open fd holding an exclusive flock on `path` (each call opens its own file, so this
    excludes other threads of this process too). Blocks the calling thread while waiting;
    LockTimeout after `timeout` seconds, naming the holder's pid."""
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
        # The pid is there only to be named in another waiter's timeout error.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_flock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class FileBackend:
    """The storage contract over a directory (certs.storage.contract.Backend)."""

    kind = "file"

    def __init__(self, root: Path, *, poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        self.root = Path(root)
        self.poll_interval = poll_interval
        self._held: dict[str, tuple[int, Lock]] = {}
        self._held_guard = threading.Lock()

    def describe(self) -> str:
        return f"file storage {self.root}"

    def _path(self, key: str) -> Path:
        return self.root / keys.check_key(key)

    def store(self, key: str, value: bytes) -> None:
        path = self._path(key)
        ensure_dir(path.parent)
        write_atomic(path, value, mode=KEY_MODE)

    def load(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            return None  # a "directory" key has no value

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return False
        fsync_dir(path.parent)
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def stat(self, key: str) -> KeyInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        terminal = stat_module.S_ISREG(st.st_mode)
        return KeyInfo(key, st.st_size if terminal else 0, st.st_mtime, terminal)

    def list(self, prefix: str, recursive: bool) -> list[str]:
        prefix = keys.check_prefix(prefix).rstrip("/")
        found: list[str] = []
        self._walk(self.root / prefix if prefix else self.root, prefix, recursive, found)
        return sorted(found)

    def _walk(self, directory: Path, prefix: str, recursive: bool, found: list[str]) -> None:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            # Temp files of writes in progress, sockets, names no key can have: not storage.
            if entry.name.startswith(".") or not keys.is_segment(entry.name):
                continue
            key = f"{prefix}/{entry.name}" if prefix else entry.name
            if not prefix and entry.name in keys.RESERVED:
                continue
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    self._walk(Path(entry.path), key, recursive, found)
                else:
                    found.append(key)
            elif entry.is_file(follow_symlinks=False):
                found.append(key)

    # -- locks ---------------------------------------------------------------------------
    def lock(
        self, name: str, ttl: float = DEFAULT_LOCK_TTL, timeout: float = DEFAULT_LOCK_TIMEOUT
    ) -> Lock:
        fd = acquire_flock(lock_path(self.root, name), timeout)
        held = Lock(name, ttl)
        with self._held_guard:
            self._held[name] = (fd, held)
        return held

    def unlock(self, name: str) -> None:
        with self._held_guard:
            entry = self._held.pop(name, None)
        if entry is not None:
            release_flock(entry[0])

    # -- changes -------------------------------------------------------------------------
    def snapshot(self, prefix: str) -> dict[str, tuple[int, int]]:
        """(size, mtime in ns) of every key under `prefix`: what polling compares."""
        result = {}
        for key in self.list(prefix, recursive=True):
            with contextlib.suppress(OSError):
                st = (self.root / key).stat()
                result[key] = (st.st_size, st.st_mtime_ns)
        return result

    def subscribe(self, prefix: str, callback: ChangeCallback) -> _Poller:
        return _Poller(self, prefix, callback)

    def close(self) -> None:
        with self._held_guard:
            held, self._held = list(self._held.values()), {}
        for fd, _ in held:
            release_flock(fd)


class _Poller:
    """Compares snapshots every poll_interval: a file replaced by rename gets a new mtime (and
    usually a new size), which is all an atomic write can look like from outside."""

    def __init__(self, backend: FileBackend, prefix: str, callback: ChangeCallback) -> None:
        self._backend = backend
        self._prefix = keys.check_prefix(prefix)
        self._callback = callback
        self._stop = threading.Event()
        self._seen = backend.snapshot(self._prefix)
        self._thread = threading.Thread(
            target=self._run, name=f"storage-poll:{prefix}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._backend.poll_interval):
            now = self._backend.snapshot(self._prefix)
            changed = {k for k in now.keys() | self._seen.keys() if now.get(k) != self._seen.get(k)}
            self._seen = now
            for key in sorted(changed):
                notify(self._callback, key)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
