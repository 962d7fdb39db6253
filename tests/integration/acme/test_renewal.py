"""Renewal against real Pebble with short-lived certificates: on schedule, while Pebble is
down, with two proxies on one data_dir, and across a restart of the task (SIGHUP)."""

from __future__ import annotations

import asyncio
import logging

import dns.asyncquery
import dns.message

from certs.acme_manager import AcmeManager
from certs.cache import CertificateCache
from certs.keys import chain_to_pem, private_key_to_pem
from certs.storage import Storage
from tests.unit.certs.factory import make_ca, make_leaf

from .conftest import client_context, connect
from .helpers import acme_spec, context_factory, installed, maintaining, verify_chain, wait_for

VALIDITY = 30  # seconds; with ratio 0.8 a certificate is due about 6 s after it was issued


async def _renewed(cache: CertificateCache, name: str, serial: int, limit: float):
    return await wait_for(
        lambda: (i := cache.get(name)) is not None and i.info.serial != serial and i,
        limit,
        f"a renewed certificate for {name}",
    )


async def test_renewed_on_its_own_new_handshakes_get_it_open_connections_keep_theirs(
    acme_setup, echo_server, tmp_path
):
    s = await acme_setup(validity=VALIDITY, ratio=0.8)
    c, cache, manager = s.c, s.cache, s.manager
    root = c.root_pem()

    async with maintaining(manager, [acme_spec("app.test")], cache):
        first = await installed(cache, "app.test")
        assert (first.info.not_after - first.info.not_before).total_seconds() <= VALIDITY + 1
        server = await echo_server(cache)
        old = await connect(server.port, "app.test", client_context(root))
        assert old.leaf.serial_number == first.info.serial

        renewed = await _renewed(cache, "app.test", first.info.serial, 3 * VALIDITY)
        new = await connect(server.port, "app.test", client_context(root))
        assert new.leaf.serial_number == renewed.info.serial != first.info.serial
        assert await old.echo(b"still here\n") == b"still here\n"
        await old.close()
        await new.close()
    storage = Storage(tmp_path / "data")
    assert storage.previous_cert_path("app.test").exists()  # the replaced version is kept
    verify_chain(storage.cert_path("app.test").read_bytes(), root, ["app.test"])


async def test_pebble_down_while_due_old_cert_served_retries_logged_then_renewed(
    acme_setup, echo_server, caplog
):
    caplog.set_level(logging.INFO, logger="tlsproxy.certs.acme")
    s = await acme_setup(validity=VALIDITY, ratio=0.8, retry_base=0.5, retry_cap=2.0)
    c, cache, manager = s.c, s.cache, s.manager
    spec = acme_spec("app.test")

    async with maintaining(manager, [spec], cache):
        first = await installed(cache, "app.test")
        c.stop_pebble()
        await wait_for(
            lambda: "retry after 2 failed" in manager.status([spec])[0].renewal_reason,
            3 * VALIDITY,
            "two failed renewal attempts",
        )
        failures = [r.getMessage() for r in caplog.records if "failed (attempt" in r.getMessage()]
        assert len(failures) >= 2
        assert all("cannot reach ACME server" in m for m in failures), failures
        assert all(f"still serving serial {first.info.serial:x}" in m for m in failures)
        assert cache.get("app.test").info.serial == first.info.serial
        server = await echo_server(cache)
        client = await connect(server.port, "app.test", client_context(c.root_pem_cached))
        assert client.leaf.serial_number == first.info.serial
        await client.close()

        c.start_pebble()
        renewed = await _renewed(cache, "app.test", first.info.serial, VALIDITY)
        verify_chain(renewed.cert_file.read_bytes(), c.root_pem(), ["app.test"])
    [status] = manager.status([spec])
    assert status.last_error is None


async def test_two_managers_on_one_data_dir_order_once(acme_setup, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tlsproxy.certs.acme")
    s = await acme_setup(lock_busy_delay=0.1)
    caches = [s.cache, CertificateCache()]
    second = AcmeManager(
        tmp_path / "data", s.c.settings(), context_factory, s.responder, lock_busy_delay=0.1
    )
    managers = [s.manager, second]
    spec = acme_spec("app.test", "www.app.test")

    async with maintaining(managers[0], [spec], caches[0]):
        async with maintaining(managers[1], [spec], caches[1]):
            a = await installed(caches[0], "app.test")
            b = await installed(caches[1], "app.test")
    assert a.info.serial == b.info.serial
    orders = [r for r in caplog.records if r.getMessage().startswith("ordering a certificate")]
    assert len(orders) == 1


class _CancelOn(logging.Handler):
    """Cancels a task from inside the event loop the moment a log line containing `text` is
    emitted: the cancellation lands at the very next await of that code path."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.task: asyncio.Task | None = None
        self.fired = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.task is not None and self.text in record.getMessage() and not self.fired:
            self.fired += 1
            self.task.cancel()


async def test_task_cancelled_mid_order_gives_everything_back_and_restarts_as_on_reload(
    acme_setup,
):
    s = await acme_setup()
    c, responder, cache, manager = s.c, s.responder, s.cache, s.manager
    # api.test by HTTP-01 (a token in the responder), *.api.test by DNS-01 (a TXT record).
    spec = acme_spec("api.test", "*.api.test")
    logger = logging.getLogger("tlsproxy.certs.acme")
    for text in ("dns-01: add", "ACME order for"):
        canceller = _CancelOn(text)
        logger.addHandler(canceller)
        old_level = logger.level
        logger.setLevel(logging.DEBUG)
        try:
            canceller.task = asyncio.create_task(manager.maintain([spec], lambda: cache))
            await asyncio.gather(canceller.task, return_exceptions=True)
        finally:
            logger.removeHandler(canceller)
            logger.setLevel(old_level)
        assert canceller.fired == 1 and canceller.task.cancelled()
        assert len(responder) == 0  # the HTTP-01 token is withdrawn
        query = dns.message.make_query("_acme-challenge.api.test.", "TXT")
        answer = await dns.asyncquery.tcp(query, "127.0.0.1", port=c.dns_port, timeout=5)
        assert answer.answer == [], f"TXT left behind after cancel at {text!r}"
        assert cache.get("api.test") is None
    # The storage lock is free again and the next task finishes the job.
    async with maintaining(manager, [spec], cache):
        await installed(cache, "api.test", limit=10)


async def test_a_stored_certificate_from_another_ca_is_served_then_replaced_at_once(
    acme_setup, tmp_path
):
    # As after switching a site from tls = "internal" to tls = "acme".
    ca = make_ca("local CA")
    leaf, key = make_leaf(ca, ["app.test"])
    storage = Storage(tmp_path / "data")
    storage.save_certificate("app.test", chain_to_pem([leaf, ca[0]]), private_key_to_pem(key))
    s = await acme_setup()
    spec = acme_spec("app.test")

    async with maintaining(s.manager, [spec], s.cache):
        renewed = await _renewed(s.cache, "app.test", leaf.serial_number, 10)
    assert "Pebble" in renewed.info.issuer
    [status] = s.manager.status([spec])
    assert status.issuer == renewed.info.issuer and "1/3 of the lifetime" in status.renewal_reason
