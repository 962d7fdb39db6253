"""`tlsproxy storage copy` through the real CLI: a data_dir made by the CLI itself into a real
redis-server (every value encrypted), and back into a new data_dir."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from certs.storage import Storage
from tests.integration.harness import running, tlsproxy, write_config
from tests.integration.redis_server import PASSWORD, RedisServer

SITE = """
[[site]]
hosts = ["localhost"]
tls = "internal"
upstream = "app"
[upstream.app]
servers = ["127.0.0.1:9"]
"""


def file_config(directory: Path, data_dir: str) -> Path:
    text = f'[server]\nhttps = ["127.0.0.1:0"]\nhttp = []\ndata_dir = "{data_dir}"\n{SITE}'
    return write_config(directory, text, f"{data_dir}.toml")


def redis_config(directory: Path, url: str, secret: str = "storage.secret") -> Path:
    text = (
        f'[server]\nhttps = ["127.0.0.1:0"]\nhttp = []\ndata_dir = "unused"\n'
        f'[storage]\nbackend = "redis"\nurl = "{url}"\nprefix = "t1"\n'
        f'encryption_key_file = "{secret}"\n{SITE}'
    )
    return write_config(directory, text, f"redis-{secret}.toml")


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != "locks"
    }


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running(RedisServer(tmp_path / "redis")) as server:
        yield server


def test_file_to_redis_and_back(tmp_path: Path, redis_server: RedisServer) -> None:
    source = file_config(tmp_path, "data")
    assert tlsproxy("ca", "-c", str(source)).returncode == 0  # the local CA
    made = tlsproxy("ca", "-c", str(source), "--client", "alice", "--out", str(tmp_path))
    assert made.returncode == 0, made.stderr
    # A site's certificate, as the managers store it.
    Storage(tmp_path / "data").save_certificate(
        "localhost", (tmp_path / "alice.pem").read_bytes(), (tmp_path / "alice.key").read_bytes()
    )
    Storage(tmp_path / "data").reserve_state("localhost")
    original = tree(tmp_path / "data")
    assert len(original) == 9

    (tmp_path / "storage.secret").write_bytes(os.urandom(32))
    into_redis = redis_config(tmp_path, redis_server.url)
    copied = tlsproxy("storage", "copy", "-c", str(source), "--to-config", str(into_redis))
    assert copied.returncode == 0, copied.stderr
    assert copied.stdout.startswith("copied 9 keys from file storage")
    assert PASSWORD not in copied.stdout + copied.stderr
    stored = redis_server.cli("--scan", "--pattern", "t1:data:*").split()
    assert sorted(k.removeprefix("t1:data:") for k in stored) == sorted(original)
    raw_key = redis_server.cli("GET", "t1:data:ca/root.key")
    assert raw_key and "PRIVATE KEY" not in raw_key  # encrypted at rest
    assert "BEGIN CERTIFICATE" not in redis_server.cli("GET", "t1:data:ca/root.pem")

    back = file_config(tmp_path, "back")
    returned = tlsproxy("storage", "copy", "-c", str(into_redis), "--to-config", str(back))
    assert returned.returncode == 0, returned.stderr
    assert returned.stdout.startswith("copied 9 keys from redis storage redis://:***@")
    assert tree(tmp_path / "back") == original
    for path in (tmp_path / "back").rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
    # The copy is a working data_dir: the same local CA.
    assert tlsproxy("ca", "-c", str(back)).stdout == tlsproxy("ca", "-c", str(source)).stdout

    # Another secret cannot read the keys: exit 1, one line, the target untouched.
    (tmp_path / "wrong.secret").write_bytes(os.urandom(32))
    wrong = redis_config(tmp_path, redis_server.url, "wrong.secret")
    again = file_config(tmp_path, "again")
    failed = tlsproxy("storage", "copy", "-c", str(wrong), "--to-config", str(again))
    assert failed.returncode == 1
    assert "does not decrypt" in failed.stderr and failed.stderr.count("\n") == 1
    assert not (tmp_path / "again").exists()


def test_bad_configs_exit_2_naming_the_key(tmp_path: Path, redis_server: RedisServer) -> None:
    source = file_config(tmp_path, "data")
    bad = write_config(tmp_path, f'[storage]\nbackend = "redis"\n{SITE}', "bad.toml")
    result = tlsproxy("storage", "copy", "-c", str(source), "--to-config", str(bad))
    assert result.returncode == 2
    assert f"--to-config {bad}: storage.url: missing" in result.stderr
    no_secret = redis_config(tmp_path, redis_server.url, "missing.secret")
    result = tlsproxy("storage", "copy", "-c", str(no_secret), "--to-config", str(source))
    assert result.returncode == 2
    assert "storage.encryption_key_file" in result.stderr and "missing.secret" in result.stderr
    result = tlsproxy("storage", "copy", "-c", str(source), "--to-config", str(source))
    assert result.returncode == 2 and "the same storage" in result.stderr


def instance_config(directory: Path, url: str, data_dir: str) -> Path:
    """An instance on the shared store, with its own data_dir (its working copy)."""
    text = (
        f'[server]\nhttps = ["127.0.0.1:0"]\nhttp = []\ndata_dir = "{data_dir}"\n'
        f'[storage]\nbackend = "redis"\nurl = "{url}"\nprefix = "t1"\n'
        f'encryption_key_file = "storage.secret"\n{SITE}'
    )
    return write_config(directory, text, f"{data_dir}.toml")


def test_the_commands_of_two_instances_see_one_store(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """`ca` and `certs` read the shared store, not the instance's own data_dir: a second
    instance with an empty data_dir sees the local CA and certificate the first one stored."""
    (tmp_path / "storage.secret").write_bytes(os.urandom(32))
    first = instance_config(tmp_path, redis_server.url, "one")
    second = instance_config(tmp_path, redis_server.url, "two")
    assert tlsproxy("check", "-c", str(first)).returncode == 0
    root = tlsproxy("ca", "-c", str(first))
    assert root.returncode == 0 and root.stdout.startswith("-----BEGIN CERTIFICATE-----")
    assert tlsproxy("ca", "-c", str(second)).stdout == root.stdout
    # In Redis, the private keys are encrypted (the working copies are plain 0600 files).
    stored = redis_server.cli("--raw", "GET", "t1:data:ca/root.key")
    assert "PRIVATE KEY" not in stored and stored.strip()
    assert "PRIVATE KEY" in (tmp_path / "one" / "ca" / "root.key").read_text()
    certs = tlsproxy("certs", "-c", str(second))
    assert certs.returncode == 0 and "source=internal" in certs.stdout
    assert "last_error=-" in certs.stdout


def test_redis_down_check_names_storage_url_and_certs_shows_the_error(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")  # never started
    (tmp_path / "storage.secret").write_bytes(os.urandom(32))
    config = instance_config(tmp_path, server.url, "one")
    result = tlsproxy("check", "-c", str(config))
    assert result.returncode == 2 and PASSWORD not in result.stderr
    assert result.stderr.startswith("tlsproxy: error: storage.url: redis storage redis://:***@")
    certs = tlsproxy("certs", "-c", str(config))
    assert certs.returncode == 0 and PASSWORD not in certs.stdout + certs.stderr
    assert "last_error=storage: redis storage redis://:***@" in certs.stdout


def test_redis_down_exits_1_without_the_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")  # never started
    source = file_config(tmp_path, "data")
    assert tlsproxy("ca", "-c", str(source)).returncode == 0
    (tmp_path / "storage.secret").write_bytes(os.urandom(32))
    target = redis_config(tmp_path, server.url)
    result = tlsproxy("storage", "copy", "-c", str(source), "--to-config", str(target))
    assert result.returncode == 1
    assert result.stderr.startswith("tlsproxy: error: redis storage redis://:***@127.0.0.1:")
    assert PASSWORD not in result.stderr and result.stderr.count("\n") == 1
