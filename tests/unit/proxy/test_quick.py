"""`tlsproxy reverse-proxy`'s flags as a Config: which CA a name gets, what --from and --to
accept, which ports are bound, and that every refusal names the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import Address, UpstreamServer
from proxy.errors import ConfigError
from proxy.quick import (
    LETS_ENCRYPT,
    LETS_ENCRYPT_STAGING,
    Origin,
    build_config,
    build_document,
    default_data_dir,
    issuer_for,
    parse_from,
    upstream_address,
)


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "app.localhost",
        "app.test",
        "a.b.test",
        "db.internal",
        "printer.local",
        "nas.home.arpa",
        "www.example",
        "x.invalid",
        "myapp",  # one label: no public CA certifies it
        "127.0.0.1",
        "10.1.2.3",
        "::1",
        "2001:db8::1",
    ],
)
def test_local_names_get_the_local_ca(host: str) -> None:
    assert issuer_for(host) == "internal"


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "app.example.com",
        "test.example.com",
        "localhost.example.org",
        "api.dev",
        "internal.io",
        "mytest.com",
        "home.arpa.example.net",
    ],
)
def test_public_names_get_acme(host: str) -> None:
    assert issuer_for(host) == "acme"


@pytest.mark.parametrize(
    ("text", "origin"),
    [
        ("app.example.com", Origin("app.example.com", None)),
        ("App.Test.:8443", Origin("app.test", 8443)),
        ("https://app.test:8443", Origin("app.test", 8443)),
        ("https://app.test", Origin("app.test", None)),
        ("127.0.0.1:8443", Origin("127.0.0.1", 8443)),
        ("[::1]:8443", Origin("::1", 8443)),
        ("[::1]", Origin("::1", None)),
        ("::1", Origin("::1", None)),
        ("[0:0::1]:9", Origin("::1", 9)),
    ],
)
def test_from(text: str, origin: Origin) -> None:
    assert parse_from(text) == origin


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":8443",
        "app.test:0",
        "app.test:x",
        "app.test:65536",
        "http://app.test",
        "app.test/path",
        "[::1",
        "[::1]x",
        "*.example.com",
        "bad_name!",
    ],
)
def test_bad_from_names_the_flag(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_from(text)
    assert caught.value.key == "--from"


@pytest.mark.parametrize(
    ("text", "server"),
    [
        ("127.0.0.1:8000", "127.0.0.1:8000"),
        (":8000", "127.0.0.1:8000"),
        ("8000", "127.0.0.1:8000"),
        ("unix:/run/app.sock", "unix:/run/app.sock"),
        ("[::1]:8000", "[::1]:8000"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ],
)
def test_to(text: str, server: str) -> None:
    assert upstream_address(text) == server


@pytest.mark.parametrize("text", ["", "nowhere", "unix:", "127.0.0.1:99999"])
def test_bad_to_names_the_flag(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        upstream_address(text)
    assert caught.value.key == "--to"


def config(origin: str, to: str = ":8000", **kw: object):
    return build_config(
        build_document(parse_from(origin), upstream_address(to), data_dir=Path("/d"), **kw)  # type: ignore[arg-type]
    )


def test_a_local_name_with_a_port_is_that_port_only_with_the_local_ca() -> None:
    c = config("app.test:8443")
    assert c.server.https == (Address("0.0.0.0", 8443),)
    assert c.server.http == ()
    assert c.server.data_dir == Path("/d")
    assert c.server.default_site == "app.test"
    (site,) = c.sites
    assert site.hosts == ("app.test",) and site.tls == "internal"
    assert c.upstreams[site.upstream].servers == (UpstreamServer("127.0.0.1", 8000),)
    assert c.acme is None and c.source is None


def test_a_public_name_without_a_port_is_443_and_80_over_acme() -> None:
    c = config("app.example.com", "unix:/run/app.sock", email="ops@example.com")
    assert c.server.https == (Address("0.0.0.0", 443),)
    assert c.server.http == (Address("0.0.0.0", 80),)
    assert c.sites[0].tls == "acme"
    assert c.acme is not None
    assert c.acme.directory == LETS_ENCRYPT and c.acme.email == "ops@example.com"
    assert c.acme.challenge == "http-01"


def test_staging_directory_and_ca_bundle() -> None:
    assert config("app.example.com", staging=True).acme.directory == LETS_ENCRYPT_STAGING  # type: ignore[union-attr]
    c = config(
        "a.example.com:9443",
        http_port=5002,
        directory="https://127.0.0.1:14000/dir",
        ca_bundle="/p/ca.pem",
    )
    assert c.acme is not None and c.acme.directory == "https://127.0.0.1:14000/dir"
    assert c.acme.ca_bundle == Path("/p/ca.pem")
    assert c.server.http == (Address("0.0.0.0", 5002),)


def test_loopback_names_listen_on_loopback_and_ip_literals_on_themselves() -> None:
    assert config("localhost:8443").server.https == (Address("127.0.0.1", 8443),)
    assert config("app.localhost").server.http == (Address("127.0.0.1", 80),)
    assert config("10.0.0.5:8443").server.https == (Address("10.0.0.5", 8443),)
    assert config("[::1]:8443").server.https == (Address("::1", 8443),)


def test_with_ipv6_the_v6_addresses_too() -> None:
    c = config("app.example.com", ipv6=True)
    assert c.server.https == (Address("0.0.0.0", 443), Address("::", 443))
    assert c.server.http == (Address("0.0.0.0", 80), Address("::", 80))
    assert config("localhost:8443", ipv6=True).server.https == (
        Address("127.0.0.1", 8443),
        Address("::1", 8443),
    )
    assert config("10.0.0.5:8443", ipv6=True).server.https == (Address("10.0.0.5", 8443),)


def test_internal_certs_and_http_port_off() -> None:
    c = config("app.example.com", internal_certs=True, http_port=None)
    assert c.sites[0].tls == "internal" and c.acme is None and c.server.http == ()


@pytest.mark.parametrize(
    ("origin", "kw", "flag"),
    [
        ("app.example.com:8443", {}, "--from"),  # ACME with no port for http-01
        ("app.test", {"email": "a@b.test"}, "--email"),
        ("app.test", {"staging": True}, "--staging"),
        ("app.test", {"directory": "https://x/dir"}, "--directory"),
        ("app.test", {"ca_bundle": "/x"}, "--ca-bundle"),
        ("app.example.com", {"staging": True, "directory": "https://x/dir"}, "--staging"),
        ("app.example.com", {"directory": "ftp://x"}, "--directory"),
    ],
)
def test_refusals_name_the_flag(origin: str, kw: dict, flag: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(origin, **kw)
    assert caught.value.key == flag


def test_default_data_dir_follows_xdg() -> None:
    assert default_data_dir({"XDG_DATA_HOME": "/x", "HOME": "/h"}) == Path("/x/tlsproxy")
    assert default_data_dir({"HOME": "/h"}) == Path("/h/.local/share/tlsproxy")
    # A relative XDG_DATA_HOME is invalid per the spec: ignored.
    assert default_data_dir({"XDG_DATA_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.local/share/tlsproxy"
    )
