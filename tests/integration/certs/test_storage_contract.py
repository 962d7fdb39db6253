"""One contract test suite, run against both storage backends: files in a temp dir, and a
real redis-server (with a password) on a free port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from certs.challenges.http01 import Http01Responder
from certs.errors import LockTimeout
from certs.storage import (
    Backend,
    FileBackend,
    LockLost,
    Storage,
    StorageError,
    StorageSettings,
    keys,
    locked,
    open_backend,
)
from certs.storage.crypt import EncryptedBackend, read_secret
from certs.storage.redis import RedisBackend
from tests.integration.redis_server import PASSWORD, RedisServer

REPO = Path(__file__).resolve().parents[3]
KEY_PEM = (
    b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
    b"-----END PRIVATE KEY-----\n"
)
CERT_PEM = b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Made:
    """How to open the backend under test (again, in this process or in a child)."""

    def __init__(self, kind: str, where: str) -> None:
        self.kind = kind
        self.where = where  # a directory or a redis URL

    def open(self, **kwargs: object) -> Backend:
        if self.kind == "file":
            return FileBackend(Path(self.where), **kwargs)  # type: ignore[arg-type]
        return RedisBackend(self.where, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=["file", "redis"])
def made(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Made]:
    if request.param == "file":
        yield Made("file", str(tmp_path / "data"))
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    server.cli("FLUSHALL")
    yield Made("redis", server.url)


@pytest.fixture
def backend(made: Made) -> Iterator[Backend]:
    b = made.open()
    try:
        yield b
    finally:
        b.close()


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


# -- values -----------------------------------------------------------------------------------
def test_round_trip(backend: Backend) -> None:
    key = keys.cert("app.test")
    assert backend.load(key) is None
    assert not backend.exists(key)
    backend.store(key, CERT_PEM)
    assert backend.load(key) == CERT_PEM
    assert backend.exists(key)
    backend.store(key, b"replaced")
    assert backend.load(key) == b"replaced"
    backend.store("empty", b"")
    assert backend.load("empty") == b""  # empty is a value, not "missing"


def test_list_and_stat(backend: Backend) -> None:
    before = time.time()
    for key in (keys.cert("a.test"), keys.private_key("a.test"), keys.cert("b.test")):
        backend.store(key, b"12345")
    backend.store(keys.CA_ROOT_CERT, CERT_PEM)
    assert backend.list("", recursive=False) == ["ca", "certificates"]
    assert backend.list("certificates", recursive=False) == [
        "certificates/a.test",
        "certificates/b.test",
    ]
    assert backend.list("certificates/", recursive=True) == [
        "certificates/a.test/cert.pem",
        "certificates/a.test/key.pem",
        "certificates/b.test/cert.pem",
    ]
    assert backend.list("", recursive=True)[0] == "ca/root.pem"
    assert backend.list("nothing", recursive=True) == []
    info = backend.stat(keys.cert("a.test"))
    assert info is not None and info.is_terminal and info.size == 5
    assert before - 2 <= info.modified <= time.time() + 2
    directory = backend.stat("certificates/a.test")
    assert directory is not None and not directory.is_terminal
    assert backend.stat("certificates/c.test") is None


def test_delete(backend: Backend) -> None:
    backend.store("x/y", b"1")
    assert backend.delete("x/y") is True
    assert backend.load("x/y") is None and not backend.exists("x/y")
    assert backend.stat("x/y") is None
    assert backend.delete("x/y") is False


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/./b", "a/../b", "", "a b"])
def test_unusable_keys_are_refused(backend: Backend, key: str) -> None:
    with pytest.raises(ValueError, match="unusable storage key"):
        backend.store(key, b"x")


def test_reserved_keys_are_refused(backend: Backend) -> None:
    with pytest.raises(ValueError, match="data_dir's own"):
        backend.store("locks/x", b"x")


def test_overwrite_is_atomic(backend: Backend) -> None:
    """A reader racing a writer sees one whole value or the other, never a mix."""
    old, new = b"o" * 300_000, b"n" * 300_001
    key = keys.cert("race.test")
    backend.store(key, old)
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            backend.store(key, new)
            backend.store(key, old)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        seen = {backend.load(key) for _ in range(200)}
    finally:
        stop.set()
        writer.join()
    assert seen <= {old, new}


# -- locks ------------------------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from certs.storage import FileBackend
    from certs.storage.redis import RedisBackend
    kind, where, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
    backend = FileBackend(Path(where)) if kind == "file" else RedisBackend(where)
    lock = backend.lock("shared.test", ttl=ttl, timeout=10)
    print("locked", flush=True)
    sys.stdin.readline()
    print("lost" if lock.lost.is_set() else "kept", flush=True)
    backend.unlock("shared.test")
    print("released", flush=True)
    """
)


