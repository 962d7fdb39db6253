"""maintain() on a real clock with leaves that live seconds: renewal happens during the test."""

import asyncio
import contextlib
import logging
import time
from datetime import timedelta

import pytest

from certs.errors import IssuanceError
from certs.issuers.local_ca import LocalCA
from certs.manager import CertificateManager
from certs.models import CertSpec
from tests.unit.certs.factory import server_context

from .conftest import client_context, connect

LOCAL = CertSpec("localhost", ("localhost", "app.test"), "internal")


@contextlib.asynccontextmanager
async def maintaining(manager, server):
    task = asyncio.create_task(manager.maintain(server.current))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


async def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_renewal_swaps_leaf_for_new_handshakes_only(tmp_path, echo_server, caplog):
    caplog.set_level(logging.INFO, logger="tlsproxy.certs")
    manager = CertificateManager(
        tmp_path / "data", server_context, leaf_lifetime=timedelta(seconds=3), jitter_fraction=0
    )
    cache = manager.load([LOCAL], "localhost")
    server = await echo_server(cache)
    trust = client_context(manager.local_ca_root_pem())
    before = await connect(server.port, "localhost", trust)
    first_serial = before.leaf.serial_number
    first_pem = manager.storage.cert_path("localhost").read_bytes()
    async with maintaining(manager, server):
        # 3 s leaf, renewed when 1/3 remains: about 2 s after issuance (and every 2 s after)
        await wait_for(
            lambda: cache.get("localhost").info.serial != first_serial, 6, "a renewed leaf"
        )
        assert manager.storage.previous_cert_path("localhost").read_bytes() == first_pem
        after = await connect(server.port, "app.test", trust)
        assert after.leaf.serial_number != first_serial
        assert after.leaf.not_valid_after_utc > before.leaf.not_valid_after_utc
        # the connection opened before the renewal still works on its old certificate
        assert await before.echo(b"still here\n") == b"still here\n"
        assert await after.echo() == b"ping\n"
        await before.close()
        await after.close()
    assert any("issued certificate for localhost" in r.getMessage() for r in caplog.records)


class FlakyCA:
    """A CA that is down for the first `failures` orders (like an ACME server restarting)."""

    name = "flaky CA"

    def __init__(self, ca: LocalCA, failures: int) -> None:
        self.ca, self.failures, self.calls = ca, failures, 0

    def issue(self, spec, csr_pem):
        self.calls += 1
        if self.calls <= self.failures:
            raise IssuanceError(f"CA unavailable (order {self.calls})")
        return self.ca.issue(spec, csr_pem)


async def test_failures_are_retried_with_backoff_and_recorded(tmp_path, echo_server, caplog):
    manager = CertificateManager(tmp_path / "data", server_context, retry_base=0.2, retry_cap=0.5)
    flaky = FlakyCA(LocalCA.load_or_create(manager.storage), failures=3)
    manager.set_issuer("acme", flaky)
    spec = CertSpec("acme.test", ("acme.test",), "acme")
    cache = manager.load([spec], None)
    assert cache.get("acme.test") is None
    server = await echo_server(cache)
    async with maintaining(manager, server):
        await wait_for(lambda: flaky.calls >= 2, 5, "a retry")
        status = manager.status([spec])[0]
        assert status.last_error.startswith("CA unavailable (order ")
        assert status.renewal_reason.startswith("retry after ")
        await wait_for(lambda: cache.get("acme.test") is not None, 5, "the certificate")
    assert flaky.calls == 4
    client = await connect(server.port, "acme.test", client_context(manager.local_ca_root_pem()))
    await client.close()
    status = manager.status([spec])[0]
    assert status.last_error is None and status.renewal_reason == "2/3 of lifetime"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("CA unavailable" in w for w in warnings) == 3


async def test_reload_wakes_maintenance(tmp_path, echo_server):
    manager = CertificateManager(tmp_path / "data", server_context, check_interval=3600)
    manager.set_issuer("acme", LocalCA.load_or_create(manager.storage))
    server = await echo_server(manager.load([LOCAL], None))
    async with maintaining(manager, server):
        await asyncio.sleep(0.1)  # let it go to sleep for an hour
        spec = CertSpec("new.test", ("new.test",), "acme")
        server.cache = await asyncio.to_thread(manager.load, [LOCAL, spec], None)
        await wait_for(lambda: server.cache.get("new.test") is not None, 5, "the new site")


async def test_cancel_stops_cleanly(tmp_path, echo_server):
    manager = CertificateManager(tmp_path / "data", server_context)
    server = await echo_server(manager.load([LOCAL], None))
    task = asyncio.create_task(manager.maintain(server.current))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)


async def test_restarted_maintenance_still_wakes(tmp_path, echo_server):
    """A reload that starts a new maintain() before the old one has finished cancelling."""
    manager = CertificateManager(tmp_path / "data", server_context, check_interval=3600)
    manager.set_issuer("acme", LocalCA.load_or_create(manager.storage))
    server = await echo_server(manager.load([LOCAL], None))
    old = asyncio.create_task(manager.maintain(server.current))
    await asyncio.sleep(0.1)
    async with maintaining(manager, server):
        old.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(old, 2)
        await asyncio.sleep(0.1)
        spec = CertSpec("new.test", ("new.test",), "acme")
        server.cache = await asyncio.to_thread(manager.load, [LOCAL, spec], None)
        await wait_for(lambda: server.cache.get("new.test") is not None, 5, "the new site")
