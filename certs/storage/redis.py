"""The `redis` backend: one store shared by several instances (redis-py, synchronous).

Layout under the configured prefix (so that several clusters can share one Redis):
    <prefix>:data:<key>    the value, stored whole with SET
    <prefix>:meta:<key>    a hash {size, modified} for stat(), written in the same MULTI
    <prefix>:lock:<name>   a lock: a random token, SET NX PX ttl, refreshed by its holder
    <prefix>:changes       the pub/sub channel: the key, on every store and delete

A lock's holder refreshes it every ttl/3 from a thread, by a compare-and-pexpire script;
unlock is a compare-and-delete script, so a holder that lost its lock (expired while it was
stalled) never deletes the next holder's. A holder killed stops refreshing: the lock expires
after ttl. Keys come from certs.storage.keys, which allows no glob character in them; SCAN
patterns escape them all the same.

Synchronous like the contract (certs.storage.contract says why): redis-py's blocking client,
whose connection pool is safe to share between the worker threads that call it. A call fails
with StorageError within seconds when Redis is down; the next call after it is back reconnects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..errors import LockTimeout
from . import keys
from .contract import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_LOCK_TTL,
    ChangeCallback,
    KeyInfo,
    Lock,
    StorageError,
    notify,
    redact_url,
)

log = logging.getLogger("tlsproxy.certs")

# A down Redis should fail a call within seconds (callers back off and retry), not hang it.
CONNECT_TIMEOUT = 3.0
SOCKET_TIMEOUT = 5.0

_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisBackend:
    """The storage contract over Redis (certs.storage.contract.Backend)."""

    kind = "redis"

    def __init__(self, url: str, prefix: str = "tlsproxy") -> None:
        self.url = url
        self.prefix = prefix
        try:
            self.client = redis.Redis.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT,
                health_check_interval=30,
                # One quick retry for a dropped connection (Redis restarted); no long backoff.
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), 1),
            )
        except ValueError as e:
            raise StorageError(f"{redact_url(url)}: not a Redis URL ({e})") from None
        self._refresh_script = self.client.register_script(_REFRESH)
        self._release_script = self.client.register_script(_RELEASE)
        self._held: dict[str, _Holder] = {}
        self._held_guard = threading.Lock()
        self.channel = f"{prefix}:changes"

    def describe(self) -> str:
        return f"redis storage {redact_url(self.url)} (prefix {self.prefix!r})"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as e:
            raise StorageError(f"{self.describe()}: {what}: {e}") from None

    def _data(self, key: str) -> str:
        return f"{self.prefix}:data:{keys.check_key(key)}"

    def _meta(self, key: str) -> str:
        return f"{self.prefix}:meta:{keys.check_key(key)}"

    # -- values --------------------------------------------------------------------------
    def store(self, key: str, value: bytes) -> None:
        with self._errors(f"store {key}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._data(key), value)
            pipe.hset(self._meta(key), mapping={"size": len(value), "modified": time.time()})
            pipe.publish(self.channel, key)
            pipe.execute()

    def load(self, key: str) -> bytes | None:
        with self._errors(f"load {key}"):
            return self.client.get(self._data(key))

    def delete(self, key: str) -> bool:
        with self._errors(f"delete {key}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self._data(key), self._meta(key))
            pipe.publish(self.channel, key)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def exists(self, key: str) -> bool:
        with self._errors(f"exists {key}"):
            return bool(self.client.exists(self._data(key)))

    def stat(self, key: str) -> KeyInfo | None:
        with self._errors(f"stat {key}"):
            meta = self.client.hgetall(self._meta(key))
            if meta:
                return KeyInfo(key, int(meta[b"size"]), float(meta[b"modified"]), True)
            # A "directory": some key lives under it.
            for _ in self._scan(key + "/"):
                return KeyInfo(key, 0, 0.0, False)
        return None

    def _scan(self, key_prefix: str) -> Iterator[str]:
        """Every key starting with `key_prefix` ("" for all)."""
        start = f"{self.prefix}:data:"
        pattern = _glob_escape(start + key_prefix) + "*"
        for name in self.client.scan_iter(match=pattern, count=1000):
            yield name.decode()[len(start) :]

    def list(self, prefix: str, recursive: bool) -> list[str]:
        prefix = keys.check_prefix(prefix).rstrip("/")
        below = prefix + "/" if prefix else ""
        found = set()
        with self._errors(f"list {prefix or '(all)'}"):
            for key in self._scan(below):
                if not recursive:
                    head = key[len(below) :].split("/", 1)[0]
                    key = below + head
                found.add(key)
        return sorted(found)

    # -- locks ---------------------------------------------------------------------------
    def _lock_key(self, name: str) -> str:
        return f"{self.prefix}:lock:{keys.safe_name(name)}"

    def lock(
        self, name: str, ttl: float = DEFAULT_LOCK_TTL, timeout: float = DEFAULT_LOCK_TIMEOUT
    ) -> Lock:
        lock_key = self._lock_key(name)
        # Who holds it, for another waiter's timeout error; the random part makes it ours alone.
        token = f"{os.getpid()} on {socket.gethostname()} {secrets.token_hex(16)}"
        ttl_ms = max(1, int(ttl * 1000))
        deadline = time.monotonic() + timeout
        pause = 0.05
        while True:
            with self._errors(f"lock {name}"):
                if self.client.set(lock_key, token, nx=True, px=ttl_ms):
                    break
                holder = self.client.get(lock_key)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                who = holder.decode(errors="replace").rsplit(" ", 1)[0] if holder else None
                raise LockTimeout(lock_key, who, timeout)
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.5)
        holder = _Holder(self, Lock(name, ttl), lock_key, token, ttl_ms)
        with self._held_guard:
            self._held[name] = holder
        return holder.lock

    def unlock(self, name: str) -> None:
        with self._held_guard:
            holder = self._held.pop(name, None)
        if holder is None:
            return
        holder.stop()
        try:
            self._release_script(keys=[holder.lock_key], args=[holder.token])
        except redis.RedisError as e:
            # It expires by itself after its ttl; unlock runs in `finally` blocks, where an
            # exception would hide the one that matters.
            log.warning("%s: unlock %s: %s (it expires by itself)", self.describe(), name, e)

    # -- changes -------------------------------------------------------------------------
    def subscribe(self, prefix: str, callback: ChangeCallback) -> _Subscriber:
        return _Subscriber(self, keys.check_prefix(prefix).rstrip("/"), callback)

    def close(self) -> None:
        for name in list(self._held):
            self.unlock(name)
        self.client.close()


class _Holder:
    """Keeps one lock alive: refresh every ttl/3; `lost` once it cannot be sure it holds it
    (taken over, or no successful refresh for a whole ttl)."""

    def __init__(
        self, backend: RedisBackend, lock: Lock, lock_key: str, token: str, ttl_ms: int
    ) -> None:
        self.backend = backend
        self.lock = lock
        self.lock_key = lock_key
        self.token = token
        self.ttl_ms = ttl_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"storage-lock:{lock.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        ttl = self.ttl_ms / 1000
        confirmed = time.monotonic()
        while not self._stop.wait(ttl / 3):
            try:
                kept = self.backend._refresh_script(
                    keys=[self.lock_key], args=[self.token, self.ttl_ms]
                )
            except redis.RedisError as e:
                if time.monotonic() - confirmed < ttl:
                    continue
                reason = f"no refresh for {ttl:g}s ({e})"
            else:
                if kept:
                    confirmed = time.monotonic()
                    continue
                reason = "expired or taken by another holder"
            log.warning("%s: lock %s lost: %s", self.backend.describe(), self.lock.name, reason)
            self.lock.lost.set()
            return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


class _Subscriber:
    """Listens on the changes channel in a thread; reconnects by itself. After a gap (Redis
    down or restarted) it calls back with the prefix itself: changes may have been missed."""

    def __init__(self, backend: RedisBackend, prefix: str, callback: ChangeCallback) -> None:
        self._backend = backend
        self._prefix = prefix
        self._callback = callback
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"storage-subscribe:{prefix}", daemon=True
        )
        self._thread.start()
        # Changes made after subscribe() returns are seen when Redis is up; when it is down,
        # the first successful subscription calls back with the prefix.
        self._ready.wait(CONNECT_TIMEOUT + 1)

    def _wanted(self, key: str) -> bool:
        p = self._prefix
        return not p or key == p or key.startswith(p + "/")

    def _run(self) -> None:
        missed = False
        while not self._stop.is_set():
            pubsub = self._backend.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._backend.channel)
                self._ready.set()
                if missed:
                    notify(self._callback, self._prefix)
                    missed = False
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message["type"] == "message":
                        key = message["data"].decode(errors="replace")
                        if self._wanted(key):
                            notify(self._callback, key)
            except redis.RedisError as e:
                if not missed:
                    log.warning("%s: change notifications: %s", self._backend.describe(), e)
                missed = True
                self._ready.set()
                self._stop.wait(1.0)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
