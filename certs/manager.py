"""CertificateManager: from site specs to a cache of ready SSLContexts, kept fresh in the
background.

The order for every issuance (certmagic's maintain.go): check storage, take the lock for the
name, check storage again (another proxy on the same data_dir may have just renewed it), issue,
save atomically, then swap it into the cache. Issuance and all file I/O of the background task
run in worker threads; the event loop only decides and swaps.

With `isolate_crypto` (what `tlsproxy run` uses), nothing here imports `cryptography` (about
10 MiB of resident memory for the life of the proxy): the full validation of user files and
every local-CA issuance run in a short-lived child process (certs.crypto_worker) that writes
its result to storage; this process reads certificates with certs.x509_lite and leaves the
key/certificate match to the TLS library (`load_cert_chain`). Without it (the short CLI
commands, tests), the same steps run in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import broken
from .cache import CertificateCache
from .errors import CertError, CertificateFileError, IssuanceError, LockTimeout
from .files import (
    ENCRYPTED_KEY_REASON,
    check_hosts,
    check_validity,
    is_encrypted_key,
    read_file,
    read_info,
)
from .issuers import Issuer, RenewalInfoIssuer
from .models import CertInfo, CertSpec, CertStatus, ClientAuthSpec, Installed
from .renewal import (
    DEFAULT_JITTER,
    DEFAULT_LEAF_LIFETIME,
    DEFAULT_RATIO,
    RETRY_BASE,
    RETRY_CAP,
    AriWindow,
    needs_renewal,
    renewal_reason,
    renewal_time,
    retry_delay,
)
from .selection import normalize_host, uncovered_hosts
from .storage import Storage, StorageError, StoredCertificate, safe_name
from .x509_lite import leaf_info, pem_blocks

if TYPE_CHECKING:
    from .issuers.local_ca import LocalCA

log = logging.getLogger("tlsproxy.certs")

# (cert_file, key_file) or, for a site asking for client certificates, (cert_file, key_file,
# the CA file to verify them against).
ContextFactory = Callable[..., ssl.SSLContext]

FILES_REASON = "user files: replace them and reload (SIGHUP)"


@dataclass
class _Attempts:
    """Consecutive failures for one name; cleared by a success."""

    failures: int = 0
    next_attempt: float | None = None  # epoch seconds
    last_error: str | None = None


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _from_iso(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


Found = tuple[StoredCertificate, CertInfo]


def read_stored(storage: Storage, name: str) -> Found | None:
    """The stored certificate of `name` and its leaf's facts; None if there is none, or if what
    is stored is unusable (logged: it will be issued again)."""
    try:
        stored = storage.load_certificate(name)
        if stored is None:
            return None
        return stored, leaf_info(stored.chain_pem)
    except ValueError as e:
        log.warning("ignoring the stored certificate of %s: %s", name, e)
        return None


def from_current_local_ca(storage: Storage, chain_pem: bytes) -> bool:
    """Whether a stored chain was issued by the local CA's current intermediate.

    Compared as bytes, not by signature, so that no `cryptography` is needed. That is the same
    answer here: the local CA always stores [leaf, the intermediate that signed it] and only
    after checking what it issued (_check_issued); every new intermediate gets a new key, so a
    chain whose second certificate is not byte-for-byte the current intermediate was signed by
    another key (a CA since replaced, or another issuer), and one whose second certificate is
    was signed by the current key. Only someone who can write data_dir could make a chain that
    lies about it, and they could as well replace the CA itself.
    """
    current = storage.read(storage.ca_files().intermediate_cert)
    if current is None:
        return False
    try:
        blocks, intermediate = pem_blocks(chain_pem), pem_blocks(current)[0]
    except ValueError:
        return False
    return len(blocks) >= 2 and blocks[1] == intermediate


def client_ca_file(storage: Storage, client_auth: ClientAuthSpec) -> Path:
    """The file a site's client certificates are verified against."""
    if client_auth.ca == "internal":
        return storage.ca_files().root_cert
    return client_auth.ca


def build_context(
    factory: ContextFactory, storage: Storage, spec: CertSpec, cert_file: Path, key_file: Path
) -> ssl.SSLContext:
    """The context of one certificate; it also holds the client CA of a client_auth site, since
    OpenSSL verifies a client certificate with the store of the context the SNI callback
    switched to."""
    if spec.client_auth is None:
        return factory(cert_file, key_file)
    return factory(cert_file, key_file, client_ca_file(storage, spec.client_auth))


