"""DNS-01: TXT records published with RFC 2136 dynamic updates signed with TSIG (dnspython's
asyncio API), then polled on the zone's authoritative servers until the CA can see them.

Apex and wildcard in one certificate put two values at one name, so values are only ever added
and deleted one by one (never replaced), and exactly the values that were added are deleted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.tsig
import dns.update

from ..errors import CertificateFileError, IssuanceError

log = logging.getLogger("tlsproxy.certs.acme")

RECORD_TTL = 60
_ALGORITHMS = {
    "hmac-md5": dns.tsig.HMAC_MD5,
    "hmac-md5.sig-alg.reg.int": dns.tsig.HMAC_MD5,
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
}
_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*|#[^\n]*", re.S)
_KEY = re.compile(r'\bkey\s+("([^"]+)"|([^\s{";]+))\s*\{(.*?)\}\s*;', re.S)
_ALGORITHM = re.compile(r'\balgorithm\s+"?([A-Za-z0-9.-]+)"?\s*;')
_SECRET = re.compile(r'\bsecret\s+"([^"]*)"\s*;')


class Dns01Error(IssuanceError):
    """A DNS update refused or failed, or a record that did not become visible in time."""


@dataclass(frozen=True)
class TsigKey:
    name: str
    algorithm: str  # lowercase BIND spelling, e.g. "hmac-sha256"
    secret: bytes

    def dns_key(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.name, self.secret, _ALGORITHMS[self.algorithm])


def parse_tsig_key(text: str) -> TsigKey:
    """The first `key "NAME" { algorithm ALG; secret "BASE64"; };` statement of a BIND key file
    (as written by `tsig-keygen`). ValueError says what is wrong."""
    body = _COMMENTS.sub("", text)
    match = _KEY.search(body)
    if match is None:
        raise ValueError('no key statement (key "NAME" { algorithm ...; secret "..."; };)')
    name = match.group(2) or match.group(3)
    inner = match.group(4)
    algorithm = _ALGORITHM.search(inner)
    if algorithm is None:
        raise ValueError(f'key "{name}" has no algorithm')
    alg = algorithm.group(1).lower()
    if alg not in _ALGORITHMS:
        known = ", ".join(sorted(set(_ALGORITHMS) - {"hmac-md5.sig-alg.reg.int"}))
        raise ValueError(f'key "{name}": unknown algorithm {alg!r} (expected one of {known})')
    secret = _SECRET.search(inner)
    if secret is None:
        raise ValueError(f'key "{name}" has no secret')
    try:
        raw = base64.b64decode(secret.group(1), validate=True)
    except binascii.Error:
        raise ValueError(f'key "{name}": secret is not valid base64') from None
    if not raw:
        raise ValueError(f'key "{name}": secret is empty')
    return TsigKey(name=name, algorithm=alg, secret=raw)


def load_tsig_key(path: Path) -> TsigKey:
    """parse_tsig_key over a file; CertificateFileError names the file and the reason."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CertificateFileError(path, f"cannot read TSIG key file: {reason}") from None
    try:
        return parse_tsig_key(text)
    except ValueError as e:
        raise CertificateFileError(path, f"not a usable TSIG key file: {e}") from None


@dataclass(frozen=True)
class TxtRecord:
    name: str  # absolute, with the trailing dot: "_acme-challenge.app.test."
    value: str  # the challenge's validation string (base64url SHA-256 of the key authorization)

    def __str__(self) -> str:
        return f'TXT {self.name} "{self.value}"'


def challenge_record_name(host: str) -> str:
    """Where the TXT for `host` lives; a wildcard is validated at its base name."""
    base = host[2:] if host.startswith("*.") else host
    return f"_acme-challenge.{base.rstrip('.')}."


