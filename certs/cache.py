"""Certificates by host name, read on every TLS handshake.

`lookup` runs inside the sni_callback, on the event loop, for every ClientHello: it must be a
few dict lookups, no I/O, no locks. Writers (start-up, reload, renewal) never mutate the tables
a reader may be walking: they build new ones and swap a single attribute, which is atomic in
CPython, so a reader sees either the old set or the new set, never a mix.
Lookup order (as certmagic's handshake.go): exact name, then one-label wildcard, then default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .models import Installed
from .selection import is_wildcard, normalize_host, wildcard_parent


@dataclass(frozen=True)
class _Tables:
    exact: Mapping[str, Installed] = field(default_factory=dict)
    # "*.example.test" is keyed by "example.test": one slice and one get per lookup.
    wildcard: Mapping[str, Installed] = field(default_factory=dict)
    by_name: Mapping[str, Installed] = field(default_factory=dict)
    default: str | None = None


class CertificateCache:
    def __init__(self) -> None:
        self._tables = _Tables()

    # -- readers (hot path) --------------------------------------------------------------
    def lookup(self, server_name: str | None) -> Installed | None:
        tables = self._tables  # one snapshot for the whole lookup
        if server_name:
            found = _match(tables, server_name)
            if found is not None:
                return found
        if tables.default is None:
            return None
        return tables.by_name.get(tables.default)

    def lookup_exact_or_wildcard(self, server_name: str) -> Installed | None:
        return _match(self._tables, server_name) if server_name else None

    def get(self, spec_name: str) -> Installed | None:
        return self._tables.by_name.get(spec_name)

    def entries(self) -> list[Installed]:
        return list(self._tables.by_name.values())

    @property
    def default_name(self) -> str | None:
        return self._tables.default

    # -- writers -------------------------------------------------------------------------
    def set_default(self, spec_name: str | None) -> None:
        t = self._tables
        self._tables = _Tables(t.exact, t.wildcard, t.by_name, spec_name)

    def replace(self, installed: Installed, hosts: Sequence[str]) -> None:
        """Serve `installed` for `hosts` from the next handshake on, dropping whatever this
        spec served before (its old certificate and any host it no longer has). A host that
        another spec also claims goes to the latest one installed."""
        t = self._tables
        name = installed.spec_name
        exact = {h: i for h, i in t.exact.items() if i.spec_name != name}
        wildcard = {h: i for h, i in t.wildcard.items() if i.spec_name != name}
        for host in hosts:
            host = normalize_host(host)
            if is_wildcard(host):
                wildcard[host[2:]] = installed
            else:
                exact[host] = installed
        by_name = {**t.by_name, name: installed}
        self._tables = _Tables(exact, wildcard, by_name, t.default)

    def remove(self, spec_name: str) -> None:
        t = self._tables
        exact = {h: i for h, i in t.exact.items() if i.spec_name != spec_name}
        wildcard = {h: i for h, i in t.wildcard.items() if i.spec_name != spec_name}
        by_name = {n: i for n, i in t.by_name.items() if n != spec_name}
        self._tables = _Tables(exact, wildcard, by_name, t.default)


def _match(tables: _Tables, server_name: str) -> Installed | None:
    name = normalize_host(server_name)
    found = tables.exact.get(name)
    if found is not None:
        return found
    parent = wildcard_parent(name)
    return tables.wildcard.get(parent) if parent is not None else None
