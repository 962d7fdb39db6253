"""Shared steps of the ACME integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from certs.acme_manager import AcmeManager
from certs.cache import CertificateCache
from certs.models import CertSpec, Installed


def context_factory(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def pebble_orders(log: Path) -> int:
    """How many orders Pebble created, read from its log: it prints `Added order "ID" to the
    db` once for every new-order request it accepts, whether or not that order is ever
    validated or finalized (an order whose client died half-way counts too). Counted over the
    whole file: a Pebble restarted onto the same log file adds to the count."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return text.count("Added order ")


def pebble_validations(log: Path, name: str) -> int:
    """How many challenges for `name` Pebble set out to validate, from its log (`Pulled a task
    from the Tasks queue: ... Value:"NAME"`, once per challenge a client asked it to check,
    however many perspectives it then validates from)."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return len(
        re.findall(rf'Pulled a task from the Tasks queue: .*Value:"{re.escape(name)}"', text)
    )


def acme_spec(*hosts: str, challenge: str | None = None) -> CertSpec:
    return CertSpec(name=hosts[0], hosts=tuple(hosts), source="acme", challenge=challenge)


async def wait_for(
    predicate: Callable[[], object], limit: float, what: str, interval: float = 0.05
) -> object:
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(interval)


async def installed(cache: CertificateCache, name: str, limit: float = 20.0) -> Installed:
    found = await wait_for(lambda: cache.get(name), limit, f"a certificate for {name}")
    assert isinstance(found, Installed)
    return found


@contextlib.asynccontextmanager
async def maintaining(
    manager: AcmeManager, specs: list[CertSpec], cache: CertificateCache
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(manager.maintain(specs, lambda: cache))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def verify_chain(chain_pem: bytes, root_pem: bytes, names: list[str]) -> None:
    """The chain verifies against `root_pem` for every name (cryptography's path builder)."""
    certs = x509.load_pem_x509_certificates(chain_pem)
    store = Store(x509.load_pem_x509_certificates(root_pem))
    for name in names:
        verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))
        verifier.verify(certs[0], certs[1:])


def _activity(state_file: Path, pebble_log: Path) -> tuple[int, int]:
    return state_file.stat().st_mtime_ns, pebble_log.read_text().count(" -> calling handler")


async def assert_idle(state_file: Path, pebble_log: Path, seconds: float = 0.5) -> None:
    """Nothing due: over `seconds`, no write of the state and no request to Pebble (it logs
    every request), i.e. the task sleeps rather than spins."""
    before = _activity(state_file, pebble_log)
    await asyncio.sleep(seconds)
    after = _activity(state_file, pebble_log)
    assert after[0] == before[0], "state rewritten while nothing was due"
    assert after[1] == before[1], f"{after[1] - before[1]} request(s) to the CA while idle"
