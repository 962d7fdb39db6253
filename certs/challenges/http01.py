"""HTTP-01: the key authorizations the proxy's http listeners serve while a challenge is pending.

The ACME code (in worker threads) adds a token just before it tells the CA to validate and
removes it as soon as the authorization is settled; the event loop reads it for every
`/.well-known/acme-challenge/TOKEN` request. Reads never take a lock: one dict lookup is atomic
under the GIL, and writers only ever replace or delete whole entries.
"""

from __future__ import annotations

import re
import threading

PATH_PREFIX = "/.well-known/acme-challenge/"
# RFC 8555 section 8.3: a token is base64url without padding; we accept nothing else so that a
# request path can never name something other than a token.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")


def token_from_path(path: str) -> str | None:
    """The token of a `/.well-known/acme-challenge/TOKEN` request target, or None when the
    target is not one (query strings are ignored)."""
    if not path.startswith(PATH_PREFIX):
        return None
    token = path[len(PATH_PREFIX) :].split("?", 1)[0]
    return token if _TOKEN.fullmatch(token) else None


class Http01Responder:
    """Pending HTTP-01 challenges by token; shared by the ACME threads and the event loop."""

    def __init__(self) -> None:
        self._pending: dict[str, str] = {}
        self._write = threading.Lock()

    def lookup(self, token: str) -> str | None:
        """The key authorization for a pending challenge, None for any other token."""
        return self._pending.get(token)

    def add(self, token: str, key_authorization: str) -> None:
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"not an ACME token: {token!r}")
        with self._write:
            self._pending[token] = key_authorization

    def remove(self, token: str) -> None:
        with self._write:
            self._pending.pop(token, None)

    def __len__(self) -> int:
        return len(self._pending)