def check_client_ca(path: Path) -> None:
    """A client CA file that the TLS library will load: readable, PEM certificates only."""
    data = read_file(path)
    try:
        blocks = pem_blocks(data)
    except ValueError as e:
        raise CertificateFileError(path, f"not PEM certificates ({e})") from None
    if not blocks:
        raise CertificateFileError(path, "no PEM certificate in it")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError) as e:
        raise CertificateFileError(path, f"rejected by the TLS library ({e})") from None


def describe_error(error: BaseException) -> str:
    """One line for logs and `tlsproxy certs`: the message, with the type when it says little."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, CertError) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class CertificateManager:
    def __init__(
        self,
        data_dir: Path,
        context_factory: ContextFactory,
        *,
        clock: Callable[[], float] = time.time,
        leaf_lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
        renew_ratio: float = DEFAULT_RATIO,
        jitter_fraction: float = DEFAULT_JITTER,
        check_interval: float = 3600.0,
        lock_timeout: float = 600.0,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
        issuers: Mapping[str, Issuer] | None = None,
        isolate_crypto: bool = False,
        worker_timeout: float = 120.0,
        root_files: tuple[Path, Path] | None = None,
        storage: Storage | None = None,
    ) -> None:
        # data_dir, or data_dir as the working copy of a store shared with other instances.
        self.storage = storage if storage is not None else Storage(Path(data_dir))
        # A root the user brings (its certificate and key files), instead of one made here.
        self.root_files = root_files
        # Validation and local-CA issuance in a child process (certs.crypto_worker), so that
        # this one never imports `cryptography`. A child may wait for the lock first.
        self.isolate_crypto = isolate_crypto
        self.worker_timeout = worker_timeout
        self._context_factory = context_factory
        self._clock = clock
        self.leaf_lifetime = leaf_lifetime
        self.renew_ratio = renew_ratio
        self.jitter_fraction = jitter_fraction
        # The longest the background task sleeps: bounds the effect of clock jumps and notices
        # certificates another proxy renewed in a shared data_dir.
        self.check_interval = check_interval
        # Waiting for another process's lock: long, an ACME order can take minutes.
        self.lock_timeout = lock_timeout
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self._issuers: dict[str, Issuer] = dict(issuers or {})
        self._specs: dict[str, CertSpec] = {}
        self._attempts: dict[str, _Attempts] = {}
        # Failed attempts per spec since this process started, for the metrics (the stored
        # state's count starts over after each success).
        self.renewal_failures: dict[str, int] = {}
        self._ari: dict[str, tuple[int, AriWindow | None, float]] = {}
        self._local_ca: LocalCA | None = None
        # One per running maintain(): a reload may start a new one before the old one has
        # finished cancelling, so none of them may own a single shared attribute.
        self._wakers: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    # -- configuration -------------------------------------------------------------------
    def set_issuer(self, source: str, issuer: Issuer | None) -> None:
        """Register the issuer for a spec source other than "internal" (e.g. "acme")."""
        if issuer is None:
            self._issuers.pop(source, None)
        else:
            self._issuers[source] = issuer
        self._poke()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _ca(self) -> LocalCA:
        """The local CA, created if missing (and its intermediate renewed when due)."""
        from .issuers.local_ca import LocalCA

        self._local_ca = LocalCA.load_or_create(
            self.storage,
            leaf_lifetime=self.leaf_lifetime,
            clock=self._clock,
            lock_timeout=min(self.lock_timeout, 60.0),
            root_files=self.root_files,
        )
        return self._local_ca

    def _adopt_user_root(self) -> None:
        """A root the user brings takes the stored one's place before anything is compared
        with the stored intermediate (which then no longer chains to the root: leaves are
        issued again). Read without `cryptography` when isolated: only a change costs a child."""
        if self.root_files is None:
            return
        if not self.isolate_crypto:
            self._ca()
            return
        stored = self.storage.read(self.storage.ca_files().root_cert)
        try:
            same = stored is not None and (
                pem_blocks(stored)[:1] == pem_blocks(read_file(self.root_files[0]))[:1]
            )
        except ValueError:
            same = False
        if not same:
            from .crypto_worker import run_worker

            run_worker(self, "ca", {})

    def _ensure_local_ca(self) -> None:
        """The local CA's root must exist before a context can verify clients against it,
        even when no site takes its certificate from the local CA."""
        if self.isolate_crypto:
            if not self.storage.exists(self.storage.ca_files().root_cert):
                from .crypto_worker import run_worker

                run_worker(self, "ca", {})
        else:
            self._ca()

    def _issuer(self, spec: CertSpec) -> Issuer | None:
        if spec.source == "internal":
            return self._ca()
        return self._issuers.get(spec.source)

    def _managed(self, spec: CertSpec) -> bool:
        if spec.broken is not None:
            return False  # renewing it would repair it (certs.broken)
        return spec.source == "internal" or (
            spec.source != "files" and spec.source in self._issuers
        )

    # -- validate ------------------------------------------------------------------------
    def validate(self, specs: Sequence[CertSpec]) -> None:
        """Every file the specs name, the data directory and the local CA's files; raises the
        first CertError. Reads only."""
        for spec in specs:
            if spec.client_auth is not None and spec.client_auth.ca != "internal":
                check_client_ca(spec.client_auth.ca)
        if self.isolate_crypto:
            from .crypto_worker import run_worker

            run_worker(self, "validate", {"specs": specs})
            # The child checked with a plain context; the real factory (ciphers, security
            # level) may still refuse a key, and `check` would have said so.
            for spec in specs:
                if spec.source == "files":
                    self._load_files(spec, self._now())
            return
        from .issuers.local_ca import LocalCA, load_user_root

        now = self._now()
        if self.root_files is not None:
            load_user_root(self.root_files, now)
        stored_needed = False
        for spec in specs:
            if spec.source == "files":
                self._load_files(spec, now)
            else:
                stored_needed = True
        if stored_needed:
            self._check_data_dir()
            LocalCA.read_stored(self.storage)  # a damaged CA file is reported, not replaced

    def _check_data_dir(self) -> None:
        root = self.storage.root
        existing = root
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise CertificateFileError(existing, "data_dir: exists and is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            where = "not writable" if existing == root else f"not writable (to create {root})"
            raise CertificateFileError(existing, f"data_dir: {where}")
        for path in self.storage.remove_stale_temp_files():
            log.info("removed %s, left by a write that was interrupted", path)

    def _files_of(self, spec: CertSpec) -> tuple[Path, Path]:
        if spec.cert_file is None or spec.key_file is None:
            missing = spec.key_file or spec.cert_file or Path(spec.name)
            raise CertificateFileError(missing, "a files certificate needs both cert and key")
        return spec.cert_file, spec.key_file

    def _load_files(self, spec: CertSpec, now: datetime) -> Installed:
        cert_file, key_file = self._files_of(spec)
        if not self.isolate_crypto:
            from .files import load_key_pair

            info = load_key_pair(cert_file, key_file, spec.hosts, now).info
            context = self._context(spec, cert_file, key_file)
            return Installed(spec.name, context, info, cert_file, key_file, spec.client_auth)
        # The child validated these files with today's words (validate()); this is the check
        # without `cryptography` that the files did not change since: the TLS library refuses
        # a key that does not match, the rest is read here.
        info = read_info(cert_file, read_file(cert_file))
        if is_encrypted_key(read_file(key_file)):
            # OpenSSL would ask for the passphrase on the terminal.
            raise CertificateFileError(key_file, ENCRYPTED_KEY_REASON)
        context = self._context(spec, cert_file, key_file)
        check_validity(cert_file, info, now)
        check_hosts(cert_file, info, spec.hosts)
        return Installed(spec.name, context, info, cert_file, key_file, spec.client_auth)

    def _context(self, spec: CertSpec, cert_file: Path, key_file: Path) -> ssl.SSLContext:
        try:
            return build_context(self._context_factory, self.storage, spec, cert_file, key_file)
        except (ssl.SSLError, OSError) as e:
            raise CertificateFileError(cert_file, f"rejected by the TLS library ({e})") from None

    # -- load ----------------------------------------------------------------------------
    def load(self, specs: Sequence[CertSpec], default_name: str | None) -> CertificateCache:
        cache = CertificateCache()
        now = self._now()
        if any(s.source != "files" for s in specs):
            self._check_data_dir()
        if any(s.source == "internal" or s.client_auth is not None for s in specs):
            self._adopt_user_root()
        self._make_broken(specs, now)
        self._issue_due_in_one_child(specs, now)
        if any(s.client_auth is not None and s.client_auth.ca == "internal" for s in specs):
            self._ensure_local_ca()
        for spec in specs:
            installed = self._load_one(spec, now)
            if installed is not None:
                cache.replace(installed, spec.hosts)
        cache.set_default(_resolve_default(specs, default_name))
        self._specs = {s.name: s for s in specs}
        self._poke()
        return cache

    def _issue_due_in_one_child(self, specs: Sequence[CertSpec], now: datetime) -> None:
        """An isolated manager starts one crypto worker for all the local-CA leaves due at
        load, instead of one each (a child costs about 0.2 s: seven sites took 1.5 s to
        start). What it could not issue is tried again, and reported, one by one below."""
        internal = [s for s in specs if s.source == "internal" and s.broken is None]
        if not self.isolate_crypto or len(internal) < 2:
            return  # one child either way: the usual path
        due = []
        try:
            for spec in internal:
                stored = self._read_stored(spec)
                if stored is None or not self._good(spec, stored, now, renewing=True):
                    due.append(spec)
        except OSError:
            return  # the usual path reports it, naming the site
        if len(due) < 2:
            return
        from .crypto_worker import run_worker

        try:
            run_worker(self, "issue_many", {"specs": due})
        except CertError as e:
            log.debug("issuing %d certificates in one child failed (%s): one by one", len(due), e)

    def _load_one(self, spec: CertSpec, now: datetime) -> Installed | None:
        if spec.broken is not None:
            return self._load_broken(spec, now)
        if spec.source == "files":
            return self._load_files(spec, now)
        if spec.source == "internal":
            self.storage.reserve_state(spec.name)
            stored = None
            try:
                if not self.isolate_crypto:
                    self._ca()  # created, or its intermediate renewed, before it is compared
                stored = self._read_stored(spec)
                if stored is not None and self._good(spec, stored, now, renewing=True):
                    return self._install(spec, stored)
                return self._issue_locked(spec, None)
            except (OSError, IssuanceError, LockTimeout, StorageError) as e:
                if stored is not None and self._good(spec, stored, now, renewing=False):
                    # Due but still valid (a full disk, a CA hiccup): serve it, and let the
                    # maintenance loop retry with back-off, as a renewal in flight would.
                    self._renewal_failed(spec.name, e)
                    return self._install(spec, stored)
                raise CertificateFileError(self.storage.certificate_dir(spec.name), str(e)) from e
        self.storage.reserve_state(spec.name)
        stored = self._read_stored(spec)
        if stored is not None and self._good(spec, stored, now, renewing=False):
            return self._install(spec, stored)
        log.warning(
            "no usable certificate yet for %s (%s): handshakes for it fail until one is issued",
            spec.name,
            ", ".join(spec.hosts),
        )
        return None

    def _read_stored(self, spec: CertSpec) -> Found | None:
        return read_stored(self.storage, spec.name)

    # -- broken certificates (certs.broken): none of the checks above, never renewed --------
    def _stored_broken(self, spec: CertSpec, now: datetime) -> Found | None:
        """The stored broken certificate of `spec` if it is still broken in its one way."""
        assert spec.broken is not None
        found = read_stored(self.storage, broken.storage_name(spec.broken, spec.name))
        if found is None or not broken.still_broken(
            spec.broken,
            spec.hosts,
            found[0].chain_pem,
            now,
            intermediate_pem=self.storage.read(self.storage.ca_files().intermediate_cert),
            untrusted_intermediate_pem=self.storage.read(
                broken.untrusted_ca_files(self.storage).intermediate_cert
            ),
        ):
            return None
        return found

    def _make_broken(self, specs: Sequence[CertSpec], now: datetime) -> None:
        """Make the broken certificates that storage lacks or holds no longer broken (a
        not-yet-valid one come of age, a replaced intermediate), all in one crypto worker for
        an isolated manager: a test proxy with six of them starts in one child's time."""
        missing = [s for s in specs if s.broken is not None and not self._stored_broken(s, now)]
        if not missing:
            return
        try:
            if self.isolate_crypto:
                from .crypto_worker import run_worker

                run_worker(self, "broken", {"specs": missing})
            else:
                for spec in missing:
                    self.make_broken_and_save(spec)
        except (OSError, CertError) as e:
            names = ", ".join(s.name for s in missing)
            log.warning("broken certificates for %s not made: %s", names, describe_error(e))

    def _load_broken(self, spec: CertSpec, now: datetime) -> Installed | None:
        found = self._stored_broken(spec, now)
        if found is None:
            log.warning("no %s certificate for %s: handshakes for it fail", spec.broken, spec.name)
            return None
        return self._install(spec, found)

    def make_broken_and_save(self, spec: CertSpec) -> Found:
        """Blocking, under the lock of its storage name: the broken certificate another process
        has just stored, or a new one. Needs `cryptography` (here or in the crypto worker)."""
        from .issuers.broken import make_broken

        assert spec.broken is not None
        name, now = broken.storage_name(spec.broken, spec.name), self._now()
        local_ca = self._ca()  # first: a new intermediate makes stored ones unfit
        with self.storage.lock(name, timeout=self.lock_timeout):
            stored = self._stored_broken(spec, now)
            if stored is not None:
                return stored
            chain_pem, key_pem = make_broken(
                spec.broken,
                spec.hosts,
                local_ca,
                self.storage,
                now,
                lock_timeout=min(self.lock_timeout, 60.0),
            )
            saved = self.storage.save_certificate(name, chain_pem, key_pem)
        info = leaf_info(saved.chain_pem)
        log.info("made the %s certificate of %s: serial %x", spec.broken, spec.name, info.serial)
        return saved, info

    def _good(self, spec: CertSpec, found: Found, now: datetime, *, renewing: bool) -> bool:
        """Servable now (and, with `renewing`, not due either)."""
        stored, info = found
        if uncovered_hosts(spec.hosts, info.hosts) or not info.not_before <= now < info.not_after:
            return False
        if spec.source == "internal" and not from_current_local_ca(self.storage, stored.chain_pem):
            return False  # from a CA since replaced: clients trusting the new root reject it
        if not renewing:
            return True
        if self._outlives_lifetime(spec, info):
            return False
        return not needs_renewal(
            info.not_before,
            info.not_after,
            now,
            ratio=self.renew_ratio,
            ari_window=self._known_ari(spec.name, info.serial),
        )

    def _outlives_lifetime(self, spec: CertSpec, info: CertInfo) -> bool:
        """A local-CA leaf issued for longer than the leaf lifetime now configured. It is
        replaced instead of kept until due, so that shortening the lifetime takes effect at
        once. The slack covers the backdating every leaf gets (at most a tenth of it)."""
        if spec.source != "internal":
            return False
        slack = self.leaf_lifetime / 10 + timedelta(seconds=1)
        return info.not_after - info.not_before > self.leaf_lifetime + slack

    def _install(self, spec: CertSpec, found: Found) -> Installed:
        stored, info = found
        context = self._context(spec, stored.cert_path, stored.key_path)
        return Installed(
            spec.name, context, info, stored.cert_path, stored.key_path, spec.client_auth
        )

    def _issue_locked(self, spec: CertSpec, current_serial: int | None) -> Installed:
        """Blocking: check storage under the lock, issue if still needed, save, build the
        context. Runs in a worker thread from maintain(), inline from load()."""
        if self.isolate_crypto and spec.source == "internal":
            from .crypto_worker import run_worker

            reply = run_worker(self, "issue", {"spec": spec, "current_serial": current_serial})
            found = self._read_stored(spec)
            if found is None:
                raise IssuanceError(f"{spec.name}: the crypto worker stored no usable certificate")
            issuer_name, reused = reply["issuer"], reply["reused"]
        else:
            with self.storage.lock(spec.name, timeout=self.lock_timeout):
                found, issuer_name, reused = self.issue_and_save(spec, current_serial)
        installed = self._install(spec, found)
        if reused:
            log.info("%s: using the certificate another process stored", spec.name)
        else:
            log.info(
                "issued certificate for %s by %s: serial %x, valid until %s",
                spec.name,
                issuer_name,
                installed.info.serial,
                installed.info.not_after.isoformat(),
            )
        return installed

    def issue_and_save(self, spec: CertSpec, current_serial: int | None) -> tuple[Found, str, bool]:
        """Under the name's lock: what storage holds if another process has just stored a good
        one (then True), or a new certificate issued and saved. Needs `cryptography`: runs in
        this process, or in the crypto worker for an isolated manager."""
        from .keys import generate_private_key, make_csr, private_key_to_pem

        issuer = self._issuer(spec)
        if issuer is None:
            raise IssuanceError(f"{spec.name}: no issuer for source {spec.source!r}")
        stored = self._read_stored(spec)
        if (
            stored is not None
            and stored[1].serial != current_serial
            and self._good(spec, stored, self._now(), renewing=True)
        ):
            return stored, issuer.name, True
        key = generate_private_key()
        chain_pem = issuer.issue(spec, make_csr(key, spec.hosts))
        _check_issued(spec, chain_pem, key)
        saved = self.storage.save_certificate(spec.name, chain_pem, private_key_to_pem(key))
        return (saved, leaf_info(saved.chain_pem)), issuer.name, False

    # -- maintain ------------------------------------------------------------------------
    def _poke(self) -> None:
        """Wake maintain() early (new specs or issuers); callable from any thread."""
        for loop, wake in list(self._wakers):
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(wake.set)

    async def maintain(self, cache_getter: Callable[[], CertificateCache]) -> None:
        wake = asyncio.Event()
        waker = (asyncio.get_running_loop(), wake)
        self._wakers.add(waker)
        try:
            while True:
                wake.clear()
                try:
                    await self._maintain_once(cache_getter)
                    delay = self._next_delay(cache_getter())
                except Exception:
                    log.exception("certificate maintenance failed; trying again later")
                    delay = self.retry_base
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)
        finally:
            self._wakers.discard(waker)

    async def _maintain_once(self, cache_getter: Callable[[], CertificateCache]) -> None:
        for spec in list(self._specs.values()):
            if not self._managed(spec):
                continue
            installed = cache_getter().get(spec.name)
            await self._refresh_ari(spec, installed)
            if self._due_at(spec, installed) <= self._clock():
                await self._renew(spec, installed, cache_getter)

    def _due_at(self, spec: CertSpec, installed: Installed | None) -> float:
        attempts = self._attempts.get(spec.name)
        if attempts is not None and attempts.next_attempt is not None:
            return attempts.next_attempt
        if installed is None or self._outlives_lifetime(spec, installed.info):
            return float("-inf")
        window = self._known_ari(spec.name, installed.info.serial)
        return self._renewal_time(installed.info, window).timestamp()

    def _renewal_time(self, info: CertInfo, window: AriWindow | None) -> datetime:
        # Seeded by the serial: the same certificate always gets the same jitter, here and in
        # `tlsproxy certs` (another process).
        return renewal_time(
            info.not_before,
            info.not_after,
            ratio=self.renew_ratio,
            jitter_fraction=self.jitter_fraction,
            rng=random.Random(info.serial),
            ari_window=window,
        )

    def _next_delay(self, cache: CertificateCache) -> float:
        now = self._clock()
        soonest = now + self.check_interval
        for spec in self._specs.values():
            if self._managed(spec):
                soonest = min(soonest, self._due_at(spec, cache.get(spec.name)))
        # A floor keeps a certificate that is due again at once (e.g. lifetime shorter than
        # the clock's resolution) from spinning the loop.
        return max(0.05, soonest - now)

    async def _renew(
        self,
        spec: CertSpec,
        installed: Installed | None,
        cache_getter: Callable[[], CertificateCache],
    ) -> None:
        try:
            await self._renew_raising(spec, installed, cache_getter)
        except Exception as e:
            await asyncio.to_thread(self._renewal_failed, spec.name, e)

    async def _renew_raising(
        self,
        spec: CertSpec,
        installed: Installed | None,
        cache_getter: Callable[[], CertificateCache],
    ) -> Installed:
        serial = installed.info.serial if installed is not None else None
        new = await asyncio.to_thread(self._issue_locked, spec, serial)
        self._attempts.pop(spec.name, None)
        await asyncio.to_thread(self._save_state, spec.name)
        current = self._specs.get(spec.name)
        if current == spec:
            # A reload may have changed the spec meanwhile; then load() already installed one.
            cache_getter().replace(new, current.hosts)
        return new

    async def adopt_stored(
        self, safe_names: set[str], cache_getter: Callable[[], CertificateCache]
    ) -> None:
        """Serve what another instance sharing the store has just stored for these names
        (certs.storage.keys.safe_name) when it is not what this one serves."""
        now = self._now()
        for spec in list(self._specs.values()):
            if safe_name(spec.name) not in safe_names or not self._managed(spec):
                continue
            found = await asyncio.to_thread(self._read_stored, spec)
            installed = cache_getter().get(spec.name)
            if found is None or (installed and installed.info.serial == found[1].serial):
                continue
            if not await asyncio.to_thread(self._good, spec, found, now, renewing=False):
                continue
            new = await asyncio.to_thread(self._install, spec, found)
            if self._specs.get(spec.name) == spec:
                cache_getter().replace(new, spec.hosts)
                self._attempts.pop(spec.name, None)  # renewed elsewhere: nothing to retry
                log.info(
                    "serving certificate %x for %s, stored by another instance",
                    found[1].serial,
                    spec.name,
                )
        self._poke()

    async def renew_now(self, name: str, cache_getter: Callable[[], CertificateCache]) -> Installed:
        """Issue a fresh certificate for spec `name` now, whatever its renewal time, and serve
        it from the next handshake on (`tlsproxy certs renew`). Raises IssuanceError when the
        name has no issuer here, or what the issuance raised; a failure is also recorded
        and retried with back-off, as a scheduled renewal's would be."""
        spec = self._specs.get(name)
        if spec is not None and spec.broken is not None:
            raise IssuanceError(
                f"{name}: serves a deliberately broken certificate ({spec.broken}), never "
                "renewed; remove `broken` and reload (SIGHUP) for a good one"
            )
        if spec is None or not self._managed(spec):
            raise IssuanceError(f"{name}: no certificate this manager issues")
        try:
            return await self._renew_raising(spec, cache_getter().get(name), cache_getter)
        except Exception as e:
            await asyncio.to_thread(self._renewal_failed, spec.name, e)
            raise

    def _renewal_failed(self, name: str, error: BaseException) -> None:
        """Count the failure, schedule the retry, log it and record it for `tlsproxy certs`."""
        attempts = self._attempts.setdefault(name, _Attempts())
        attempts.failures += 1
        self.renewal_failures[name] = self.renewal_failures.get(name, 0) + 1
        delay = retry_delay(attempts.failures, base=self.retry_base, cap=self.retry_cap)
        attempts.next_attempt = self._clock() + delay
        attempts.last_error = describe_error(error)
        log.warning(
            "certificate for %s not renewed (attempt %d, next in %.0fs): %s",
            name,
            attempts.failures,
            delay,
            attempts.last_error,
            exc_info=not isinstance(error, CertError | OSError),
        )
        self._save_state(name)

    async def _refresh_ari(self, spec: CertSpec, installed: Installed | None) -> None:
        issuer = self._issuers.get(spec.source)
        if installed is None or not isinstance(issuer, RenewalInfoIssuer):
            return
        known = self._ari.get(spec.name)
        now = self._clock()
        if known and known[0] == installed.info.serial and now - known[2] < self.check_interval:
            return
        try:
            chain_pem = await asyncio.to_thread(installed.cert_file.read_bytes)
            window = await asyncio.to_thread(issuer.renewal_window, spec, chain_pem)
        except Exception as e:
            log.info("no renewal info for %s: %s", spec.name, describe_error(e))
            window = known[1] if known and known[0] == installed.info.serial else None
        self._ari[spec.name] = (installed.info.serial, window, now)

    def _known_ari(self, name: str, serial: int) -> AriWindow | None:
        known = self._ari.get(name)
        return known[1] if known and known[0] == serial else None

    def _save_state(self, name: str) -> None:
        attempts = self._attempts.get(name)
        state: dict[str, Any] = {}
        if attempts is not None:
            state = {
                "failures": attempts.failures,
                "next_attempt": _iso(attempts.next_attempt),
                "last_error": attempts.last_error,
            }
        known = self._ari.get(name)
        if known and known[1] is not None:
            state["ari"] = {"serial": known[0], "start": known[1][0].isoformat()}
            state["ari"]["end"] = known[1][1].isoformat()
        try:
            self.storage.save_state(name, state)
        except (OSError, StorageError) as e:
            log.warning("cannot record renewal state of %s: %s", name, e)

    # -- status and CA -------------------------------------------------------------------
    def status(self, specs: Sequence[CertSpec]) -> list[CertStatus]:
        now = self._now()
        return with_storage_error(self.storage, [self._status_one(spec, now) for spec in specs])

    def _status_one(self, spec: CertSpec, now: datetime) -> CertStatus:
        def line(info: CertInfo | None, nxt: datetime | None, reason: str, err: str | None):
            return CertStatus(
                spec.name,
                spec.hosts,
                spec.source,
                info.issuer if info else None,
                info.not_after if info else None,
                nxt,
                reason,
                err,
            )

        if spec.source == "files":
            from .files import load_key_pair

            try:
                cert_file, key_file = self._files_of(spec)
                info = load_key_pair(cert_file, key_file, spec.hosts, now).info
            except CertificateFileError as e:
                return line(None, None, FILES_REASON, str(e))
            return line(info, None, FILES_REASON, None)

        if spec.broken is not None:
            found = read_stored(self.storage, broken.storage_name(spec.broken, spec.name))
            reason = f"broken={spec.broken} (for tests), never renewed"
            return line(found[1] if found else None, None, reason, None)

        state = self.storage.load_state(spec.name)
        error = state.get("last_error") if isinstance(state.get("last_error"), str) else None
        try:
            stored = self.storage.load_certificate(spec.name)
        except ValueError as e:
            stored, error = None, error or str(e)
        info = leaf_info(stored.chain_pem) if stored else None
        failures = state.get("failures") if isinstance(state.get("failures"), int) else 0
        if failures:
            nxt = _from_iso(state.get("next_attempt"))
            return line(info, nxt, f"retry after {failures} failed attempt(s)", error)
        if info is None:
            return line(None, None, "not issued yet", error)
        if uncovered_hosts(spec.hosts, info.hosts):
            return line(info, now, "hosts changed", error)
        if self._outlives_lifetime(spec, info):
            return line(info, now, "longer than local_ca.leaf_lifetime", error)
        window = _stored_ari(state, info.serial)
        nxt = self._renewal_time(info, window)
        reason = renewal_reason(
            info.not_before, info.not_after, now, ratio=self.renew_ratio, ari_window=window
        )
        return line(info, nxt, reason, error)

    def local_ca_root_pem(self) -> bytes:
        return self._ca().root_pem


