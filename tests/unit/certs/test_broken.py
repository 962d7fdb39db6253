"""Broken certificates on demand (certs.broken, certs.issuers.broken and the manager's handling):
each kind is wrong in exactly one way, is never renewed or repaired, and is kept apart from the
site's good certificate."""

from __future__ import annotations

import asyncio
import ssl
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from certs.broken import BROKEN_KINDS, storage_name, wrong_host
from certs.cache import CertificateCache
from certs.crypto_worker import _decode_spec, _encode
from certs.issuers.local_ca import issued_by as signed_by
from certs.keys import dns_names, load_certificates
from certs.manager import CertificateManager
from certs.models import CertSpec

from .factory import NOW, server_context

HOSTS = ("broken.test", "www.broken.test")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now.timestamp()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def manager(tmp_path: Path, clock: Clock) -> CertificateManager:
    return CertificateManager(tmp_path / "data", server_context, clock=clock, jitter_fraction=0)


def spec(kind: str | None, hosts: tuple[str, ...] = HOSTS) -> CertSpec:
    return CertSpec(hosts[0], hosts, "internal", broken=kind)


def served_chain(cache: CertificateCache, host: str = HOSTS[0]) -> list[x509.Certificate]:
    installed = cache.lookup(host)
    assert installed is not None
    return load_certificates(installed.cert_file.read_bytes())


def local_ca(manager: CertificateManager) -> tuple[x509.Certificate, x509.Certificate]:
    files = manager.storage.ca_files()
    return (
        x509.load_pem_x509_certificate(files.root_cert.read_bytes()),
        x509.load_pem_x509_certificate(files.intermediate_cert.read_bytes()),
    )


def valid_at_now(cert: x509.Certificate) -> bool:
    return cert.not_valid_before_utc <= NOW < cert.not_valid_after_utc


# -- the facts of each kind ----------------------------------------------------------------


def test_expired_is_a_local_ca_leaf_for_the_hosts_that_ended_yesterday(manager):
    leaf, intermediate = served_chain(manager.load([spec("expired")], None))
    assert intermediate == local_ca(manager)[1] and signed_by(leaf, intermediate)
    assert dns_names(leaf) == HOSTS
    assert leaf.not_valid_after_utc == NOW - timedelta(days=1)
    assert leaf.not_valid_before_utc == NOW - timedelta(days=30)


def test_not_yet_valid_is_a_local_ca_leaf_for_the_hosts_from_next_month(manager):
    leaf, intermediate = served_chain(manager.load([spec("not-yet-valid")], None))
    assert intermediate == local_ca(manager)[1] and signed_by(leaf, intermediate)
    assert dns_names(leaf) == HOSTS
    assert leaf.not_valid_before_utc == NOW + timedelta(days=30)
    assert leaf.not_valid_after_utc > leaf.not_valid_before_utc


def test_wrong_host_is_a_valid_local_ca_leaf_for_another_name_served_for_the_hosts(manager):
    cache = manager.load([spec("wrong-host")], None)
    leaf, intermediate = served_chain(cache)
    assert served_chain(cache, "www.broken.test")[0] == leaf
    assert intermediate == local_ca(manager)[1] and signed_by(leaf, intermediate)
    assert dns_names(leaf) == ("wrong-host.invalid",)
    assert valid_at_now(leaf)


def test_self_signed_is_signed_by_its_own_key_for_the_hosts(manager):
    (leaf,) = served_chain(manager.load([spec("self-signed")], None))
    assert leaf.issuer == leaf.subject and signed_by(leaf, leaf)
    assert not signed_by(leaf, local_ca(manager)[1])
    assert dns_names(leaf) == HOSTS and valid_at_now(leaf)
    basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False  # a leaf, as the local CA makes them, not a root


def test_untrusted_root_is_a_valid_chain_from_another_root_kept_in_data_dir(manager):
    leaf, intermediate, root = served_chain(manager.load([spec("untrusted-root")], None))
    local_root, local_intermediate = local_ca(manager)
    assert signed_by(leaf, intermediate) and signed_by(intermediate, root) and signed_by(root, root)
    assert root != local_root and intermediate != local_intermediate
    assert root.subject.rfc4514_string().startswith("CN=tlsproxy untrusted test root ")
    kept = manager.storage.root / "broken/untrusted-ca/root.pem"
    assert x509.load_pem_x509_certificate(kept.read_bytes()) == root
    assert not (manager.storage.root / "broken/untrusted-ca/root.key").exists()
    assert dns_names(leaf) == HOSTS and valid_at_now(leaf)


def test_incomplete_chain_is_a_valid_local_ca_leaf_served_alone(manager):
    (leaf,) = served_chain(manager.load([spec("incomplete-chain")], None))
    assert signed_by(leaf, local_ca(manager)[1])
    assert dns_names(leaf) == HOSTS and valid_at_now(leaf)


def test_valid_kinds_outlive_a_short_leaf_lifetime(tmp_path, clock):
    # Never renewed: a 10 s local CA lifetime must not turn them into expired ones.
    manager = CertificateManager(
        tmp_path / "data", server_context, clock=clock, leaf_lifetime=timedelta(seconds=10)
    )
    for kind in ("wrong-host", "self-signed", "untrusted-root", "incomplete-chain"):
        leaf = served_chain(manager.load([spec(kind)], None))[0]
        assert leaf.not_valid_after_utc - NOW >= timedelta(days=89), kind


