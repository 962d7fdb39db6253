import pytest

from proxy.config import Site
from proxy.downstream.routing import Router, match_name, normalize_host

A = Site(hosts=("a.test", "www.a.test"), tls="internal", upstream="a")
WILD = Site(hosts=("*.w.test",), tls="internal", upstream="w")
B = Site(hosts=("b.test", "127.0.0.1", "::1"), tls="internal", upstream="b")
SITES = (A, WILD, B)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a.test", "a.test"),
        (b"a.test", "a.test"),
        ("A.Test", "a.test"),
        ("a.test.", "a.test"),
        (b"A.TEST.:8443", "a.test"),
        (b"a.test:443", "a.test"),
        (b"a.test:", "a.test"),  # RFC 3986: an empty port is allowed
        (b"127.0.0.1:8080", "127.0.0.1"),
        (b"[::1]", "::1"),
        (b"[::1]:8443", "::1"),
        (b"[2001:DB8::1]:1", "2001:db8::1"),
        ("::1", "::1"),  # the bare form config and SNI-less callers use
        (b"under_score.test", "under_score.test"),
        (None, None),
        (b"", None),
        (b":8080", None),
        (b".", None),
        (b"a..test", None),
        (b".a.test", None),
        (b"a.test..", None),
        (b"a test", None),
        (b"a.test:port", None),
        (b"a.test:123456", None),
        (b"a.test:80:80", None),
        (b"user@a.test", None),
        (b"a.test/path", None),
        (b"*.w.test", None),  # a wildcard is a pattern, never a Host
        (b"[::1", None),
        (b"[::1]x", None),
        (b"[::1]:x", None),
        (b"[a.test]", None),
        (b"[::g]", None),
        ("b\u00fccher.test".encode(), None),  # raw UTF-8: IDNs arrive as punycode
        (b"xn--bcher-kva.test", "xn--bcher-kva.test"),
    ],
)
def test_normalize_host(raw, expected):
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("a.test", "a.test", True),
        ("a.test", "b.test", False),
        ("*.w.test", "x.w.test", True),
        ("*.w.test", "w.test", False),
        ("*.w.test", "x.y.w.test", False),
        ("*.w.test", ".w.test", False),
        ("*.w.test", "xw.test", False),
        ("*.w.test", "x.w.test.evil", False),
    ],
)
def test_match_name(pattern, name, expected):
    assert match_name(pattern, name) is expected


def test_site_for_name_exact_then_wildcard():
    exact = Site(hosts=("x.w.test",), tls="internal", upstream="x")
    router = Router([WILD, exact])
    assert router.site_for_name("x.w.test") is exact  # exact wins though listed later
    assert router.site_for_name("y.w.test") is WILD
    assert router.site_for_name("w.test") is None
    assert router.site_for_name("a.b.w.test") is None
    assert router.site_for_name("nothing.test") is None
    assert router.site_for_name(None) is None
    assert router.site_for_name("") is None


def test_same_sni_and_host_routes_to_the_site():
    router = Router(SITES)
    assert router.route("a.test", b"a.test") == (A, 0)
    assert router.route("a.test", b"A.TEST.:8443") == (A, 0)
    # Two names of one site share its certificate: not misdirected.
    assert router.route("a.test", b"www.a.test") == (A, 0)
    assert router.route("x.w.test", b"y.w.test:443") == (WILD, 0)


def test_known_sni_and_its_own_host_route_to_that_site_whatever_the_default():
    # A regression: with a default site, a non-default site's own SNI + Host was 421.
    router = Router(SITES, "a.test")
    assert router.route("b.test", b"b.test:8443") == (router.site_for_name("b.test"), 0)
    assert router.route("x.w.test", b"x.w.test") == (WILD, 0)


def test_host_of_another_site_is_misdirected():
    router = Router(SITES, "a.test")
    assert router.route("a.test", b"b.test") == (None, 421)
    assert router.route("x.w.test", b"a.test") == (None, 421)


def test_unknown_host_with_known_sni_goes_to_the_default_site_or_404():
    # The rule: 421 only for a Host that belongs to another site; an unknown Host is
    # answered by the default site (like nginx's default server), or 404 without one.
    assert Router(SITES, "a.test").route("b.test", b"unknown.test") == (A, 0)
    assert Router(SITES).route("b.test", b"unknown.test") == (None, 404)


def test_no_sni_routes_by_host_alone():
    router = Router(SITES)
    assert router.route(None, b"b.test") == (B, 0)
    assert router.route(None, b"127.0.0.1:8443") == (B, 0)
    assert router.route(None, b"[::1]:8443") == (B, 0)
    assert router.route(None, b"z.w.test") == (WILD, 0)
    assert router.route(None, b"unknown.test") == (None, 404)


def test_unknown_host_goes_to_default_site():
    router = Router(SITES, "b.test")
    assert router.route(None, b"unknown.test") == (B, 0)
    assert router.route(None, b"a.test") == (A, 0)  # a known Host still wins over the default


def test_unknown_sni_was_served_the_default_certificate():
    router = Router(SITES, "b.test")
    assert router.route("unknown.test", b"b.test") == (B, 0)
    assert router.route("unknown.test", b"unknown.test") == (B, 0)
    assert router.route("unknown.test", b"a.test") == (None, 421)


def test_missing_or_invalid_host_is_400():
    router = Router(SITES, "a.test")
    assert router.route(None, None) == (None, 400)
    assert router.route("a.test", None) == (None, 400)
    assert router.route("a.test", b"") == (None, 400)
    assert router.route(None, b"a test") == (None, 400)
    assert router.route(None, b"[::1") == (None, 400)


def test_default_site_may_be_any_host_or_a_wildcard_name():
    assert Router(SITES, "www.a.test").default is A
    assert Router(SITES, "WWW.A.TEST.").default is A
    assert Router(SITES, "q.w.test").default is WILD
    assert Router(SITES, "*.w.test").default is WILD
    with pytest.raises(ValueError, match=r"nope\.test"):
        Router(SITES, "nope.test")


def test_first_site_listing_a_host_wins():
    other = Site(hosts=("a.test",), tls="internal", upstream="other")
    assert Router([A, other]).route(None, b"a.test") == (A, 0)


def test_cache_stays_bounded_and_correct():
    router = Router(SITES, "a.test")
    for i in range(10_000):
        assert router.route(None, b"h%d.test" % i) == (A, 0)
    assert len(router._cache) <= 4096
    assert router.route("a.test", b"b.test") == (None, 421)
    assert router.route("a.test", b"b.test") == (None, 421)  # the cached answer is the same
