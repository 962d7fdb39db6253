"""HTTP-01: the key authorizations the proxy's http listeners serve while a challenge is pending.

The ACME code adds a token just before it tells the CA to validate and removes it as soon as
the authorization is settled; the event loop reads it for every
`/.well-known/acme-challenge/TOKEN` request. Reads never take a lock: one dict lookup is atomic
under the GIL, and writers only ever replace or delete whole entries.

Several instances behind one balancer: the CA's validation request reaches whichever instance
the balancer picks, not necessarily the one that ordered. With a shared store, publish() also
stores the token there and every instance keeps a copy of all pending tokens, updated by the
store's change notifications (share()), so that the lookup stays a dict read on the event loop.
The token is in the store before the CA is told to validate, and a notification reaches the
other instances in about a millisecond, well before the CA's request does.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading

from ..storage import keys
from ..storage.contract import Backend, StorageError, Subscription

log = logging.getLogger("tlsproxy.certs.acme")

# How long a challenge request may wait for the shared store (lookup_stored).
LOOKUP_TIMEOUT = 2.0

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
    """Pending HTTP-01 challenges by token; shared by the ACME threads and the event loop, and
    with a shared store, by the instances."""

    def __init__(self, shared: Backend | None = None) -> None:
        self._pending: dict[str, str] = {}
        self._write = threading.Lock()
        self._shared = shared
        self._subscription: Subscription | None = None

    # -- several instances -------------------------------------------------------------------
    def share(self) -> None:
        """Blocking: follow the shared store's pending tokens (a no-op without one)."""
        if self._shared is None or self._subscription is not None:
            return
        self._subscription = self._shared.subscribe(keys.HTTP01, self._changed)
        self._changed(keys.HTTP01)

    def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def _changed(self, key: str) -> None:
        """From the store's thread: `key` was stored or deleted, or (the prefix itself) any
        token may have changed."""
        assert self._shared is not None
        try:
            if key == keys.HTTP01:
                found = self._shared.list(keys.HTTP01, recursive=True)
                values = {k.rsplit("/", 1)[-1]: self._shared.load(k) for k in found}
                with self._write:
                    self._pending = {t: v.decode() for t, v in values.items() if v is not None}
                return
            token = key.rsplit("/", 1)[-1]
            value = self._shared.load(key)
        except StorageError as e:
            log.warning("http-01 tokens of the other instances: %s", e)
            return
        with self._write:
            if value is None:
                self._pending.pop(token, None)
            else:
                self._pending[token] = value.decode()

    @property
    def shared(self) -> bool:
        return self._shared is not None

    async def lookup_stored(self, token: str) -> str | None:
        """The shared store's answer for a token the mirror does not hold (yet): the CA may
        validate before the change notification reaches this instance. None when it has
        none, or cannot answer within LOOKUP_TIMEOUT (a challenge fails; the order retries)."""
        if self._shared is None or not _TOKEN.fullmatch(token):
            return None
        try:
            value = await asyncio.wait_for(
                asyncio.to_thread(self._shared.load, keys.http01_token(token)), LOOKUP_TIMEOUT
            )
        except (StorageError, TimeoutError) as e:
            log.warning("http-01 token %s: the shared store did not answer: %s", token, e)
            return None
        return None if value is None else value.decode()

    async def publish(self, token: str, key_authorization: str) -> None:
        """add(), and with a shared store, store it there for the other instances first."""
        if self._shared is not None:
            await asyncio.to_thread(
                self._shared.store, keys.http01_token(token), key_authorization.encode()
            )
        self.add(token, key_authorization)

    async def withdraw(self, token: str) -> None:
        """remove(), here and in the shared store."""
        self.remove(token)
        if self._shared is not None:
            try:
                await asyncio.to_thread(self._shared.delete, keys.http01_token(token))
            except StorageError as e:
                log.warning("http-01 token %s left in the shared store: %s", token, e)

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