class Rfc2136Client:
    """Adds and deletes TXT records through one primary server and waits for them to show.

    `host` may be a name or an address; the zone's other authoritative servers (its NS set) are
    asked on the same port, which is 53 everywhere but in tests.
    """

    def __init__(
        self,
        host: str,
        port: int,
        key: TsigKey,
        *,
        zone: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.key = key
        self.zone = dns.name.from_text(zone) if zone else None
        self.timeout = timeout
        self._address: str | None = None

    async def _server(self) -> str:
        if self._address is None:
            loop = asyncio.get_running_loop()
            infos = await loop.getaddrinfo(self.host, self.port, proto=6)
            if not infos:
                raise Dns01Error(f"DNS server {self.host} does not resolve")
            self._address = str(infos[0][4][0])
        return self._address

    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    async def zone_for(self, record_name: str) -> dns.name.Name:
        if self.zone is not None:
            return self.zone
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [await self._server()]
        resolver.port = self.port
        try:
            return await dns.asyncresolver.zone_for_name(
                record_name, resolver=resolver, lifetime=self.timeout
            )
        except dns.exception.DNSException as e:
            raise Dns01Error(
                f"cannot find the zone of {record_name} at {self._where()}: {e} (set acme.dns.zone)"
            ) from None

    async def add(self, records: Sequence[TxtRecord]) -> None:
        await self._update(records, add=True)

    async def delete(self, records: Sequence[TxtRecord]) -> None:
        await self._update(records, add=False)

    async def _update(self, records: Sequence[TxtRecord], *, add: bool) -> None:
        by_zone: dict[dns.name.Name, list[TxtRecord]] = {}
        for record in records:
            by_zone.setdefault(await self.zone_for(record.name), []).append(record)
        for zone, recs in by_zone.items():
            msg = dns.update.UpdateMessage(zone, keyring=self.key.dns_key())
            for r in recs:
                rdata = f'"{r.value}"'
                if add:
                    msg.add(r.name, RECORD_TTL, "TXT", rdata)
                else:
                    msg.delete(r.name, "TXT", rdata)
            verb = "add" if add else "delete"
            what = ", ".join(str(r) for r in recs)
            try:
                response = await dns.asyncquery.tcp(
                    msg, await self._server(), timeout=self.timeout, port=self.port
                )
            except dns.tsig.PeerError as e:
                raise Dns01Error(
                    f"DNS server {self._where()} rejected TSIG key {self.key.name!r}"
                    f" ({type(e).__name__}: {e}) for the update ({verb} {what})"
                ) from None
            except (OSError, dns.exception.DNSException) as e:
                raise Dns01Error(
                    f"DNS update ({verb} {what}) to {self._where()} failed: {e}"
                ) from None
            rcode = response.rcode()
            if rcode != dns.rcode.NOERROR:
                raise Dns01Error(
                    f"DNS server {self._where()} refused the update ({verb} {what}) in zone"
                    f" {zone}: {dns.rcode.to_text(rcode)}"
                )
            log.debug("dns-01: %s %s in zone %s at %s", verb, what, zone, self._where())

    async def authoritative_servers(self, zone: dns.name.Name) -> list[tuple[str, int]]:
        """The update server plus every address of the zone's NS set (on our port)."""
        servers = [(await self._server(), self.port)]
        try:
            ns = await self._query(zone, "NS", servers[0])
        except (OSError, dns.exception.DNSException):
            return servers
        targets = [rd.target for rrset in ns.answer for rd in rrset if rrset.rdtype == 2]
        for target in targets:
            for address in await self._addresses(target, servers[0]):
                if (address, self.port) not in servers:
                    servers.append((address, self.port))
        return servers

    async def _addresses(self, target: dns.name.Name, server: tuple[str, int]) -> list[str]:
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                response = await self._query(target, rdtype, server)
            except (OSError, dns.exception.DNSException):
                continue
            found += [
                rd.address for rrset in response.answer for rd in rrset if hasattr(rd, "address")
            ]
        if found:
            return found
        try:  # an NS outside the zone: ask the system resolver
            answer = await dns.asyncresolver.resolve(target, "A", lifetime=self.timeout)
        except dns.exception.DNSException:
            return []
        return [rd.address for rd in answer]

    async def _query(
        self, name: dns.name.Name | str, rdtype: str, server: tuple[str, int]
    ) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        response, _ = await dns.asyncquery.udp_with_fallback(
            query, server[0], timeout=min(self.timeout, 2.0), port=server[1]
        )
        return response

    async def _visible_at(self, record: TxtRecord, server: tuple[str, int]) -> str | None:
        """None when the value is visible at the server, else what was seen instead."""
        try:
            response = await self._query(record.name, "TXT", server)
        except (OSError, dns.exception.DNSException) as e:
            return f"no answer: {e or type(e).__name__}"
        if response.rcode() != dns.rcode.NOERROR:
            return dns.rcode.to_text(response.rcode())
        values = {
            b"".join(rd.strings).decode("ascii", "replace")
            for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.TXT
            for rd in rrset
        }
        return None if record.value in values else f"{len(values)} other value(s)"

    async def wait_visible(
        self, records: Sequence[TxtRecord], limit: float, *, poll: float = 0.2
    ) -> None:
        """Until every record is answered by every authoritative server of its zone, or
        Dns01Error after `limit` seconds naming what was missing where."""
        deadline = time.monotonic() + limit
        checks: list[tuple[TxtRecord, tuple[str, int]]] = []
        for record in records:
            zone = await self.zone_for(record.name)
            checks += [(record, s) for s in await self.authoritative_servers(zone)]
        missing: list[str] = []
        delay = poll
        while True:
            results = await asyncio.gather(*(self._visible_at(r, s) for r, s in checks))
            missing = [
                f"{r} at {s[0]}:{s[1]} ({seen})"
                for (r, s), seen in zip(checks, results, strict=True)
                if seen is not None
            ]
            if not missing:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Dns01Error(
                    f"DNS-01 records not visible after {limit:g}s (acme.dns.propagation_timeout):"
                    f" {'; '.join(missing)}"
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)


def records_for(pairs: Iterable[tuple[str, str]]) -> list[TxtRecord]:
    """TXT records for (host, validation) pairs, duplicates dropped, order kept."""
    seen: dict[TxtRecord, None] = {}
    for host, value in pairs:
        seen.setdefault(TxtRecord(challenge_record_name(host), value), None)
    return list(seen)
