"""The proxy's error tree. Errors carry what the caller needs to act (a key, a status)."""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose."""


class ConfigError(ProxyError):
    """A configuration problem; `key` is the dotted config key (or the file) at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class UpstreamError(ProxyError):
    """The upstream failed; `status` is what the client should get (502 or 504, like h11's
    error_status_hint). `request_sent` tells whether any byte of the request reached it, which
    decides whether a retry on another server is safe."""

    def __init__(self, message: str, status: int = 502, *, request_sent: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.request_sent = request_sent


class StartupError(ProxyError):
    """The proxy cannot start: a port already taken (exit 1), a prestart step that failed
    (exit 2, like a bad config: the deployment itself is wrong). One line, said once."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