def start_holder(made: Made, ttl: float = 60.0) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, made.kind, made.where, str(ttl)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_excludes_another_process(made: Made, backend: Backend) -> None:
    proc = start_holder(made)
    try:
        with pytest.raises(LockTimeout) as info:
            backend.lock("shared.test", timeout=0.3)
        assert f"pid {proc.pid}" in str(info.value)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "kept"
        assert proc.stdout.readline().strip() == "released"
        with locked(backend, "shared.test", timeout=2) as lock:
            assert not lock.lost.is_set()
        # Other names were never blocked.
        with locked(backend, "other.test", timeout=0):
            pass
    finally:
        proc.kill()
        proc.wait(5)


def test_lock_excludes_another_thread(backend: Backend) -> None:
    order: list[str] = []
    with locked(backend, "t.test"):
        thread = threading.Thread(
            target=lambda: (backend.lock("t.test", timeout=5), order.append("second"))
        )
        thread.start()
        time.sleep(0.3)
        order.append("first done")
    thread.join(5)
    backend.unlock("t.test")
    assert order == ["first done", "second"]


def test_lock_of_a_killed_holder_is_free_after_its_ttl(made: Made, backend: Backend) -> None:
    ttl = 2.0
    proc = start_holder(made, ttl=ttl)
    proc.send_signal(signal.SIGKILL)  # no unlock, no cleanup
    proc.wait(5)
    killed = time.monotonic()
    if made.kind == "redis":
        # Still held: nobody released it; only its expiry frees it.
        with pytest.raises(LockTimeout):
            backend.lock("shared.test", timeout=0.2)
    backend.lock("shared.test", timeout=ttl + 3)
    waited = time.monotonic() - killed
    backend.unlock("shared.test")
    # The file backend's flock is dropped by the kernel at once: its ttl is moot.
    assert waited < (ttl + 3 if made.kind == "redis" else 1.0)


def test_refresh_keeps_a_long_holders_lock(made: Made, backend: Backend) -> None:
    """Held three times its ttl: still held (refreshed in the background), never lost."""
    ttl = 0.6
    proc = start_holder(made, ttl=ttl)
    try:
        time.sleep(3 * ttl)
        with pytest.raises(LockTimeout):
            backend.lock("shared.test", timeout=ttl)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "kept"
    finally:
        proc.kill()
        proc.wait(5)


def test_a_lost_lock_is_noticed_and_not_released(redis_server: RedisServer) -> None:
    redis_server.cli("FLUSHALL")
    backend = RedisBackend(redis_server.url)
    try:
        lock = backend.lock("lost.test", ttl=0.6)
        # As if it had expired while the holder stalled, and another instance took it.
        redis_server.cli("SET", "tlsproxy:lock:lost.test", "someone else")
        assert eventually(lock.lost.is_set, timeout=3)
        with pytest.raises(LockLost, match=r"lost\.test"):
            lock.check()
        backend.unlock("lost.test")
        assert redis_server.cli("GET", "tlsproxy:lock:lost.test").strip() == "someone else"
    finally:
        backend.close()


# -- change notifications ---------------------------------------------------------------------
def test_changes_are_notified(made: Made, backend: Backend) -> None:
    seen: list[str] = []
    watcher = made.open(poll_interval=0.2) if made.kind == "file" else made.open()
    subscription = watcher.subscribe("certificates", seen.append)
    try:
        backend.store(keys.cert("a.test"), CERT_PEM)  # another instance writes
        backend.store(keys.CA_ROOT_CERT, CERT_PEM)  # not under the prefix
        assert eventually(lambda: keys.cert("a.test") in seen)
        backend.delete(keys.cert("a.test"))
        assert eventually(lambda: seen.count(keys.cert("a.test")) == 2)
        time.sleep(0.5)
        assert keys.CA_ROOT_CERT not in seen
    finally:
        subscription.close()
        watcher.close()


# -- encryption -------------------------------------------------------------------------------
@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "storage.secret"
    path.write_bytes(os.urandom(32).hex().encode() + b"\n")
    return path


