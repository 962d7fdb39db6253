import pytest

from certs.cache import CertificateCache
from certs.selection import host_covered, normalize_host, uncovered_hosts, wildcard_parent

from .factory import fake_installed


@pytest.fixture
def cache() -> CertificateCache:
    c = CertificateCache()
    c.replace(fake_installed("site"), ["site.test", "www.site.test"])
    c.replace(fake_installed("wild"), ["*.example.test"])
    c.replace(fake_installed("apex"), ["example.test", "exact.example.test"])
    return c


def name_of(installed):
    return installed.spec_name if installed is not None else None


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [
        ("site.test", "site"),
        ("www.site.test", "site"),
        ("SITE.Test", "site"),
        ("site.test.", "site"),
        ("a.example.test", "wild"),
        ("A.EXAMPLE.TEST.", "wild"),
        ("a.b.example.test", None),  # one label only
        ("example.test", "apex"),  # the wildcard does not cover its parent
        ("exact.example.test", "apex"),  # exact beats wildcard
        ("other.test", None),
        ("test", None),
        (".example.test", None),  # an empty label is no label
    ],
)
def test_lookup_without_default(cache, server_name, expected):
    assert name_of(cache.lookup(server_name)) == expected
    assert name_of(cache.lookup_exact_or_wildcard(server_name)) == expected


def test_default_answers_unknown_and_missing_names(cache):
    assert cache.lookup(None) is None
    cache.set_default("site")
    assert name_of(cache.lookup(None)) == "site"
    assert name_of(cache.lookup("")) == "site"
    assert name_of(cache.lookup("a.b.example.test")) == "site"
    assert name_of(cache.lookup("a.example.test")) == "wild"
    assert cache.lookup_exact_or_wildcard("unknown.test") is None
    cache.set_default("not-installed")
    assert cache.lookup("unknown.test") is None


def test_replace_swaps_certificate_and_drops_old_hosts(cache):
    old = cache.lookup("site.test")
    new = fake_installed("site", serial=2)
    cache.replace(new, ["site.test", "api.site.test"])
    assert cache.lookup("site.test") is new
    assert cache.lookup("api.site.test") is new
    assert cache.lookup("www.site.test") is None
    assert old is not new and old.info.serial == 1
    assert sorted(i.spec_name for i in cache.entries()) == ["apex", "site", "wild"]
    assert cache.get("site") is new


def test_remove(cache):
    cache.set_default("wild")
    cache.remove("wild")
    assert cache.lookup("a.example.test") is None
    assert cache.lookup(None) is None
    assert name_of(cache.lookup("site.test")) == "site"
    assert cache.get("wild") is None


def test_normalize_and_parent():
    assert normalize_host("Www.Example.TEST.") == "www.example.test"
    assert wildcard_parent("a.example.test") == "example.test"
    assert wildcard_parent("localhost") is None


def test_coverage_rules():
    names = {"*.example.test", "site.test"}
    assert host_covered("a.example.test", names)
    assert host_covered("A.Example.Test.", names)
    assert not host_covered("a.b.example.test", names)
    assert not host_covered("example.test", names)
    assert host_covered("*.example.test", names)
    # a spec's wildcard is only covered by that wildcard, not by one name below it
    assert not host_covered("*.site.test", {"www.site.test", "site.test"})
    assert uncovered_hosts(["site.test", "x.test", "b.example.test"], names) == ["x.test"]
