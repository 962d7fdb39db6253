"""[storage]: the backend, its URL (or TLSPROXY_STORAGE_URL), prefix and encryption key file."""

from __future__ import annotations

import tomllib

import pytest

from certs.storage import StorageSettings
from proxy.config import parse_config
from proxy.errors import ConfigError
from tests.unit.config.test_config import BASE
from tests.unit.config.test_config import MINIMAL as SITE


@pytest.fixture(autouse=True)
def no_url_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TLSPROXY_STORAGE_URL", raising=False)


def parse(storage: str) -> StorageSettings:
    return parse_config(tomllib.loads(f"[storage]\n{storage}\n{SITE}"), BASE).storage


def error(storage: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(storage)
    return info.value


def test_the_default_is_the_data_dir() -> None:
    assert parse_config(tomllib.loads(SITE), BASE).storage == StorageSettings(backend="file")
    assert parse('backend = "file"') == StorageSettings()
    assert StorageSettings().describe() == "file (data_dir)"


def test_redis() -> None:
    settings = parse(
        'backend = "redis"\nurl = "rediss://app:pw@redis.internal:6380/2"\n'
        'prefix = "cluster-a"\nencryption_key_file = "storage.key"'
    )
    assert settings == StorageSettings(
        backend="redis",
        url="rediss://app:pw@redis.internal:6380/2",
        prefix="cluster-a",
        encryption_key_file=BASE / "storage.key",
    )
    assert settings.describe() == (
        "redis rediss://app:***@redis.internal:6380/2 (prefix 'cluster-a'), "
        "encrypted with /etc/tlsproxy/storage.key"
    )
    assert parse('backend = "redis"\nurl = "redis://127.0.0.1"').prefix == "tlsproxy"


def test_the_url_from_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLSPROXY_STORAGE_URL", "redis://:secret@10.0.0.5:6379/0")
    assert parse('backend = "redis"').url == "redis://:secret@10.0.0.5:6379/0"
    assert parse('backend = "redis"\nurl = "redis://x"').url == "redis://:secret@10.0.0.5:6379/0"
    monkeypatch.setenv("TLSPROXY_STORAGE_URL", "http://:secret@x")
    e = error('backend = "redis"')
    assert e.key == "TLSPROXY_STORAGE_URL" and "secret" not in str(e)
    # The file backend has no URL: the environment does not change it.
    monkeypatch.setenv("TLSPROXY_STORAGE_URL", "redis://x")
    assert parse("") == StorageSettings()


@pytest.mark.parametrize(
    ("storage", "key", "words"),
    [
        ('backend = "consul"', "storage.backend", "expected one of 'file', 'redis'"),
        ('backend = "redis"', "storage.url", "missing"),
        ('backend = "redis"\nurl = ""', "storage.url", "missing"),
        ('backend = "redis"\nurl = "http://:pw@x"', "storage.url", "redis://"),
        ('backend = "redis"\nurl = "redis://x"\nprefix = "a:b"', "storage.prefix", "1 to 64"),
        ('backend = "redis"\nurl = "redis://x"\nprefix = ""', "storage.prefix", "1 to 64"),
        ('url = "redis://x"', "storage.url", 'only with backend = "redis"'),
        ('prefix = "p"', "storage.prefix", 'only with backend = "redis"'),
        ('encryption_key_file = "k"', "storage.encryption_key_file", "only with"),
        ('backend = "redis"\nurl = "redis://x"\nencryption_key_file = ""', "", "empty"),
        ('backend = "redis"\nurl = "redis://x"\npassword = "x"', "storage.password", "unknown"),
        ("url = 5", "storage.url", "expected a string"),
    ],
)
def test_errors_name_the_key(storage: str, key: str, words: str) -> None:
    e = error(storage)
    assert e.key == (key or "storage.encryption_key_file")
    assert words in e.message
    assert "pw" not in str(e)
