"""AcmeManager: keeps the certificates of `tls = "acme"` sites ordered and renewed.

One asyncio task per certificate (an order that waits for DNS propagation never holds up
another site), each a loop: read storage -> install what is there -> decide (acme_state.decide,
pure) -> sleep until due -> take the storage lock without waiting -> read storage again (another
proxy on the same data_dir may have just renewed it) -> order (AcmeIssuer; every ACME request
in a worker thread) -> save atomically (previous version kept) -> swap into the cache (new
handshakes get it; open connections keep theirs). A failure is logged with the CA's words and
recorded in state.json, the old certificate keeps being served, and the next attempt waits
longer each time.

maintain() is cancelled and started again with new specs on every reload: everything it holds
(the storage lock, HTTP-01 tokens, DNS records) is given back in `finally` blocks, and a worker
thread still inside the `acme` library stops at its next request (a threading.Event).

request_renewal() (`tlsproxy certs renew HOST`) wakes one certificate's task and makes its next
pass order whatever the schedule says: the failure back-off is skipped (the person asking has
usually just fixed the cause), the CA's Retry-After is not. It returns at once; the order runs in
the task as a scheduled one would, so its result reaches the log and state.json the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from .acme_state import AcmeState, Decision, decide, forced_decision
from .cache import CertificateCache
from .challenges.http01 import Http01Responder
from .errors import CertError, LockTimeout
from .issuers.acme import AcmeError, AcmeIssuer, AcmeSettings
from .keys import cert_info, key_matches_certificate, load_certificates, load_private_key
from .manager import build_context, describe_error, read_stored, with_storage_error
from .models import CertInfo, CertSpec, CertStatus, Installed
from .renewal import DEFAULT_RATIO, RETRY_BASE, RETRY_CAP
from .selection import uncovered_hosts
from .storage import Storage, StorageError, StoredCertificate, safe_name
from .x509_lite import leaf_info

log = logging.getLogger("tlsproxy.certs.acme")

ContextFactory = Callable[[Path, Path], ssl.SSLContext]


@dataclass(frozen=True)
class _Stored:
    files: StoredCertificate
    info: CertInfo


@dataclass(frozen=True)
class RenewalRequest:
    """What request_renewal() did: `under_way` when an order for the name was already running
    (it answers the request; no second order is queued), `not_before` when the CA's
    Retry-After holds the order back until then (epoch seconds)."""

    name: str
    directory: str
    under_way: bool = False
    not_before: float | None = None


class AcmeManager:
    def __init__(
        self,
        data_dir: Path,
        settings: AcmeSettings,
        context_factory: ContextFactory,
        http01: Http01Responder,
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        ratio: float = DEFAULT_RATIO,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
        check_interval: float = 3600.0,
        lock_busy_delay: float = 10.0,
        storage: Storage | None = None,
    ) -> None:
        self.storage = storage if storage is not None else Storage(Path(data_dir))
        self.settings = settings
        self.issuer = AcmeIssuer(settings, self.storage, http01)
        self._context_factory = context_factory
        self._clock = clock
        self._rng = rng
        self.ratio = ratio
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        # The longest a task sleeps: bounds clock jumps, and notices what another proxy stored.
        self.check_interval = check_interval
        self.lock_busy_delay = lock_busy_delay
        # Per certificate name, for request_renewal(): the wake-up of its task, whether an
        # order was asked for and not yet started, and whether one is running.
        self._wake: dict[str, asyncio.Event] = {}
        self._forced: set[str] = set()
        # Failed orders per spec since this process started, for the metrics (the stored
        # state's count starts over after each success).
        self.renewal_failures: dict[str, int] = {}
        self._ordering: set[str] = set()
        # Consecutive failures to reach a shared store, for the back-off (_attempt).
        self._storage_failures = 0

    # -- `tlsproxy certs renew` --------------------------------------------------------------
    async def request_renewal(self, name: str) -> RenewalRequest:
        """Ask the task of the "acme" spec `name` to order now (from the loop running
        maintain()); returns without waiting for the order."""
        if name in self._ordering:
            log.info("%s: renewal requested while an order is under way: not ordering twice", name)
            return RenewalRequest(name, self.settings.directory, under_way=True)
        self._forced.add(name)
        wake = self._wake.get(name)
        if wake is not None:
            wake.set()
        # else its task has not started yet (maintain() was started or restarted by a reload a
        # moment ago): its first pass sees the request.
        state = await self._load_state_of(name)
        held = state.retry_after if (state.retry_after or 0) > self._clock() else None
        if held is None:
            log.info("%s: renewal requested (tlsproxy certs renew): ordering now", name)
        else:
            log.info(
                "%s: renewal requested; the CA asked to wait (Retry-After): ordering at %s",
                name,
                datetime.fromtimestamp(held, UTC).isoformat(),
            )
        return RenewalRequest(name, self.settings.directory, not_before=held)

    def look_again(self, safe_names: set[str]) -> None:
        """Another instance sharing the store stored certificates for these names
        (certs.storage.keys.safe_name): their tasks read storage again now."""
        for name, wake in list(self._wake.items()):
            if safe_name(name) in safe_names:
                wake.set()

    # -- the task --------------------------------------------------------------------------
    async def maintain(
        self, specs: Sequence[CertSpec], cache_getter: Callable[[], CertificateCache]
    ) -> None:
        """Runs until cancelled (returns at once when no spec is "acme")."""
        acme_specs = [s for s in specs if s.source == "acme"]
        if not acme_specs:
            return
        stop = threading.Event()
        try:
            async with asyncio.TaskGroup() as group:
                for spec in acme_specs:
                    group.create_task(
                        self._maintain_one(spec, cache_getter, stop), name=f"acme {spec.name}"
                    )
        finally:
            stop.set()

    async def _maintain_one(
        self, spec: CertSpec, cache_getter: Callable[[], CertificateCache], stop: threading.Event
    ) -> None:
        warned = False
        wake = self._wake[spec.name] = asyncio.Event()
        try:
            while True:
                wake.clear()  # a request arriving during this pass ends the sleep after it
                try:
                    stored = await asyncio.to_thread(self._read, spec)
                    if stored is None and not warned:
                        log.warning(
                            "no certificate yet for %s (%s): its TLS handshakes fail until the"
                            " ACME order completes",
                            spec.name,
                            ", ".join(spec.hosts),
                        )
                        warned = True
                    delay = await self._step(spec, stored, cache_getter, stop)
                except Exception as e:  # a bug, not a CA failure: keep the other sites going
                    log.exception("ACME maintenance of %s failed: %s", spec.name, describe_error(e))
                    delay = self.retry_base
                # A floor: no path may spin, whatever the clock or the state on disk say.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), max(0.05, delay))
        finally:
            if self._wake.get(spec.name) is wake:
                del self._wake[spec.name]

    async def _step(
        self,
        spec: CertSpec,
        stored: _Stored | None,
        cache_getter: Callable[[], CertificateCache],
        stop: threading.Event,
    ) -> float:
        """One pass; returns how long to sleep before the next."""
        if stored is not None:
            await self._install(spec, stored, cache_getter)
        loaded = state = await self._load_state(spec)
        if stored is not None:
            state = await self._refresh_ari(spec, stored, state, stop)
        now = self._clock()
        decision = self._decide(now, stored, spec, state)
        if spec.name in self._forced:
            decision = forced_decision(now, state)
        serial = stored.info.serial if stored else None
        if decision.at > now and state.decided(decision, serial) == loaded:
            return min(decision.at - now, self.check_interval)
        # Due, or something to record: both only under the lock, from what storage says then.
        return await self._attempt(spec, stored, state, cache_getter, stop)

    def _decide(
        self, now: float, stored: _Stored | None, spec: CertSpec, state: AcmeState
    ) -> Decision:
        return decide(
            now,
            stored.info if stored else None,
            spec.hosts,
            state,
            directory=self.settings.directory,
            ratio=self.ratio,
            base=self.retry_base,
            cap=self.retry_cap,
        )

    async def _attempt(
        self,
        spec: CertSpec,
        stored: _Stored | None,
        mine: AcmeState,
        cache_getter: Callable[[], CertificateCache],
        stop: threading.Event,
    ) -> float:
        """Under the storage lock: read storage and state again (another proxy on this
        data_dir may have renewed, failed or recorded something since), decide again, record
        the decision, and order when due. Every write of the state happens here, so that two
        proxies never overwrite each other's newer state with an older copy."""
        lock = self.storage.lock(spec.name, timeout=0)
        try:
            await _enter(lock)
        except LockTimeout as e:
            log.info(
                "%s: another process is ordering it (%s); looking again in %gs",
                spec.name,
                e,
                self.lock_busy_delay,
            )
            return self.lock_busy_delay
        except StorageError as e:
            # Nothing may be ordered that the other instances would not know about; what is
            # stored keeps being served. Each failure waits twice as long, up to retry_cap.
            self._storage_failures += 1
            delay = min(self.lock_busy_delay * 2 ** (self._storage_failures - 1), self.retry_cap)
            log.warning("%s: not renewing now (%s); trying again in %gs", spec.name, e, delay)
            return delay
        self._storage_failures = 0
        try:
            fresh = await asyncio.to_thread(self._read, spec)
            fresh_serial = fresh.info.serial if fresh else None
            if fresh_serial != (stored.info.serial if stored else None):
                log.info("%s: another process stored a new certificate; using it", spec.name)
                self._forced.discard(spec.name)  # a fresh certificate is what was asked for
                return 0.0
            loaded = state = await self._load_state(spec)
            if mine.ari_serial is not None and mine.ari_serial == fresh_serial:
                state = state.with_ari(mine.ari_serial, mine.ari_renewal_at, mine.ari_next_check)
            now = self._clock()
            decision = self._decide(now, fresh, spec, state)
            if spec.name in self._forced:
                decision = forced_decision(now, state)
            await self._save_state(spec, state, decision, fresh, loaded)
            if decision.at > now:
                return 0.0
            self._forced.discard(spec.name)
            self._ordering.add(spec.name)
            try:
                new = await self._order(spec, fresh, state, decision, stop)
            finally:
                self._ordering.discard(spec.name)
        finally:
            lock.__exit__(None, None, None)
        if new is not None:
            await self._install(spec, new, cache_getter)
        return 0.0

    async def _order(
        self,
        spec: CertSpec,
        stored: _Stored | None,
        state: AcmeState,
        decision: Decision,
        stop: threading.Event,
    ) -> _Stored | None:
        """Order, save, record; under the storage lock. None when it failed (logged)."""
        log.info(
            "ordering a certificate for %s (%s) from %s: %s",
            spec.name,
            ", ".join(spec.hosts),
            self.settings.directory,
            decision.reason,
        )
        started = self._clock()
        try:
            issued = await self.issuer.issue(spec.hosts, challenge=spec.challenge, stop=stop)
            _check_issued(spec, issued.chain_pem, issued.key_pem)
            files = await asyncio.to_thread(
                self.storage.save_certificate, spec.name, issued.chain_pem, issued.key_pem
            )
        except (CertError, OSError) as e:
            retry_after = e.retry_after if isinstance(e, AcmeError) else None
            await self._failed(spec, stored, state, started, describe_error(e), retry_after)
            return None
        except Exception as e:
            log.exception("unexpected error while ordering %s", spec.name)
            await self._failed(spec, stored, state, started, describe_error(e), None)
            return None
        new = _Stored(files, leaf_info(files.chain_pem))
        now = self._clock()
        state = state.succeeded(now, new.info.serial, self.settings.directory)
        await self._save_state(spec, state, self._decide(now, new, spec, state), new)
        log.info(
            "certificate for %s issued by %s: serial %x, valid until %s (%.1fs)",
            spec.name,
            new.info.issuer,
            new.info.serial,
            new.info.not_after.isoformat(),
            now - started,
        )
        return new

    async def _failed(
        self,
        spec: CertSpec,
        stored: _Stored | None,
        state: AcmeState,
        started: float,
        error: str,
        retry_after: float | None,
    ) -> None:
        state = state.failed(started, error, retry_after, self._rng())
        self.renewal_failures[spec.name] = self.renewal_failures.get(spec.name, 0) + 1
        now = self._clock()
        decision = self._decide(now, stored, spec, state)
        serving = (
            f"still serving serial {stored.info.serial:x} until {stored.info.not_after.isoformat()}"
            if stored is not None
            else "nothing to serve for it yet"
        )
        wait = max(0.0, decision.at - now)
        # After a failed `certs renew` the next attempt is the regular renewal, months away.
        next_attempt = (
            f"in {wait:.1f}s"
            if wait < 3600
            else f"at {datetime.fromtimestamp(decision.at, UTC).isoformat(timespec='seconds')}"
        )
        log.warning(
            "ACME order for %s failed (attempt %d; %s; next attempt %s): %s",
            spec.name,
            state.failures,
            serving,
            next_attempt,
            error,
        )
        await self._save_state(spec, state, decision, stored)

    # -- storage, cache --------------------------------------------------------------------
    def _read(self, spec: CertSpec) -> _Stored | None:
        found = read_stored(self.storage, spec.name)
        return None if found is None else _Stored(*found)

    async def _install(
        self, spec: CertSpec, stored: _Stored, cache_getter: Callable[[], CertificateCache]
    ) -> None:
        """Put the stored certificate in the cache unless it is already there; hosts it does
        not cover (a site that gained a name) are left out rather than served a wrong one."""
        current = cache_getter().get(spec.name)
        if current is not None and current.info.serial == stored.info.serial:
            return
        now = datetime.fromtimestamp(self._clock(), UTC)
        if stored.info.not_after <= now:
            return
        missing = set(uncovered_hosts(spec.hosts, stored.info.hosts))
        hosts = [h for h in spec.hosts if h not in missing]
        if not hosts:
            return
        context = await asyncio.to_thread(
            build_context,
            self._context_factory,
            self.storage,
            spec,
            stored.files.cert_path,
            stored.files.key_path,
        )
        installed = Installed(
            spec.name,
            context,
            stored.info,
            stored.files.cert_path,
            stored.files.key_path,
            spec.client_auth,
        )
        cache_getter().replace(installed, hosts)
        log.info(
            "serving certificate %x for %s (valid until %s)",
            stored.info.serial,
            ", ".join(hosts),
            stored.info.not_after.isoformat(),
        )

    async def _load_state(self, spec: CertSpec) -> AcmeState:
        return await self._load_state_of(spec.name)

    async def _load_state_of(self, name: str) -> AcmeState:
        return AcmeState.from_dict(await asyncio.to_thread(self.storage.load_state, name))

    async def _save_state(
        self,
        spec: CertSpec,
        state: AcmeState,
        decision: Decision,
        stored: _Stored | None,
        loaded: AcmeState | None = None,
    ) -> None:
        """Record the state and decision unless nothing changed since `loaded` was read."""
        serial = stored.info.serial if stored else None
        new = state.decided(decision, serial)
        if new == loaded:
            return
        data = new.to_dict()
        try:
            await asyncio.to_thread(self.storage.save_state, spec.name, data)
        except (OSError, StorageError) as e:
            log.warning("cannot record the ACME state of %s: %s", spec.name, e)

    async def _refresh_ari(
        self, spec: CertSpec, stored: _Stored, state: AcmeState, stop: threading.Event
    ) -> AcmeState:
        now = self._clock()
        serial = stored.info.serial
        if state.ari_serial == serial and (state.ari_next_check or 0) > now:
            return state
        try:
            answer = await self.issuer.renewal_info(stored.files.chain_pem, stop)
        except (CertError, OSError) as e:
            log.debug("no renewal info for %s: %s", spec.name, describe_error(e))
            return state.with_ari(serial, state.ari_renewal_at, now + self.check_interval)
        if answer is None:  # the CA has no ARI: the ratio decides; ask again much later
            return state.with_ari(serial, None, now + 24 * self.check_interval)
        at, next_check = answer
        return state.with_ari(serial, at, max(next_check, now + 60.0))

    # -- `tlsproxy certs` ------------------------------------------------------------------
    def status(self, specs: Sequence[CertSpec]) -> list[CertStatus]:
        """What the running proxy decided, read from storage (works from another process)."""
        result = []
        now = self._clock()
        for spec in specs:
            if spec.source != "acme":
                continue
            stored = self._read(spec)
            state = AcmeState.from_dict(self.storage.load_state(spec.name))
            serial = stored.info.serial if stored else None
            if state.next_renewal is not None and state.decided_for == serial:
                at, reason = state.next_renewal, state.reason or ""
            else:
                decision = self._decide(now, stored, spec, state)
                at, reason = decision.at, decision.reason
            info = stored.info if stored else None
            result.append(
                CertStatus(
                    name=spec.name,
                    hosts=spec.hosts,
                    source="acme",
                    issuer=info.issuer if info else None,
                    not_after=info.not_after if info else None,
                    next_renewal=datetime.fromtimestamp(at, UTC),
                    renewal_reason=reason,
                    last_error=state.last_error,
                )
            )
        return with_storage_error(self.storage, result)


async def _enter(lock: AbstractContextManager[None]) -> None:
    """Enter a storage lock in a worker thread; if we are cancelled meanwhile, the lock is
    released as soon as the thread got it, never left held."""
    task = asyncio.ensure_future(asyncio.to_thread(lock.__enter__))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:

        def release(t: asyncio.Future[None]) -> None:
            if not t.cancelled() and t.exception() is None:
                lock.__exit__(None, None, None)

        task.add_done_callback(release)
        raise


def _check_issued(spec: CertSpec, chain_pem: bytes, key_pem: bytes) -> None:
    """Never store what the CA got wrong: it would be served until the next renewal."""
    try:
        leaf: x509.Certificate = load_certificates(chain_pem)[0]
    except ValueError as e:
        raise AcmeError(f"{spec.name}: the CA returned no usable chain ({e})") from e
    if not key_matches_certificate(load_private_key(key_pem), leaf):
        raise AcmeError(f"{spec.name}: the issued certificate is not for our key")
    missing = uncovered_hosts(spec.hosts, cert_info(leaf).hosts)
    if missing:
        raise AcmeError(f"{spec.name}: the issued certificate lacks {', '.join(missing)}")
