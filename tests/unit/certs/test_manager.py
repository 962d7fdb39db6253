import dataclasses
from datetime import timedelta

import pytest

from certs.errors import CertificateFileError
from certs.keys import chain_to_pem, private_key_to_pem
from certs.manager import CertificateManager
from certs.models import CertSpec

from .factory import NOW, make_ca, make_leaf, server_context, write_pair

LOCAL = CertSpec("localhost", ("localhost", "app.test"), "internal")
WILD = CertSpec("*.wild.test", ("*.wild.test", "wild.test"), "internal")


class Clock:
    def __init__(self):
        self.now = NOW

    def __call__(self):
        return self.now.timestamp()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def manager(tmp_path, clock):
    return CertificateManager(tmp_path / "data", server_context, clock=clock, jitter_fraction=0)


@pytest.fixture
def files_spec(tmp_path):
    ca = make_ca("files CA")
    cert, key = make_leaf(ca, ["files.test"])
    cert_file, key_file = write_pair(tmp_path, [cert, ca[0]], key)
    return CertSpec("files.test", ("files.test",), "files", cert_file, key_file)


def serial(cache, name):
    return cache.lookup(name).info.serial


def test_load_installs_every_spec_and_default(manager, files_spec):
    cache = manager.load([LOCAL, WILD, files_spec], "app.test")
    assert cache.lookup("APP.test.").spec_name == "localhost"
    assert cache.lookup("x.wild.test").spec_name == "*.wild.test"
    assert cache.lookup("files.test").spec_name == "files.test"
    assert cache.lookup("files.test").info.issuer == "CN=files CA"
    assert cache.lookup(None).spec_name == "localhost"  # default given by a host
    assert cache.lookup("x.y.wild.test").spec_name == "localhost"
    assert manager.load([LOCAL], None).lookup("unknown.test") is None


def test_internal_leaf_reused_until_due(manager, clock):
    first = serial(manager.load([LOCAL], None), "localhost")
    first_pem = manager.storage.cert_path("localhost").read_bytes()
    clock.now += timedelta(days=4)  # 7-day leaf: due after 4 2/3 days
    assert serial(manager.load([LOCAL], None), "localhost") == first
    clock.now += timedelta(hours=17)
    cache = manager.load([LOCAL], None)
    assert serial(cache, "localhost") != first
    assert manager.storage.previous_cert_path("localhost").read_bytes() == first_pem


def test_internal_reissued_when_hosts_change(manager):
    first = serial(manager.load([LOCAL], None), "localhost")
    grown = CertSpec("localhost", ("localhost", "app.test", "new.test"), "internal")
    cache = manager.load([grown], None)
    assert serial(cache, "new.test") != first
    assert cache.lookup("new.test").info.hosts == ("localhost", "app.test", "new.test")


def test_internal_reissued_when_ca_replaced(manager, tmp_path):
    first = serial(manager.load([LOCAL], None), "localhost")
    for f in (tmp_path / "data" / "ca").iterdir():
        f.unlink()
    second = manager.load([LOCAL], None)
    assert serial(second, "localhost") != first
    assert manager.local_ca_root_pem() == (tmp_path / "data" / "ca" / "root.pem").read_bytes()


def test_acme_served_from_storage_only(manager, clock):
    spec = CertSpec("acme.test", ("acme.test",), "acme")
    assert manager.load([spec], "acme.test").lookup("acme.test") is None
    cert, key = make_leaf(make_ca("some ACME CA"), ["acme.test"])
    manager.storage.save_certificate("acme.test", chain_to_pem([cert]), private_key_to_pem(key))
    assert manager.load([spec], None).lookup("acme.test").info.serial == cert.serial_number
    clock.now += timedelta(days=31)  # expired: not served
    assert manager.load([spec], None).lookup("acme.test") is None


def test_load_raises_file_errors(manager, files_spec, tmp_path):
    broken = CertSpec("b.test", ("b.test",), "files", tmp_path / "missing.crt", files_spec.key_file)
    with pytest.raises(CertificateFileError) as info:
        manager.load([LOCAL, broken], None)
    assert info.value.path == tmp_path / "missing.crt"


