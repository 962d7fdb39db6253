"""Issuance against real Pebble and BIND 9: HTTP-01, DNS-01 with a wildcard, bad nonces,
the account across a Pebble restart, and a challenge that fails."""

from __future__ import annotations

import asyncio
import logging
import stat
import threading
import time

import dns.asyncquery
import dns.message

from certs.acme_manager import AcmeManager
from certs.acme_state import AcmeState
from certs.cache import CertificateCache
from certs.challenges.http01 import Http01Responder
from certs.issuers.acme import AcmeIssuer, directory_slug
from certs.keys import cert_info, chain_to_pem, load_certificates
from certs.storage import Storage
from tests.unit.certs.factory import make_ca

from .conftest import client_context, connect
from .helpers import (
    acme_spec,
    assert_idle,
    context_factory,
    installed,
    maintaining,
    verify_chain,
    wait_for,
)


async def test_http01_two_names_served_and_chained_to_pebble_root(
    acme_setup, echo_server, tmp_path
):
    s = await acme_setup()
    c, responder, cache, manager = s.c, s.responder, s.cache, s.manager
    spec = acme_spec("app.test", "www.app.test")

    async with maintaining(manager, [spec], cache):
        cert = await installed(cache, "app.test")
        assert set(cert.info.hosts) == {"app.test", "www.app.test"}
        verify_chain(cert.cert_file.read_bytes(), c.root_pem(), ["app.test", "www.app.test"])
        # A real handshake: the client trusts only Pebble's root and checks the name.
        server = await echo_server(cache)
        for name in ("app.test", "www.app.test"):
            client = await connect(server.port, name, client_context(c.root_pem()))
            assert client.leaf.serial_number == cert.info.serial
            assert await client.echo() == b"ping\n"
            await client.close()
        # Pebble has no ARI (no renewalInfo): asked once, then the 1/3 rule decides.
        storage = Storage(tmp_path / "data")

        def ari_recorded() -> AcmeState | None:
            state = AcmeState.from_dict(storage.load_state("app.test"))
            return state if state.ari_serial == cert.info.serial else None

        state = await wait_for(ari_recorded, 5, "the ARI answer recorded")
        assert state.ari_renewal_at is None and state.ari_next_check > time.time() + 3600
        # Nothing due for years: the task sleeps; it neither rewrites its state nor asks the
        # CA anything (Pebble logs every request) in a loop.
        await assert_idle(storage.state_path("app.test"), c.pebble_log)
    assert len(responder) == 0  # every token withdrawn
    key = Storage(tmp_path / "data").key_path("app.test")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    [status] = manager.status([spec])
    assert status.last_error is None and status.not_after == cert.info.not_after
    assert status.next_renewal is not None and "1/3" in status.renewal_reason


async def _txt_at(c, name: str) -> tuple[int, set[str]]:
    query = dns.message.make_query(name, "TXT")
    response = await dns.asyncquery.tcp(query, "127.0.0.1", port=c.dns_port, timeout=5)
    values = {b"".join(rd.strings).decode() for rrset in response.answer for rd in rrset}
    return response.rcode(), values


async def test_dns01_wildcard_and_apex_through_bind_records_removed(
    acme_setup, echo_server, caplog
):
    caplog.set_level(logging.DEBUG, logger="tlsproxy.certs.acme")
    # No HTTP server at all: an http-01 attempt could not succeed.
    s = await acme_setup(serve_http01=False)
    c, cache, manager = s.c, s.cache, s.manager
    spec = acme_spec("app.test", "*.app.test", challenge="dns-01")

    async with maintaining(manager, [spec], cache):
        cert = await installed(cache, "app.test")
    verify_chain(cert.cert_file.read_bytes(), c.root_pem(), ["app.test", "foo.app.test"])
    server = await echo_server(cache)
    client = await connect(server.port, "foo.app.test", client_context(c.root_pem()))
    assert client.leaf.serial_number == cert.info.serial
    await client.close()
    # Two values lived at one name (apex + wildcard), each added on its own, both deleted.
    added = [r.getMessage() for r in caplog.records if "dns-01: add" in r.getMessage()]
    assert len(added) == 2 and all("_acme-challenge.app.test." in m for m in added)
    rcode, values = await _txt_at(c, "_acme-challenge.app.test.")
    assert values == set(), f"TXT records left behind: {values} (rcode {rcode})"