def test_values_are_stored_encrypted(backend: Backend, secret_file: Path) -> None:
    encrypted = EncryptedBackend(backend, read_secret(secret_file))
    key = keys.private_key("app.test")
    encrypted.store(key, KEY_PEM)
    encrypted.store(keys.cert("app.test"), CERT_PEM)
    raw = backend.load(key)
    assert raw is not None and KEY_PEM not in raw and b"PRIVATE KEY" not in raw
    assert encrypted.load(key) == KEY_PEM
    # Every value, so that none can be planted: certificates, tokens, a CA root.
    assert backend.load(keys.cert("app.test")) != CERT_PEM
    assert encrypted.load(keys.cert("app.test")) == CERT_PEM
    # A value moved under another key does not decrypt: the key is authenticated with it.
    backend.store(keys.private_key("other.test"), raw)
    with pytest.raises(StorageError, match="does not decrypt"):
        encrypted.load(keys.private_key("other.test"))
    # A plain value planted in the store is refused, not served.
    for planted in (keys.CA_ROOT_KEY, keys.CA_ROOT_CERT, keys.http01_token("planted")):
        backend.store(planted, KEY_PEM)
        with pytest.raises(StorageError, match="unencrypted"):
            encrypted.load(planted)


def test_a_wrong_secret_fails_clearly(backend: Backend, tmp_path: Path, secret_file: Path) -> None:
    EncryptedBackend(backend, read_secret(secret_file)).store(keys.CA_ROOT_KEY, KEY_PEM)
    other = tmp_path / "other.secret"
    other.write_bytes(os.urandom(32))
    with pytest.raises(StorageError, match=r"ca/root.key does not decrypt: a different"):
        EncryptedBackend(backend, read_secret(other)).load(keys.CA_ROOT_KEY)


