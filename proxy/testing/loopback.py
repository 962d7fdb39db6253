"""httpx clients that reach a test proxy's host names on 127.0.0.1 without /etc/hosts.

The URL keeps the real name ("https://api.test:8443/"), so the Host header, the TLS server name
(SNI) and the certificate check all use it, and httpx keeps one pool of connections per name.
Only the TCP connection goes elsewhere: a network backend (httpcore's seam for exactly this)
connects to 127.0.0.1 for the proxy's names and passes every other name through.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from certs.selection import host_covered, normalize_host
from proxy.testing.errors import need

LOOPBACK = "127.0.0.1"


class _Names:
    def __init__(self, hosts: Iterable[str]) -> None:
        self.hosts = {normalize_host(h) for h in hosts}

    def address(self, host: str) -> str:
        return LOOPBACK if host_covered(host, self.hosts) else host


class _Backend:
    """Wraps the pool's own network backend; only connect_tcp's host changes."""

    def __init__(self, inner: Any, names: _Names) -> None:
        self._inner = inner
        self._names = names

    def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        return self._inner.connect_tcp(self._names.address(host), port, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _AsyncBackend(_Backend):
    async def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        return await self._inner.connect_tcp(self._names.address(host), port, *args, **kwargs)


def _pool_of(transport: Any) -> Any:
    # httpx builds its httpcore pool without a way to pass a network backend; the pool keeps
    # it in one attribute, which is swapped here. Checked, so that a future httpx that moves
    # it fails loudly here rather than sending requests to the real DNS names.
    pool = getattr(transport, "_pool", None)
    if pool is None or not hasattr(pool, "_network_backend"):
        raise RuntimeError(
            "this httpx/httpcore version keeps its connection pool elsewhere; "
            "proxy.testing cannot route its names to 127.0.0.1"
        )
    return pool


def client(hosts: Iterable[str], verify: Any, http2: bool = False, **kwargs: Any) -> Any:
    """An httpx.Client for which the proxy's `hosts` resolve to 127.0.0.1."""
    httpx: Any = need("httpx", "TLSProxy.client()")
    transport = httpx.HTTPTransport(verify=verify, http2=http2)
    pool = _pool_of(transport)
    pool._network_backend = _Backend(pool._network_backend, _Names(hosts))
    return httpx.Client(transport=transport, **kwargs)


def async_client(hosts: Iterable[str], verify: Any, http2: bool = False, **kwargs: Any) -> Any:
    """An httpx.AsyncClient for which the proxy's `hosts` resolve to 127.0.0.1."""
    httpx: Any = need("httpx", "TLSProxy.async_client()")
    transport = httpx.AsyncHTTPTransport(verify=verify, http2=http2)
    pool = _pool_of(transport)
    pool._network_backend = _AsyncBackend(pool._network_backend, _Names(hosts))
    return httpx.AsyncClient(transport=transport, **kwargs)