async def test_wildcard_uses_dns01_while_the_other_name_uses_http01(acme_setup, caplog):
    caplog.set_level(logging.INFO, logger="tlsproxy.certs.acme")
    s = await acme_setup()
    c, cache, manager = s.c, s.cache, s.manager
    spec = acme_spec("api.test", "*.api.test")  # default challenge: http-01

    async with maintaining(manager, [spec], cache):
        await installed(cache, "api.test")
    assert any(
        "api.test http-01" in r.getMessage() and "*.api.test dns-01" in r.getMessage()
        for r in caplog.records
    )
    assert (await _txt_at(c, "_acme-challenge.api.test."))[1] == set()


async def test_bad_nonces_are_retried_until_issuance_succeeds(acme_setup, caplog):
    caplog.set_level(logging.DEBUG, logger="tlsproxy.certs.acme")
    s = await acme_setup(pebble_env={"PEBBLE_WFE_NONCEREJECT": "40"})
    cache, manager = s.cache, s.manager

    async with maintaining(manager, [acme_spec("app.test", "www.app.test")], cache):
        await installed(cache, "app.test")
    retried = [r for r in caplog.records if "retried (badNonce" in r.getMessage()]
    assert retried, "Pebble rejected no nonce: the test proved nothing"
    failures = [r for r in caplog.records if "failed (attempt" in r.getMessage()]
    assert failures == []


async def test_account_key_kept_and_account_registered_again_after_pebble_restart(
    acme_setup, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="tlsproxy.certs.acme")
    s = await acme_setup()
    c = s.c
    storage = Storage(tmp_path / "data")
    issuer = AcmeIssuer(c.settings(), storage, s.responder)
    stop = threading.Event()

    first = await issuer.issue(["app.test"], challenge=None, stop=stop)
    key_file = storage.path("acme", directory_slug(c.directory), "account.key")
    key_pem = key_file.read_bytes()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    c.stop_pebble()  # Pebble forgets every account and changes its root
    c.start_pebble()
    second = await issuer.issue(["app.test"], challenge=None, stop=stop)

    assert key_file.read_bytes() == key_pem
    assert any("no longer knows our account" in r.getMessage() for r in caplog.records)
    verify_chain(second.chain_pem, c.root_pem(), ["app.test"])
    serials = {cert_info(load_certificates(x.chain_pem)[0]).serial for x in (first, second)}
    assert len(serials) == 2


async def test_failed_http01_challenge_is_reported_in_status(acme_setup):
    s = await acme_setup(serve_http01=False)  # nothing listens on Pebble's httpPort
    cache, manager = s.cache, s.manager
    spec = acme_spec("other.test")

    async with maintaining(manager, [spec], cache):
        await wait_for(lambda: manager.status([spec])[0].last_error, 20, "a recorded failure")
        # Backing off (a minute): asleep, not retrying in a loop.
        await assert_idle(manager.storage.state_path("other.test"), s.c.pebble_log)
    [status] = manager.status([spec])
    assert "other.test" in status.last_error
    assert "urn:ietf:params:acme:error:connection" in status.last_error
    assert "connection refused" in status.last_error
    assert status.not_after is None and "retry after 1 failed attempt" in status.renewal_reason
    assert cache.get("other.test") is None  # nothing served for it, not another name's cert


async def test_dns_server_refusing_the_update_is_reported(components, tmp_path):
    c = components()
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_text(
        'key "acme-update" {\n\talgorithm hmac-sha256;\n'
        '\tsecret "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";\n};\n'
    )
    dns_settings = c.settings().dns
    settings = c.settings(
        dns=type(dns_settings)(**{**dns_settings.__dict__, "tsig_key_file": wrong_key})
    )
    manager = AcmeManager(tmp_path / "data", settings, context_factory, Http01Responder())
    spec = acme_spec("app.test", challenge="dns-01")

    async with maintaining(manager, [spec], CertificateCache()):
        await wait_for(lambda: manager.status([spec])[0].last_error, 20, "a recorded failure")
    error = manager.status([spec])[0].last_error
    assert f"127.0.0.1:{c.dns_port} rejected TSIG key" in error and "update" in error, error


