"""open_backend: the backend `[storage]` names."""

from __future__ import annotations

from pathlib import Path

from .contract import Backend, StorageError, StorageSettings
from .file import FileBackend


def open_backend(settings: StorageSettings, data_dir: Path) -> Backend:
    """The configured backend (file: data_dir). redis and cryptography are imported only
    here, when configured: the long-running proxy does not pay for what it does not use.
    StorageError when it cannot be opened (redis-py missing, an unreadable key file)."""
    backend: Backend
    if settings.backend == "redis":
        if settings.url is None:
            raise StorageError("storage.url: missing: the redis backend needs a redis:// URL")
        try:
            from .redis import RedisBackend
        except ImportError:
            raise StorageError(
                "the redis backend needs redis-py: pip install 'tlsproxy[redis]'"
            ) from None
        backend = RedisBackend(settings.url, settings.prefix)
    else:
        backend = FileBackend(data_dir)
    if settings.encryption_key_file is not None:
        from .crypt import EncryptedBackend, read_secret

        backend = EncryptedBackend(backend, read_secret(settings.encryption_key_file))
    return backend


def copy_all(source: Backend, target: Backend) -> int:
    """Copy every key of `source` into `target` (overwriting what is there); the count.
    Everything is read before anything is written, so that a source that fails (a value that
    does not decrypt, Redis gone) leaves the target as it was. A storage of certificates is
    small: megabytes for thousands of names. Locks are not copied: they belong to running
    instances, which should be stopped."""
    values = []
    for key in source.list("", recursive=True):
        value = source.load(key)
        if value is not None:  # else deleted since it was listed
            values.append((key, value))
    for key, value in values:
        target.store(key, value)
    return len(values)
