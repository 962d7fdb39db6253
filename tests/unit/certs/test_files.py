import os
from datetime import timedelta

import pytest

from certs.errors import CertificateFileError
from certs.files import load_key_pair

from .factory import NOW, encrypted_key_pem, make_ca, make_leaf, write_pair

HOSTS = ["site.test", "www.site.test"]


@pytest.fixture
def ca():
    return make_ca()


@pytest.fixture
def good(tmp_path, ca):
    cert, key = make_leaf(ca, HOSTS)
    return write_pair(tmp_path, [cert, ca[0]], key)


def fails(cert_file, key_file, hosts=HOSTS, now=NOW):
    with pytest.raises(CertificateFileError) as info:
        load_key_pair(cert_file, key_file, hosts, now)
    return info.value


def test_good_pair_loads_with_chain(good):
    pair = load_key_pair(*good, HOSTS, NOW)
    assert len(pair.chain) == 2
    assert pair.leaf.subject.rfc4514_string() == "CN=site.test"


def test_missing_cert(tmp_path, good):
    err = fails(tmp_path / "nope.crt", good[1])
    assert err.path == tmp_path / "nope.crt"
    assert err.reason == "file not found"
    assert str(err) == f"{tmp_path / 'nope.crt'}: file not found"


def test_missing_key(tmp_path, good):
    err = fails(good[0], tmp_path / "nope.key")
    assert (err.path, err.reason) == (tmp_path / "nope.key", "file not found")


def test_directory(tmp_path, good):
    err = fails(tmp_path, good[1])
    assert (err.path, err.reason) == (tmp_path, "is a directory, not a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable(good):
    good[1].chmod(0)
    err = fails(*good)
    assert (err.path, err.reason) == (good[1], "permission denied (not readable)")


def test_not_pem(tmp_path, good):
    bad = tmp_path / "bad.crt"
    bad.write_bytes(b"\x30\x82 DER bytes, not PEM")
    err = fails(bad, good[1])
    assert (err.path, err.reason) == (bad, "no PEM certificate found")


def test_broken_pem(tmp_path, good):
    bad = tmp_path / "bad.crt"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    err = fails(bad, good[1])
    assert err.path == bad and err.reason.startswith("not a valid PEM certificate")


def test_key_file_holding_a_certificate(good):
    err = fails(good[0], good[0])
    assert (err.path, err.reason) == (good[0], "no PEM private key found")


def test_encrypted_key(tmp_path, ca):
    cert, key = make_leaf(ca, HOSTS)
    cert_file, key_file = write_pair(tmp_path, [cert], key)
    key_file.write_bytes(encrypted_key_pem(key))
    err = fails(cert_file, key_file)
    assert err.path == key_file and "encrypted" in err.reason


def test_key_not_matching(tmp_path, ca, good):
    _, other_key = make_leaf(ca, HOSTS)
    _, other_key_file = write_pair(tmp_path, [make_leaf(ca, HOSTS)[0]], other_key, "other")
    err = fails(good[0], other_key_file)
    assert err.path == other_key_file
    assert err.reason == f"private key does not match the certificate in {good[0]}"


def test_expired(tmp_path, ca):
    cert, key = make_leaf(
        ca, HOSTS, not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(seconds=1)
    )
    paths = write_pair(tmp_path, [cert], key)
    err = fails(*paths)
    assert err.path == paths[0]
    assert err.reason == "certificate expired on 2026-06-01 11:59:59 UTC"


def test_not_yet_valid(tmp_path, ca):
    cert, key = make_leaf(ca, HOSTS, not_before=NOW + timedelta(hours=1))
    paths = write_pair(tmp_path, [cert], key)
    err = fails(*paths)
    assert err.path == paths[0]
    assert err.reason == "certificate is not valid before 2026-06-01 13:00:00 UTC"


def test_not_covering_a_host(good):
    err = fails(*good, hosts=["site.test", "api.site.test"])
    assert err.path == good[0]
    assert err.reason == (
        "certificate does not cover api.site.test (it names: site.test, www.site.test)"
    )


def test_wildcard_cert_covers_one_label(tmp_path, ca):
    cert, key = make_leaf(ca, ["*.site.test"])
    paths = write_pair(tmp_path, [cert], key)
    load_key_pair(*paths, ["a.site.test", "b.site.test", "*.site.test"], NOW)
    err = fails(*paths, hosts=["site.test"])
    assert err.reason.startswith("certificate does not cover site.test")
    assert fails(*paths, hosts=["a.b.site.test"]).path == paths[0]


def test_certificate_without_san(tmp_path, ca):
    cert, key = make_leaf(ca, [])
    paths = write_pair(tmp_path, [cert], key)
    err = fails(*paths)
    assert err.reason.endswith("(it names: no DNS names)")