# -- what a client trusting the local CA says (OpenSSL through Python's ssl, in memory) ----


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    """A TLS handshake over memory BIOs; raises what the client raises."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    tls_client = client.wrap_bio(c_in, c_out, server_hostname=name)
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(20):
        if not client_done:
            try:
                tls_client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not server_done:
            try:
                tls_server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                server_done = True  # the client's alert; the client's error is the point
        c_in.write(s_out.read())
        if client_done and server_done:
            return
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [
        ("expired", 10, "certificate has expired"),
        ("not-yet-valid", 9, "certificate is not yet valid"),
        ("wrong-host", 62, "Hostname mismatch"),
        ("self-signed", 18, "self-signed certificate"),
        ("untrusted-root", 19, "self-signed certificate in certificate chain"),
        ("incomplete-chain", 20, "unable to get local issuer certificate"),
    ],
)
def test_a_client_trusting_the_local_ca_refuses_each_for_its_one_reason(
    tmp_path, kind, code, message
):
    # The real clock: OpenSSL checks dates against it.
    manager = CertificateManager(tmp_path / "data", server_context)
    cache = manager.load([spec(kind), spec(None, ("good.test",))], None)
    client = ssl.create_default_context(cafile=str(manager.storage.ca_files().root_cert))
    handshake(cache.lookup("good.test").context, client, "good.test")  # the same CA works
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        handshake(cache.lookup("www.broken.test").context, client, "www.broken.test")
    assert refused.value.verify_code == code
    assert refused.value.verify_message.startswith(message)


# -- how the manager treats them -----------------------------------------------------------


def test_never_renewed_nor_repaired_by_maintenance(manager, clock):
    specs = [spec(kind, (f"{kind}.test",)) for kind in BROKEN_KINDS]
    cache = manager.load(specs, None)
    before = {s.name: cache.get(s.name).info.serial for s in specs}
    clock.now = NOW + timedelta(days=20)
    asyncio.run(manager._maintain_once(lambda: cache))
    assert {s.name: cache.get(s.name).info.serial for s in specs} == before
    assert manager._next_delay(cache) == manager.check_interval


def test_stored_one_is_served_again_while_it_is_still_broken(manager, clock):
    first = manager.load([spec("expired")], None).get(HOSTS[0]).info.serial
    clock.now = NOW + timedelta(days=400)  # more expired, and the intermediate unchanged
    assert manager.load([spec("expired")], None).get(HOSTS[0]).info.serial == first


def test_one_that_is_no_longer_broken_is_made_again_at_load(manager, clock):
    first = manager.load([spec("not-yet-valid")], None).get(HOSTS[0]).info
    clock.now = first.not_before + timedelta(seconds=1)  # it would be valid now
    again = manager.load([spec("not-yet-valid")], None).get(HOSTS[0]).info
    assert again.serial != first.serial and clock.now < again.not_before


def test_made_again_for_new_hosts_and_a_new_local_ca(manager):
    first = manager.load([spec("incomplete-chain")], None).get(HOSTS[0]).info
    wider = spec("incomplete-chain", (*HOSTS, "more.broken.test"))
    second = manager.load([wider], None).get(HOSTS[0]).info
    assert second.serial != first.serial and "more.broken.test" in second.hosts
    for path in manager.storage.ca_files().__dict__.values():
        path.unlink()  # a new local CA: leaves from the old one would fail for another reason
    third = manager.load([wider], None).get(HOSTS[0]).info
    assert third.serial != second.serial
    assert third.issuer == local_ca(manager)[1].subject.rfc4514_string()


def test_the_good_certificate_is_kept_apart_and_served_again_when_broken_is_off(manager):
    good = manager.load([spec(None)], None).get(HOSTS[0]).info.serial
    expired = manager.load([spec("expired")], None).get(HOSTS[0]).info.serial
    assert expired != good
    assert manager.load([spec(None)], None).get(HOSTS[0]).info.serial == good
    assert manager.load([spec("expired")], None).get(HOSTS[0]).info.serial == expired
    assert manager.storage.cert_path(storage_name("expired", HOSTS[0])).exists()


def test_status_says_broken_and_never_renewed(manager):
    manager.load([spec("expired")], None)
    (status,) = manager.status([spec("expired")])
    assert status.renewal_reason == "broken=expired (for tests), never renewed"
    assert status.next_renewal is None and status.last_error is None
    assert status.not_after == NOW - timedelta(days=1)


def test_crypto_worker_carries_the_kind():
    assert _decode_spec(_encode(spec("wrong-host"))) == spec("wrong-host")


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        (("a.test",), "wrong-host.invalid"),
        (("wrong-host.invalid",), "x.wrong-host.invalid"),
        (("*.invalid", "x.wrong-host.invalid"), "x.x.wrong-host.invalid"),
        (("*.wrong-host.invalid", "*.invalid"), "x.x.wrong-host.invalid"),
    ],
)
def test_wrong_host_picks_a_name_no_host_matches(hosts, expected):
    assert wrong_host(hosts) == expected