def test_validate_reads_only(manager, files_spec, tmp_path):
    manager.validate([LOCAL, files_spec])
    assert not (tmp_path / "data").exists()
    uncovered = dataclasses.replace(files_spec, hosts=("files.test", "more.test"))
    with pytest.raises(CertificateFileError, match=r"does not cover more\.test"):
        manager.validate([uncovered])


def test_validate_data_dir_not_a_directory(tmp_path, clock):
    (tmp_path / "data").write_text("a file")
    manager = CertificateManager(tmp_path / "data", server_context, clock=clock)
    with pytest.raises(CertificateFileError) as info:
        manager.validate([LOCAL])
    assert info.value.path == tmp_path / "data"
    assert "not a directory" in info.value.reason
    with pytest.raises(CertificateFileError):
        manager.load([LOCAL], None)


def test_validate_reports_damaged_ca(manager, tmp_path):
    manager.load([LOCAL], None)
    (tmp_path / "data" / "ca" / "intermediate.key").write_text("junk")
    with pytest.raises(CertificateFileError) as info:
        manager.validate([LOCAL])
    assert info.value.path == tmp_path / "data" / "ca" / "intermediate.key"


def test_context_factory_rejection_names_the_file(tmp_path, clock, files_spec):
    def refuse(cert_file, key_file):
        import ssl

        raise ssl.SSLError("EE_KEY_TOO_SMALL")

    manager = CertificateManager(tmp_path / "d", refuse, clock=clock)
    with pytest.raises(CertificateFileError) as info:
        manager.load([files_spec], None)
    assert info.value.path == files_spec.cert_file
    assert "EE_KEY_TOO_SMALL" in info.value.reason


def test_status(manager, files_spec, clock, tmp_path):
    acme = CertSpec("acme.test", ("acme.test",), "acme")
    broken = CertSpec("b.test", ("b.test",), "files", tmp_path / "gone.crt", files_spec.key_file)
    manager.load([LOCAL, files_spec], None)
    rows = {s.name: s for s in manager.status([LOCAL, files_spec, acme, broken])}
    local = rows["localhost"]
    assert local.issuer.startswith("CN=tlsproxy local intermediate")
    assert local.not_after == NOW + timedelta(days=7)
    assert (
        local.next_renewal == local.not_after - (local.not_after - (NOW - timedelta(minutes=1))) / 3
    )
    assert local.renewal_reason == "2/3 of lifetime"
    assert local.last_error is None
    assert rows["files.test"].issuer == "CN=files CA" and rows["files.test"].next_renewal is None
    assert (rows["acme.test"].renewal_reason, rows["acme.test"].issuer) == ("not issued yet", None)
    assert rows["b.test"].last_error == f"{tmp_path / 'gone.crt'}: file not found"


def test_status_reports_recorded_failure(manager):
    manager.load([LOCAL], None)
    manager.storage.save_state(
        "localhost",
        {"failures": 3, "next_attempt": "2026-06-01T13:00:00+00:00", "last_error": "CA down"},
    )
    row = manager.status([LOCAL])[0]
    assert row.renewal_reason == "retry after 3 failed attempt(s)"
    assert row.last_error == "CA down"
    assert row.next_renewal == NOW + timedelta(hours=1)


def test_damaged_stored_leaf_is_reissued(manager):
    first = serial(manager.load([LOCAL], None), "localhost")
    manager.storage.key_path("localhost").write_text("-----BEGIN PRIVATE KEY-----\nxx\n")
    assert serial(manager.load([LOCAL], None), "localhost") != first


def test_shortening_the_leaf_lifetime_reissues_at_once(manager):
    first = serial(manager.load([LOCAL], None), "localhost")  # a 7-day leaf
    manager.leaf_lifetime = timedelta(hours=1)
    row = manager.status([LOCAL])[0]
    assert (row.renewal_reason, row.next_renewal) == ("longer than local_ca.leaf_lifetime", NOW)
    info = manager.load([LOCAL], None).lookup("localhost").info
    assert info.serial != first
    assert info.not_after == NOW + timedelta(hours=1)
    # A leaf of the configured lifetime stays; a longer lifetime applies from the next one.
    assert serial(manager.load([LOCAL], None), "localhost") == info.serial
    manager.leaf_lifetime = timedelta(days=7)
    assert serial(manager.load([LOCAL], None), "localhost") == info.serial
