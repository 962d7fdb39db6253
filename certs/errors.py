"""The certs error tree. Each error carries what its caller needs to print one clear line."""

from __future__ import annotations

from pathlib import Path


class CertError(Exception):
    """Base of every error raised by certs/."""


class CertificateFileError(CertError):
    """A file (or the data directory) that cannot be used; `tlsproxy check`/`run` exit 2 on it."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class IssuanceError(CertError):
    """An issuer could not produce a certificate (local CA failure, ACME order failed, ...)."""


class LockTimeout(CertError):
    """Another holder kept a storage lock longer than the caller wanted to wait."""

    def __init__(self, path: Path | str, holder: str | None, timeout: float) -> None:
        self.path = path
        self.holder = holder
        self.timeout = timeout
        who = f"pid {holder}" if holder else "another process"
        super().__init__(f"{path}: held by {who} for more than {timeout:g}s")
