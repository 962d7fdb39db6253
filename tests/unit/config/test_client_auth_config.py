"""`[[site]] client_auth`: its shapes, its defaults, and the key named for each mistake."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from proxy.config import ClientAuth, parse_config
from proxy.errors import ConfigError

BASE = Path("/etc/tlsproxy")
SITE = """
[[site]]
hosts = ["localhost"]
upstream = "app"
{line}
[upstream.app]
servers = ["127.0.0.1:8000"]
"""


def parse(line: str):
    return parse_config(tomllib.loads(SITE.format(line=line)), BASE)


def error_key(line: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(line)
    return info.value.key


def test_absent_means_no_client_certificates() -> None:
    assert parse("").sites[0].client_auth is None


def test_internal_and_required_by_default() -> None:
    site = parse('client_auth = { ca = "internal" }').sites[0]
    assert site.client_auth == ClientAuth(ca="internal", required=True)


def test_a_ca_path_resolves_against_the_config_directory() -> None:
    site = parse('client_auth = { ca = "clients.pem", required = false }').sites[0]
    assert site.client_auth == ClientAuth(ca=BASE / "clients.pem", required=False)
    site = parse('client_auth = { ca = "/abs/ca.pem" }').sites[0]
    assert site.client_auth == ClientAuth(ca=Path("/abs/ca.pem"), required=True)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('client_auth = "internal"', "site[0].client_auth"),
        ("client_auth = true", "site[0].client_auth"),
        ("client_auth = {}", "site[0].client_auth.ca"),
        ("client_auth = { required = true }", "site[0].client_auth.ca"),
        ('client_auth = { ca = "" }', "site[0].client_auth.ca"),
        ("client_auth = { ca = 1 }", "site[0].client_auth.ca"),
        ('client_auth = { ca = ["a.pem"] }', "site[0].client_auth.ca"),
        ('client_auth = { ca = "internal", required = "yes" }', "site[0].client_auth.required"),
        ('client_auth = { ca = "internal", required = 1 }', "site[0].client_auth.required"),
        ('client_auth = { ca = "internal", optional = true }', "site[0].client_auth.optional"),
        ('client_auth = { ca = "internal", verify_depth = 2 }', "site[0].client_auth.verify_depth"),
    ],
)
def test_bad_shapes_name_the_key(line: str, key: str) -> None:
    assert error_key(line) == key