def test_unusable_secret_files(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abcd\n")
    with pytest.raises(StorageError, match=r"short: not an encryption key: expected 32 bytes"):
        read_secret(short)
    with pytest.raises(StorageError, match=r"missing: cannot read the encryption key"):
        read_secret(tmp_path / "missing")
    b64 = tmp_path / "b64"
    b64.write_text("q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4k=\n")
    assert len(read_secret(b64)) == 32


def test_open_backend_from_settings(redis_server: RedisServer, tmp_path: Path) -> None:
    file = open_backend(StorageSettings(), tmp_path)
    assert isinstance(file, FileBackend) and file.root == tmp_path
    redis = open_backend(StorageSettings(backend="redis", url=redis_server.url), tmp_path)
    try:
        assert redis.describe() == (
            f"redis storage redis://:***@127.0.0.1:{redis_server.port}/0 (prefix 'tlsproxy')"
        )
    finally:
        redis.close()


# -- Redis faults -----------------------------------------------------------------------------
def test_wrong_password_is_a_clear_error(redis_server: RedisServer) -> None:
    for url in (
        redis_server.url.replace(PASSWORD, "wrong"),
        redis_server.url.replace(f":{PASSWORD}@", ""),
    ):
        backend = RedisBackend(url)
        try:
            with pytest.raises(StorageError) as info:
                backend.load("x")
        finally:
            backend.close()
        message = str(info.value)
        assert "wrong" not in message.split("load x")[0].replace("***", "")
        assert f"127.0.0.1:{redis_server.port}" in message and "load x" in message
        assert "auth" in message.lower() or "password" in message.lower()


def test_rediss_with_a_private_ca(tmp_path: Path) -> None:
    """rediss:// (TLS), the server's CA named in the URL; without it, a clear refusal."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    chain, key, ca_file = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(chain))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    server = RedisServer(tmp_path / "redis", tls=(chain, key))
    server.start()
    try:
        backend = RedisBackend(f"{server.url}?ssl_ca_certs={ca_file}")
        try:
            backend.store("over/tls", b"yes")
            assert backend.load("over/tls") == b"yes"
        finally:
            backend.close()
        untrusting = RedisBackend(server.url)
        try:
            with pytest.raises(StorageError, match="certificate verify failed"):
                untrusting.load("over/tls")
        finally:
            untrusting.close()
    finally:
        server.stop()


def test_redis_stopped_then_started(tmp_path: Path) -> None:
    """While Redis is down every call fails fast with one clear line; once it is back the
    same backend works again, and subscribers learn that they may have missed changes."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    backend = RedisBackend(server.url)
    watcher = RedisBackend(server.url)
    seen: list[str] = []
    subscription = watcher.subscribe("certificates", seen.append)
    try:
        backend.store(keys.cert("a.test"), CERT_PEM)
        assert eventually(lambda: seen == [keys.cert("a.test")])
        server.stop()
        for call in (
            lambda: backend.load(keys.cert("a.test")),
            lambda: backend.store(keys.cert("a.test"), CERT_PEM),
            lambda: backend.list("", recursive=True),
            lambda: backend.lock("down.test", timeout=1),
        ):
            started = time.monotonic()
            with pytest.raises(StorageError) as info:
                call()
            assert time.monotonic() - started < 10
            message = str(info.value)
            assert message.startswith(f"redis storage redis://:***@127.0.0.1:{server.port}/0")
            assert PASSWORD not in message and "\n" not in message
        server.start()  # same port, empty (nothing was saved)
        assert backend.load(keys.cert("a.test")) is None
        backend.store(keys.cert("b.test"), CERT_PEM)
        assert backend.load(keys.cert("b.test")) == CERT_PEM
        with locked(backend, "up.test", timeout=1):
            pass
        # The subscriber reconnected and says "look again" (the prefix): b.test may have been
        # stored before it did. Then changes arrive one by one as before.
        assert eventually(lambda: "certificates" in seen, 10)
        backend.store(keys.cert("c.test"), CERT_PEM)
        assert eventually(lambda: keys.cert("c.test") in seen)
    finally:
        subscription.close()
        watcher.close()
        backend.close()
        server.stop()


# -- the file backend and the data_dir API the managers use today ------------------------------
def test_the_file_backend_sees_what_the_managers_store(tmp_path: Path) -> None:
    """Storage (paths) and FileBackend (keys) share one layout and one set of locks: what a
    manager saves is what `storage copy` moves, and their locks exclude each other."""
    storage, backend = Storage(tmp_path), FileBackend(tmp_path)
    storage.save_certificate("*.a.test", CERT_PEM, KEY_PEM)
    storage.save_state("*.a.test", {"failures": 1})
    assert backend.load(keys.cert("*.a.test")) == CERT_PEM
    assert backend.load(keys.private_key("*.a.test")) == KEY_PEM
    assert backend.list("certificates", recursive=True) == [
        "certificates/wildcard_.a.test/cert.pem",
        "certificates/wildcard_.a.test/key.pem",
        "certificates/wildcard_.a.test/state.json",
    ]
    backend.store(keys.CA_ROOT_CERT, CERT_PEM)
    assert storage.read(storage.ca_files().root_cert) == CERT_PEM
    with storage.lock("*.a.test"):
        with pytest.raises(LockTimeout):
            backend.lock("*.a.test", timeout=0.1)
    with locked(backend, keys.CA_LOCK):
        with pytest.raises(LockTimeout):
            with storage.lock("local-ca", timeout=0.1):
                pass
    # Lock files and the runtime directory are data_dir's own, not keys.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tlsproxy.pid").write_text("1")
    assert backend.list("", recursive=False) == ["ca", "certificates"]


# -- HTTP-01 tokens shared by the instances ------------------------------------------------------
def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)


def test_every_instance_answers_a_token_another_published(
    redis_server: RedisServer, secret_file: Path
) -> None:
    """Two instances' responders on one real Redis: what one publishes the other answers,
    until it is withdrawn; with encryption on, a token planted in the clear is never served."""
    prefix = f"tokens{os.getpid()}"
    secret = read_secret(secret_file)
    raw = RedisBackend(redis_server.url, prefix)
    ours, theirs = (
        Http01Responder(EncryptedBackend(RedisBackend(redis_server.url, prefix), secret))
        for _ in range(2)
    )
    for responder in (ours, theirs):
        responder.share()
    try:
        asyncio.run(ours.publish("tok-1", "tok-1.thumbprint"))
        wait_for(lambda: theirs.lookup("tok-1") == "tok-1.thumbprint")
        asyncio.run(ours.withdraw("tok-1"))
        wait_for(lambda: theirs.lookup("tok-1") is None)
        # Whoever can write to the Redis without the secret cannot make us answer for them.
        raw.store(keys.http01_token("planted"), b"planted.their-account")
        asyncio.run(ours.publish("tok-2", "tok-2.thumbprint"))  # a later change, seen after it
        wait_for(lambda: theirs.lookup("tok-2") is not None)
        assert theirs.lookup("planted") is None and ours.lookup("planted") is None
    finally:
        for responder in (ours, theirs):
            responder.close()
        raw.close()