EAB_KID = "kid-1"
EAB_KEY = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
EAB_PEBBLE = {"externalAccountBindingRequired": True, "externalAccountMACKeys": {EAB_KID: EAB_KEY}}


async def test_external_account_binding(acme_setup):
    s = await acme_setup(
        pebble_config=EAB_PEBBLE, settings={"eab_kid": EAB_KID, "eab_hmac_key": EAB_KEY}
    )
    async with maintaining(s.manager, [acme_spec("app.test")], s.cache):
        cert = await installed(s.cache, "app.test")
    verify_chain(cert.cert_file.read_bytes(), s.c.root_pem(), ["app.test"])


async def test_missing_external_account_binding_is_a_clear_error(acme_setup):
    s = await acme_setup(pebble_config=EAB_PEBBLE)
    spec = acme_spec("app.test")
    async with maintaining(s.manager, [spec], s.cache):
        await wait_for(lambda: s.manager.status([spec])[0].last_error, 20, "a recorded failure")
    error = s.manager.status([spec])[0].last_error
    assert "requires external account binding" in error and "acme.eab_kid" in error


async def test_two_sites_ordered_together_share_one_account(acme_setup, caplog):
    caplog.set_level(logging.INFO, logger="tlsproxy.certs.acme")
    s = await acme_setup()
    specs = [acme_spec("app.test"), acme_spec("*.api.test")]
    async with maintaining(s.manager, specs, s.cache):
        await installed(s.cache, "app.test")
        await installed(s.cache, "*.api.test")
    registered = [r for r in caplog.records if "account registered" in r.getMessage()]
    assert len(registered) == 1


async def test_wrong_ca_bundle_is_a_clear_error(acme_setup, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(chain_to_pem([make_ca("not Pebble's CA")[0]]))
    s = await acme_setup(settings={"ca_bundle": other_ca})
    spec = acme_spec("app.test")
    async with maintaining(s.manager, [spec], s.cache):
        await wait_for(lambda: s.manager.status([spec])[0].last_error, 20, "a recorded failure")
    error = s.manager.status([spec])[0].last_error
    assert "cannot verify the HTTPS certificate of ACME server" in error
    assert "acme.ca_bundle" in error and "CERTIFICATE_VERIFY_FAILED" in error


async def test_authorizations_the_ca_still_holds_are_not_answered_again(acme_setup, caplog):
    caplog.set_level(logging.INFO, logger="tlsproxy.certs.acme")
    s = await acme_setup(pebble_env={"PEBBLE_AUTHZREUSE": "100"})
    stop = threading.Event()
    await s.manager.issuer.issue(["app.test", "www.app.test"], challenge=None, stop=stop)
    second = await s.manager.issuer.issue(["app.test", "www.app.test"], challenge=None, stop=stop)
    verify_chain(second.chain_pem, s.c.root_pem(), ["app.test", "www.app.test"])
    orders = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ACME order")]
    assert "2 challenge(s) to answer" in orders[0]
    assert (
        "0 challenge(s) to answer" in orders[1] and "2 authorization(s) already valid" in orders[1]
    )


async def test_event_loop_stays_responsive_while_orders_run(acme_setup):
    # Pebble pauses 0, 1 or 2 whole seconds before each validation: orders stay in flight.
    s = await acme_setup(pebble_env={"PEBBLE_VA_NOSLEEP": "0", "PEBBLE_VA_SLEEPTIME": "3"})
    specs = [
        acme_spec("app.test", "www.app.test"),
        acme_spec("api.test", "*.api.test"),
        acme_spec("other.test", challenge="dns-01"),
    ]
    loop = asyncio.get_running_loop()
    lags: list[float] = []

    async def sample() -> None:
        while True:
            start = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - start - 0.005)

    sampler = asyncio.create_task(sample())
    try:
        async with maintaining(s.manager, specs, s.cache):
            for spec in specs:
                await installed(s.cache, spec.name, limit=30)
    finally:
        sampler.cancel()
    assert lags
    # A blocking ACME call on the loop would stall it for a whole validation (seconds here);
    # the bound leaves room for a busy 2-core machine.
    assert max(lags) < 0.25, f"event loop blocked for {max(lags) * 1000:.0f} ms"