def with_storage_error(storage: Storage, statuses: list[CertStatus]) -> list[CertStatus]:
    """The statuses, each naming the shared store's failure when the last call to it failed
    (what they say then comes from data_dir's copy)."""
    if storage.last_error is None:
        return statuses
    error = f"storage: {storage.last_error}"
    return [
        replace(st, last_error=f"{st.last_error}; {error}" if st.last_error else error)
        for st in statuses
    ]


def _stored_ari(state: dict[str, Any], serial: int) -> AriWindow | None:
    ari = state.get("ari")
    if not isinstance(ari, dict) or ari.get("serial") != serial:
        return None
    start, end = _from_iso(ari.get("start")), _from_iso(ari.get("end"))
    return (start, end) if start and end else None


def _resolve_default(specs: Sequence[CertSpec], default_name: str | None) -> str | None:
    """`default_site` names a host; accept a spec name too."""
    if default_name is None:
        return None
    if any(s.name == default_name for s in specs):
        return default_name
    host = normalize_host(default_name)
    for spec in specs:
        if host in spec.hosts:
            return spec.name
    log.warning("default certificate %r matches no site; unknown names will fail", default_name)
    return default_name


def _check_issued(spec: CertSpec, chain_pem: bytes, key: Any) -> None:
    """Never store what the issuer got wrong: it would be served until the next renewal."""
    from .keys import key_matches_certificate, load_certificates

    try:
        leaf = load_certificates(chain_pem)[0]
        hosts = leaf_info(chain_pem).hosts
    except ValueError as e:
        raise IssuanceError(f"{spec.name}: issuer returned no usable chain ({e})") from e
    if not key_matches_certificate(key, leaf):
        raise IssuanceError(f"{spec.name}: issued certificate is not for our key")
    missing = uncovered_hosts(spec.hosts, hosts)
    if missing:
        raise IssuanceError(f"{spec.name}: issued certificate lacks {', '.join(missing)}")
