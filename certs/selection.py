"""Pure host-name matching shared by the SNI cache and file validation.

Rules (RFC 6125 as browsers apply them): names compare case-insensitively, a trailing dot is
ignored, and a wildcard stands for exactly one whole left-most label: "*.example.test" matches
"a.example.test" but neither "a.b.example.test" nor "example.test".
"""

from __future__ import annotations

from collections.abc import Collection, Iterable


def normalize_host(name: str) -> str:
    """The form every table is keyed by: lowercase, no trailing dot."""
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    return name


def wildcard_parent(host: str) -> str | None:
    """For a normalized host "a.example.test", the parent "example.test" that "*.example.test"
    covers; None when the host has a single label (no wildcard may cover it)."""
    dot = host.find(".")
    if dot <= 0 or dot == len(host) - 1:
        return None
    return host[dot + 1 :]


def is_wildcard(name: str) -> bool:
    return name.startswith("*.")


def host_covered(host: str, names: Collection[str]) -> bool:
    """Whether a certificate with these (normalized) SAN names is valid for `host`.

    A wildcard host ("*.example.test", from a spec) is covered only by that same wildcard: a
    certificate for "a.example.test" does not serve every other name below example.test.
    """
    host = normalize_host(host)
    if host in names:
        return True
    if is_wildcard(host):
        return False
    parent = wildcard_parent(host)
    return parent is not None and f"*.{parent}" in names


def uncovered_hosts(hosts: Iterable[str], names: Iterable[str]) -> list[str]:
    """The hosts (in order) that a certificate with SAN `names` does not cover."""
    normalized = {normalize_host(n) for n in names}
    return [h for h in hosts if not host_covered(h, normalized)]
