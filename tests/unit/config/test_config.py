"""The config parser: every key's type, defaults, and errors that name the key."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest

from proxy.config import (
    Address,
    Limits,
    TlsFiles,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
    parse_size,
)
from proxy.errors import ConfigError

BASE = Path("/etc/tlsproxy")
MINIMAL = """
[[site]]
hosts = ["localhost"]
upstream = "app"
[upstream.app]
servers = ["127.0.0.1:8000"]
"""


def parse(text: str):
    return parse_config(tomllib.loads(text), BASE)


def error_key(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.key


def test_minimal_config_gets_the_documented_defaults() -> None:
    config = parse(MINIMAL)
    assert config.server.https == (Address("0.0.0.0", 443),)
    assert config.server.http == (Address("0.0.0.0", 80),)
    assert config.server.data_dir == BASE / "data"
    assert config.server.shutdown_grace == 30.0
    assert config.limits == Limits()
    assert config.sites[0].tls == "internal"
    assert config.upstreams["app"].keepalive_timeout < 5.0  # below uvicorn's keep-alive
    assert config.local_ca.leaf_lifetime == 7 * 86400


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10), ("12h", 43200), ("30d", 30 * 86400)])
def test_local_ca_leaf_lifetime(text: str, seconds: float) -> None:
    config = parse(f"[local_ca]\nleaf_lifetime = '{text}'\n" + MINIMAL)
    assert config.local_ca.leaf_lifetime == seconds


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10), ("2m", 120), ("1h", 3600), (7, 7.0), (1.5, 1.5), ("3", 3)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "k") == seconds


@pytest.mark.parametrize("bad", ["10 parsecs", "-1s", "", True, [1]])
def test_bad_durations_name_the_key(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(bad, "limits.idle_timeout")
    assert info.value.key == "limits.idle_timeout"


@pytest.mark.parametrize(
    ("text", "size"), [("64KiB", 65536), ("100MiB", 100 * 2**20), (1024, 1024), ("1GB", 10**9)]
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text, "k") == size


def test_addresses_ipv4_ipv6_and_names() -> None:
    assert parse_address("127.0.0.1:8443", "k") == Address("127.0.0.1", 8443)
    assert parse_address("[::1]:8443", "k") == Address("::1", 8443)
    assert str(Address("::1", 8443)) == "[::1]:8443"
    assert parse_address("localhost:0", "k") == Address("localhost", 0)
    for bad in ("::1:8443", "127.0.0.1", "127.0.0.1:99999", "[nope]:1"):
        with pytest.raises(ConfigError):
            parse_address(bad, "k")


def test_full_example_config_parses() -> None:
    example = Path(__file__).resolve().parents[3] / "conf.example.toml"
    config = load_config(example)
    assert config.sites and config.upstreams


def test_hosts_are_normalised_and_wildcards_allowed() -> None:
    config = parse(MINIMAL.replace('["localhost"]', '["LocalHost.", "*.Example.Test"]'))
    assert config.sites[0].hosts == ("localhost", "*.example.test")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("[server]\nbogus = 1\n", "server.bogus"),
        ("[limits]\nidle_timeout = 'soon'\n", "limits.idle_timeout"),
        ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
        ("[limits]\nmax_header_bytes = 'lots'\n", "limits.max_header_bytes"),
        ("[server]\nhttps = ['nope']\n", "server.https[0]"),
        ("[server]\ntrusted_proxies = ['10.0.0.0/33']\n", "server.trusted_proxies[0]"),
        ("[server]\ndefault_site = 'other.test'\n", "server.default_site"),
        ("[local_ca]\nleaf_lifetime = '5s'\n", "local_ca.leaf_lifetime"),
        ("[local_ca]\nleaf_lifetime = '400d'\n", "local_ca.leaf_lifetime"),
        ("[local_ca]\nleaf_lifetime = 'a week'\n", "local_ca.leaf_lifetime"),
        ("[local_ca]\nroot_lifetime = '10y'\n", "local_ca.root_lifetime"),
        ("[local_ca]\nroot_cert = 'root.pem'\n", "local_ca.root_key"),
        ("[local_ca]\nroot_key = 'root.key'\n", "local_ca.root_cert"),
        ("[local_ca]\nroot_cert = ''\nroot_key = 'k'\n", "local_ca.root_cert"),
        ("unknown = true\n", "unknown"),
    ],
)
def test_errors_name_the_key(change: str, key: str) -> None:
    assert error_key(change + MINIMAL) == key


def test_site_errors_name_the_site() -> None:
    assert error_key(MINIMAL.replace('upstream = "app"', 'upstream = "nope"')) == "site[0].upstream"
    assert error_key(MINIMAL.replace('hosts = ["localhost"]', "hosts = []")) == "site[0].hosts"
    bad_host = MINIMAL.replace('hosts = ["localhost"]', 'hosts = ["a..b"]')
    assert error_key(bad_host) == "site[0].hosts[0]"
    text = MINIMAL.replace('upstream = "app"', 'upstream = "app"\ntls = "letsencrypt"')
    assert error_key(text) == "site[0].tls"
    text = MINIMAL.replace('upstream = "app"', 'upstream = "app"\ntls = { cert = "c.pem" }')
    assert error_key(text) == "site[0].tls.key"


def test_duplicate_hosts_across_sites_are_refused() -> None:
    text = MINIMAL + '[[site]]\nhosts = ["localhost"]\nupstream = "app"\n'
    assert error_key(text) == "site[1].hosts"


def test_tls_files_resolve_against_the_config_directory() -> None:
    text = MINIMAL.replace(
        'upstream = "app"', 'upstream = "app"\ntls = { cert = "c.pem", key = "/abs/k.pem" }'
    )
    assert parse(text).sites[0].tls == TlsFiles(BASE / "c.pem", Path("/abs/k.pem"))


def test_acme_wildcard_needs_dns() -> None:
    text = (
        MINIMAL.replace('["localhost"]', '["*.app.test"]').replace(
            'upstream = "app"', 'upstream = "app"\ntls = "acme"'
        )
        + '[acme]\nemail = "a@b.test"\n'
    )
    assert error_key(text) == "site[0].hosts"
    assert error_key(MINIMAL.replace('upstream = "app"', 'upstream = "app"\ntls = "acme"')) == (
        "site[0].tls"
    )


def test_upstream_servers_and_workers() -> None:
    config = parse(MINIMAL.replace('"127.0.0.1:8000"', '"127.0.0.1:8000", "unix:/run/app.sock"'))
    servers = config.upstreams["app"].servers
    assert servers[0].label == "127.0.0.1:8000" and servers[1].label == "unix:/run/app.sock"
    text = MINIMAL.replace(
        'servers = ["127.0.0.1:8000"]', 'command = "uvicorn main:app"\nworkers = 2'
    )
    assert error_key(text) == "upstream.app.command"  # needs {socket} or {port}
    text = MINIMAL.replace('servers = ["127.0.0.1:8000"]', 'workers = "many"\nservers = []')
    assert error_key(text) in ("upstream.app.servers", "upstream.app.workers")


def test_trusted_proxies_are_networks() -> None:
    config = parse('[server]\ntrusted_proxies = ["10.0.0.1", "192.168.0.0/16"]\n' + MINIMAL)
    assert ipaddress.ip_address("192.168.3.4") in config.server.trusted_proxies[1]


def test_unreadable_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert "missing.toml" in info.value.key
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    with pytest.raises(ConfigError) as info:
        load_config(broken)
    assert "TOML" in str(info.value)


def test_local_ca_root_files_resolve_against_the_config() -> None:
    config = parse("[local_ca]\nroot_cert = 'pki/root.pem'\nroot_key = '/etc/k.key'\n" + MINIMAL)
    assert config.local_ca.root_cert is not None and config.local_ca.root_cert.is_absolute()
    assert config.local_ca.root_cert.parts[-2:] == ("pki", "root.pem")
    assert config.local_ca.root_key == Path("/etc/k.key")


def test_a_unix_server_path_over_107_bytes_names_the_server() -> None:
    text = MINIMAL.replace('servers = ["127.0.0.1:8000"]', f'servers = ["unix:/{"s" * 107}"]')
    assert text != MINIMAL
    assert error_key(text) == "upstream.app.servers[0]"
