"""`[server] admin`: off by default; loopback or a unix socket unless admin_allow_remote."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.errors import ConfigError


def load(**server: object) -> object:
    raw = {
        "server": {"https": ["127.0.0.1:8443"], "http": [], **server},
        "site": [{"hosts": ["app.test"], "tls": "internal", "upstream": "app"}],
        "upstream": {"app": {"servers": ["127.0.0.1:9"]}},
    }
    return parse_config(raw, Path("/srv/proxy"))


def test_off_by_default() -> None:
    assert load().server.admin is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("value", "label"),
    [
        ("127.0.0.1:9180", "127.0.0.1:9180"),
        ("127.0.0.2:0", "127.0.0.2:0"),
        ("[::1]:9180", "[::1]:9180"),
        ("localhost:9180", "localhost:9180"),
        ("unix:/run/tlsproxy/admin.sock", "unix:/run/tlsproxy/admin.sock"),
        ("unix:admin.sock", "unix:/srv/proxy/admin.sock"),
    ],
)
def test_loopback_and_unix_sockets(value: str, label: str) -> None:
    assert load(admin=value).server.admin.label == label  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["0.0.0.0:9180", "[::]:9180", "10.1.2.3:9180", "example.com:1"])
def test_a_remote_address_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(admin=value)
    assert info.value.key == "server.admin"
    assert "admin_allow_remote" in str(info.value)


def test_a_remote_address_when_allowed() -> None:
    config = load(admin="0.0.0.0:9180", admin_allow_remote=True)
    assert config.server.admin.label == "0.0.0.0:9180"  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["9180", "127.0.0.1", 9180, "unix:"])
def test_malformed(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        load(admin=value)
    assert info.value.key == "server.admin"


def test_allow_remote_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError) as info:
        load(admin="127.0.0.1:1", admin_allow_remote="yes")
    assert info.value.key == "server.admin_allow_remote"
