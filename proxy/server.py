"""The proxy's lifecycle: start-up, serving, SIGHUP reload, SIGTERM drain.

start-up: config and every file it names are checked before any socket is bound; certificates
are loaded (the local CA issues what is missing); listeners bound; background tasks started.
SIGHUP: the config is read again. If it is good, new connections get the new sites, upstreams and
certificates, while open connections finish with what they started with; if it is bad, the error
is logged and the running config stays. SIGTERM/SIGINT: stop accepting, let in-flight requests
finish within shutdown_grace, close the rest, exit 0. A second SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from certs.errors import CertError
from proxy.admin import AdminServer, Page
from proxy.certificates import (
    acme_settings,
    cert_specs,
    certificate_manager,
    check_config,
    default_cert_name,
    key_of_cert_error,
    leaf_lifetime,
    open_storage,
    root_files,
    uses_acme,
)
from proxy.config import AdminAddress, Config, Site, UpstreamConfig, UpstreamServer, load_config
from proxy.control import ControlError, ControlServer
from proxy.downstream.h2_connection import H2Protocol
from proxy.downstream.negotiated import NegotiatedProtocol
from proxy.downstream.redirect import RedirectProtocol
from proxy.errors import ConfigError, StartupError
from proxy.line_writer import LineWriter
from proxy.listeners import ConnectionRegistry, HttpsListener, bind_socket, close_plain_server
from proxy.logs import AccessLog, log, setup_logging
from proxy.metrics import (
    CONTENT_TYPE,
    CertificateSample,
    Metrics,
    Snapshot,
    UpstreamSample,
    read_process,
    render,
)
from proxy.state import ProxyState
from proxy.systemd import notify, notify_reloading, passed_sockets, runtime_directory
from proxy.tls import (
    CertificateSelector,
    normalize_server_name,
    offer_http2,
    server_context,
)
from proxy.trace import Tracer

if TYPE_CHECKING:
    from pathlib import Path

    from certs.acme_manager import AcmeManager
    from proxy.workers.supervisor import WorkerSupervisor

# With a shared store, how often to compare its certificates with data_dir's copies: the
# fallback for change notifications lost while Redis was away (they come within moments).
STORAGE_CHECK_INTERVAL = 10.0


class ProxyServer:
    def __init__(self, config: Config, trace: Sequence[str] = ()) -> None:
        self.config = config
        # `run --trace HOST`: which connections print the walk-through; kept across SIGHUP.
        self.tracer: Tracer | None = Tracer(trace) if trace else None
        self.config_path = config.source
        self.registry = ConnectionRegistry()
        self.access_writer: LineWriter | None = None
        self.access_log = self._access_log(config.server.access_log)
        # data_dir, or its working copy of a store shared with other instances ([storage]).
        self.storage = open_storage(config)
        # isolate_crypto: `cryptography` work runs in short-lived children (idle memory).
        self.certs = certificate_manager(config, isolate_crypto=True, storage=self.storage)
        self.selector: CertificateSelector | None = None
        self.state: ProxyState | None = None
        self.https_listeners: list[HttpsListener] = []
        self.plain_servers: list[asyncio.base_events.Server] = []
        self.background: dict[str, asyncio.Task] = {}
        self.http01 = None
        self.acme: AcmeManager | None = None  # keeps tls = "acme" certificates; renew asks it
        self.supervisors: dict[str, WorkerSupervisor] = {}
        self._workers_reload_running = False
        self._workers_reload_again = False
        self.stopping = asyncio.Event()
        self.draining = False
        self._reload_lock = asyncio.Lock()
        self._sigint_count = 0
        self.started_at = time.time()
        self.control = ControlServer(
            config.server.data_dir,
            {"renew": self._control_renew, "status": self._control_status},
        )
        # Counting starts with the admin endpoint: without it nobody could read the counts.
        self.metrics: Metrics | None = Metrics() if config.server.admin else None
        pages = {"/metrics": self._metrics_page, "/status": self._status_page}
        self.admin = AdminServer({**pages, "/certs": self._certs_page})

    # --- start-up -------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        check_config(config, isolate_crypto=True, storage=self.storage)
        offer_http2(config.server.http2)  # before any context is made
        # Nothing is served yet, so blocking here costs no client anything; it also keeps the
        # start-up's certificate work out of a worker thread's malloc arena (idle memory).
        try:
            cache = self.certs.load(cert_specs(config), default_cert_name(config))
        except CertError as exc:  # data_dir unusable, an issuance that failed: one line, exit 2
            raise ConfigError(key_of_cert_error(config, exc), str(exc)) from None
        _warn_broken(config)
        self.state = ProxyState.build(config, self.access_log, metrics=self.metrics)
        self.selector = CertificateSelector(cache, self.state.router)
        if uses_acme(config):
            await self._start_http01()
        await self._bind(config)
        try:
            if config.server.admin is not None:
                await self.admin.start(config.server.admin)
            await self._start_workers(config)
        except BaseException:
            await self.admin.stop()
            await self._stop_workers()
            for listener in self.https_listeners:
                listener.stop_accepting()
            for server in self.plain_servers:
                await close_plain_server(server)
            raise
        for listener in self.https_listeners:
            listener.start()
        for server in self.plain_servers:
            await server.start_serving()
        self._start_background(config)
        await self.control.start()
        for listener in self.https_listeners:
            log.info("listening https://%s", _sockname(listener.address))
        for server in self.plain_servers:
            for sock in server.sockets:
                log.info("listening http://%s (redirects to https)", _sockname(sock.getsockname()))

    async def _bind(self, config: Config) -> None:
        loop = asyncio.get_running_loop()
        socks = []
        passed = passed_sockets()
        try:
            for address in config.server.https:
                socks.append(("https", bind_socket(address, passed)))
            for address in config.server.http:
                socks.append(("http", bind_socket(address, passed)))
        except StartupError:
            for _, sock in socks:
                sock.close()
            raise
        finally:
            for sock in passed:
                log.warning(
                    "a socket passed by the service manager (%s) matches no listener in the "
                    "config: closing it",
                    _sockname(sock.getsockname()),
                )
                sock.close()
        assert self.selector is not None
        for kind, sock in socks:
            if kind == "https":
                listener = HttpsListener(
                    sock,
                    self.selector.context,
                    self._new_downstream,
                    self.registry,
                    handshake_timeout=lambda: self._limits().handshake_timeout,
                    max_connections=lambda: self._limits().max_connections,
                    selector=self.selector,
                )
                listener.metrics = self.metrics
                listener.tracer = self.tracer
                self.https_listeners.append(listener)
        https_port = self.https_listeners[0].address[1]
        for kind, sock in socks:
            if kind == "http":
                server = await loop.create_server(
                    lambda: self._new_redirect(https_port), sock=sock, start_serving=False
                )
                self.plain_servers.append(server)

    def _access_log(self, fmt: str) -> AccessLog:
        """The access log for a config; all of them share one writer to stdout."""
        if fmt != "off" and self.access_writer is None:
            self.access_writer = LineWriter(sys.stdout.fileno())
        return AccessLog(fmt, self.access_writer)  # type: ignore[arg-type]

    # --- supervised workers ---------------------------------------------------------------

    async def _start_workers(self, config: Config) -> None:
        """Prestart steps and workers of every upstream with a `command`, before any client is
        accepted: the first request must find a worker ready."""
        if not any(upstream.command for upstream in config.upstreams.values()):
            return
        # Imported only when there are workers to supervise: a proxy in front of existing
        # servers does not carry the supervisor's modules in its resident memory.
        from proxy.workers.supervisor import WorkerSupervisor

        for name, upstream in config.upstreams.items():
            if upstream.command is None or name in self.supervisors:
                continue
            supervisor = WorkerSupervisor(
                upstream,
                worker_socket_dir(config),
                lambda servers, n=name: self._pool(n).set_servers(servers),
                cwd=config.source.parent if config.source else None,
                outstanding=lambda server, n=name: self._outstanding(n, server),
            )
            self.supervisors[name] = supervisor
            try:
                await supervisor.start()
            except StartupError as exc:
                exc.exit_code = 2  # the deployment is wrong (a failed migration, a bad command)
                raise
        self._hook_pools()

    def _pool(self, name: str):
        assert self.state is not None
        return self.state.pools[name]

    def _outstanding(self, name: str, server: UpstreamServer) -> int:
        pool = self.state.pools.get(name) if self.state else None
        return pool.outstanding(server) if pool is not None else 0

    def _hook_pools(self) -> None:
        """Each supervised upstream's pool reports every request to its supervisor
        (max_requests and the status view count them). Pools are rebuilt on reload."""
        assert self.state is not None
        for name, supervisor in self.supervisors.items():
            pool = self.state.pools.get(name)
            if pool is not None:
                pool.on_acquire = supervisor.note_request

    def _queue_workers_reload(self, old: Config) -> None:
        # Cancelling a rolling restart half-way would strand the replacement it was starting,
        # so reloads that come while one runs are folded into one more pass after it.
        if self._workers_reload_running:
            self._workers_reload_again = True
            return
        self._workers_reload_running = True
        self._restart_task("workers-reload", lambda: self._workers_reload_loop(old))

    async def _workers_reload_loop(self, old: Config) -> None:
        try:
            while True:
                self._workers_reload_again = False
                new = self.config
                await self._reload_workers(old, new)
                old = new
                if not self._workers_reload_again:
                    return
        finally:
            self._workers_reload_running = False

    async def _reload_workers(self, old: Config, new: Config) -> None:
        """SIGHUP is how new code is deployed: every supervised upstream gets a rolling
        restart (new worker ready before the old one leaves); removed upstreams stop, new ones
        start."""
        for name in list(self.supervisors):
            if new.upstreams.get(name) is None or new.upstreams[name].command is None:
                supervisor = self.supervisors.pop(name)
                await supervisor.stop()
        for name, supervisor in self.supervisors.items():
            self._pool(name).set_servers(supervisor.servers)
        await self._start_workers(new)
        await asyncio.gather(
            *(
                sup.rolling_restart(new.upstreams[name])
                for name, sup in self.supervisors.items()
                if old.upstreams.get(name) is not None and old.upstreams[name].command
            ),
            return_exceptions=True,
        )

    async def _stop_workers(self) -> None:
        await asyncio.gather(
            *(sup.stop() for sup in self.supervisors.values()), return_exceptions=True
        )

    def _limits(self):
        assert self.state is not None
        return self.state.limits

    def _new_downstream(self, client_ip: str) -> NegotiatedProtocol:
        assert self.state is not None
        return NegotiatedProtocol(self.state, self.registry.discard, client_ip)

    def _new_redirect(self, https_port: int) -> RedirectProtocol:
        http01 = self.http01
        lookup = http01.lookup if http01 is not None else None
        stored = http01.lookup_stored if http01 is not None and http01.shared else None
        return RedirectProtocol(https_port, lookup, self._limits(), self.access_log, stored)

    async def _start_http01(self) -> None:
        from certs.challenges.http01 import Http01Responder

        self.http01 = Http01Responder(self.storage.shared)
        # Blocks for as long as Redis takes to answer (seconds at most when it is down).
        await asyncio.to_thread(self.http01.share)

    def _start_background(self, config: Config) -> None:
        specs = cert_specs(config)
        self._restart_task("certs", lambda: self.certs.maintain(self._current_cache))
        if self.storage.shared is not None and "storage" not in self.background:
            self._restart_task("storage", self._follow_storage)
        if uses_acme(config) and config.acme is not None:
            from certs.acme_manager import AcmeManager

            acme = AcmeManager(
                config.server.data_dir,
                acme_settings(config.acme),
                server_context,
                self.http01,
                storage=self.storage,
            )
            if self.acme is not None:  # a reload: the counts are the process's
                acme.renewal_failures = self.acme.renewal_failures
            acme_specs = [s for s in specs if s.source == "acme"]
            self.acme = acme
            self._restart_task("acme", lambda: acme.maintain(acme_specs, self._current_cache))
        else:
            self.acme = None
            self._stop_task("acme")
        for task_name in [n for n in self.background if n.startswith("health:")]:
            upstream = config.upstreams.get(task_name.removeprefix("health:"))
            if upstream is None or upstream.health is None:
                self._stop_task(task_name)
        for name, upstream in config.upstreams.items():
            if upstream.health is not None:
                self._restart_task(
                    f"health:{name}", lambda n=name, u=upstream: self._probe_forever(n, u)
                )

    async def _probe_forever(self, name: str, upstream: UpstreamConfig) -> None:
        """Active health checks of one upstream's current servers (its workers included)."""
        from proxy.upstream.health import HealthChecker

        def health_map():
            pool = self.state.pools.get(name) if self.state else None
            return pool.health_map() if pool is not None else {}

        checker = HealthChecker(
            upstream, health_map, on_change=lambda s, up: self._health_changed(name, s, up)
        )
        checker.start()
        try:
            await asyncio.Event().wait()  # until cancelled at reload or shutdown
        finally:
            await checker.stop()

    def _health_changed(self, name: str, server: UpstreamServer, up: bool) -> None:
        # The checker logs the transition; a supervised worker that stopped answering is
        # replaced, not just avoided.
        supervisor = self.supervisors.get(name)
        if not up and supervisor is not None:
            supervisor.recycle(server, "health checks failed")

    def _current_cache(self):
        assert self.selector is not None
        return self.selector.cache

    async def _follow_storage(self) -> None:
        """With a shared store: serve what another instance stored, within moments of its
        change notification, or at the next periodic look (the fallback for notifications
        lost while Redis was away)."""
        loop = asyncio.get_running_loop()
        noticed: set[str | None] = set()
        wake = asyncio.Event()

        def mark(name: str | None) -> None:
            noticed.add(name)
            wake.set()

        subscription = await asyncio.to_thread(
            self.storage.watch_certificates, lambda name: loop.call_soon_threadsafe(mark, name)
        )
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), STORAGE_CHECK_INTERVAL)
                wake.clear()
                names = set(noticed)
                noticed.clear()
                if not names or None in names:
                    names = await asyncio.to_thread(self._sync_stored)
                if names:
                    await self._adopt_stored({n for n in names if n is not None})
        finally:
            if subscription is not None:
                await asyncio.to_thread(subscription.close)

    def _sync_stored(self) -> set[str | None]:
        """Blocking: the (safe) names whose certificate in the shared store is not the one in
        data_dir's copy."""
        from certs.storage import safe_name

        changed: set[str | None] = set()
        for spec in cert_specs(self.config):
            if spec.source != "files" and self.storage.sync_certificate(spec.name):
                changed.add(safe_name(spec.name))
        return changed

    async def _adopt_stored(self, names: set[str]) -> None:
        await self.certs.adopt_stored(names, self._current_cache)
        if self.acme is not None:
            self.acme.look_again(names)

    def _restart_task(self, name: str, make: Callable[[], object]) -> None:
        self._stop_task(name)
        task = asyncio.get_running_loop().create_task(self._guarded(name, make))
        self.background[name] = task

    def _stop_task(self, name: str) -> None:
        task = self.background.pop(name, None)
        if task is not None:
            task.cancel()

    async def _guarded(self, name: str, make: Callable[[], object]) -> None:
        # A background task must never end silently: log and restart it after a pause.
        while True:
            try:
                await make()  # type: ignore[misc]
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task %r failed; restarting it in 30 s", name)
                await asyncio.sleep(30)

    # --- control socket -------------------------------------------------------------------

    async def _control_renew(self, request: dict) -> dict:
        """`tlsproxy certs renew HOST`: a fresh certificate for HOST's site, served from the
        next handshake on; the reply comes once it is."""
        host = request.get("host")
        if not isinstance(host, str) or not host:
            raise ControlError("renew: which host?")
        assert self.state is not None
        site = self.state.router.site_for_name(normalize_server_name(host))
        if site is None:
            raise ControlError(f"{host} is not a host of any [[site]] of this proxy")
        if site.tls == "acme":
            return await self._request_acme_renewal(host, site)
        if site.tls != "internal":
            raise ControlError(
                f"{host}: its certificate comes from files: replace them and reload (SIGHUP)"
            )
        try:
            installed = await self.certs.renew_now(site.name, self._current_cache)
        except CertError as exc:
            raise ControlError(f"{host}: not renewed: {exc}") from None
        info = installed.info
        return {
            "site": site.name,
            "hosts": list(site.hosts),
            "serial": f"{info.serial:x}",
            "not_before": info.not_before.isoformat(),
            "not_after": info.not_after.isoformat(),
        }

    async def _request_acme_renewal(self, host: str, site: Site) -> dict:
        """An ACME order takes seconds to minutes (DNS propagation): the reply says it was
        requested, and the order's result goes where a scheduled renewal's goes (the log,
        `tlsproxy certs`)."""
        if self.acme is None:
            raise ControlError(f"{host}: no ACME maintenance runs in this proxy")
        request = await self.acme.request_renewal(site.name)
        reply: dict = {
            "site": site.name,
            "hosts": list(site.hosts),
            "acme": request.directory,
            "under_way": request.under_way,
        }
        if request.not_before is not None:
            reply["not_before"] = datetime.fromtimestamp(request.not_before, UTC).isoformat()
        return reply

    async def _control_status(self, request: dict) -> dict:
        """`tlsproxy status`: what this proxy serves now (see proxy/status.py for the shape)."""
        config = self.config
        assert self.state is not None
        cache = self._current_cache()
        now = time.monotonic()
        sites = []
        for site in config.sites:
            installed = cache.get(site.name)
            certificate = None
            if installed is not None:
                info = installed.info
                certificate = {
                    "issuer": info.issuer,
                    "serial": f"{info.serial:x}",
                    "not_after": info.not_after.isoformat(),
                }
            sites.append(
                {
                    "hosts": list(site.hosts),
                    "tls": site.tls if isinstance(site.tls, str) else "files",
                    "upstream": site.upstream,
                    "hsts": site.hsts,
                    "certificate": certificate,
                }
            )
        upstreams = {
            name: [
                {"server": server.label, "up": health.is_up(now)}
                for server, health in pool.health_map().items()
            ]
            for name, pool in self.state.pools.items()
        }
        workers = []
        if self.supervisors:
            from dataclasses import asdict

            workers = [asdict(w) for sup in self.supervisors.values() for w in sup.snapshot()]
        return {
            "pid": os.getpid(),
            "uptime": time.time() - self.started_at,
            "config": None if config.source is None else str(config.source),
            "https": [_sockname(listener.address) for listener in self.https_listeners],
            "http": [
                _sockname(sock.getsockname())
                for server in self.plain_servers
                for sock in server.sockets
            ],
            "sites": sites,
            "upstreams": upstreams,
            "workers": workers,
        }

    # --- the admin endpoint -----------------------------------------------------------------

    async def _apply_admin(self, address: AdminAddress | None) -> None:
        """A reload's `[server] admin`: moved, turned on or off. The new address is bound
        before the old one is let go, so a bad one leaves the endpoint where it was."""
        if address == self.admin.address:
            return
        if address is None:
            await self.admin.stop()
            log.info("admin endpoint off: nothing is counted from now on")
            self.metrics = None
        else:
            moved = AdminServer(self.admin.pages)
            try:
                await moved.start(address)
            except StartupError as exc:
                log.error("reload: %s; the admin endpoint stays where it was", exc)
                return
            await self.admin.stop()
            self.admin = moved
            if self.metrics is None:
                self.metrics = Metrics()
        for listener in self.https_listeners:
            listener.metrics = self.metrics

    async def _metrics_page(self) -> Page:
        metrics = self.metrics
        if metrics is None:  # turned off by a reload while this scrape waited
            return CONTENT_TYPE, b""
        connections = {"h2": 0, "http/1.1": 0}
        for protocol in self.registry.protocols:
            name = "h2" if isinstance(protocol, H2Protocol) else "http/1.1"
            connections[name] = connections.get(name, 0) + 1
        workers = [w for sup in self.supervisors.values() for w in sup.snapshot()]
        snapshot = Snapshot(
            connections=connections,
            handshakes_in_progress=self.registry.pending,
            certificates=await asyncio.to_thread(self._certificate_samples),
            upstreams=self._upstream_samples(),
            workers=workers,
            access_log_dropped=self.access_writer.dropped if self.access_writer else 0,
            version=_version(),
            process=read_process(),
        )
        return CONTENT_TYPE, render(metrics, snapshot)

    def _certificate_samples(self) -> list[CertificateSample]:
        """Per host of each site's certificate: what is served (the in-memory cache) and what
        the renewal side decided (storage). Runs in a thread: it reads files."""
        config = self.config
        cache = self._current_cache()
        failures = dict(self.certs.renewal_failures)
        if self.acme is not None:
            failures.update(self.acme.renewal_failures)
        samples = []
        for status in self._cert_statuses(config):
            installed = cache.get(status.name)
            not_after = installed.info.not_after.timestamp() if installed is not None else None
            last_success = None
            if installed is not None:
                with contextlib.suppress(OSError):
                    last_success = installed.cert_file.stat().st_mtime
            nxt = status.next_renewal.timestamp() if status.next_renewal is not None else None
            for host in status.hosts:
                samples.append(
                    CertificateSample(
                        host, not_after, nxt, failures.get(status.name, 0), last_success
                    )
                )
        return samples

    def _cert_statuses(self, config: Config) -> list:
        specs = cert_specs(config)
        statuses = self.certs.status([s for s in specs if s.source != "acme"])
        if self.acme is not None:
            statuses += self.acme.status([s for s in specs if s.source == "acme"])
        return statuses

    def _upstream_samples(self) -> list[UpstreamSample]:
        assert self.state is not None
        now = time.monotonic()
        samples = []
        for name, pool in self.state.pools.items():
            for slot in pool.slots:
                server = slot.server
                samples.append(
                    UpstreamSample(
                        name,
                        server.label,
                        slot.health.is_up(now),
                        slot.outstanding,
                        pool.connect_failures.get(server, 0),
                        pool.retries.get(server, 0),
                    )
                )
        return samples

    async def _status_page(self) -> Page:
        return "application/json", json.dumps(await self._control_status({})).encode() + b"\n"

    async def _certs_page(self) -> Page:
        statuses = await asyncio.to_thread(self._cert_statuses, self.config)
        doc = {"certificates": [cert_status_json(s) for s in statuses]}
        return "application/json", json.dumps(doc).encode() + b"\n"

    # --- SIGHUP ---------------------------------------------------------------------------

    async def reload(self) -> bool:
        notify_reloading()
        try:
            return await self._reload()
        finally:
            notify("READY=1")  # serving again, with the new config or the old one

    async def _reload(self) -> bool:
        async with self._reload_lock:
            try:
                if self.config_path is None:  # reverse-proxy: its flags stay the config
                    new = self.config
                else:
                    new = await asyncio.to_thread(load_config, self.config_path)
                await asyncio.to_thread(
                    check_config, new, isolate_crypto=True, storage=self.storage
                )
                # Leaves issued from now on (this load's included) get the new lifetime.
                self.certs.leaf_lifetime = leaf_lifetime(new)
                self.certs.root_files = root_files(new)
                cache = await asyncio.to_thread(
                    self.certs.load, cert_specs(new), default_cert_name(new)
                )
            except Exception as exc:
                self.certs.leaf_lifetime = leaf_lifetime(self.config)
                self.certs.root_files = root_files(self.config)
                if isinstance(exc, ConfigError | CertError):
                    log.error("reload failed, still running the previous config: %s", exc)
                else:
                    log.exception("reload failed, still running the previous config")
                if self.metrics is not None:
                    self.metrics.reloads["failure"] += 1
                return False
            _warn_broken(new)
            old = self.config
            if (new.server.https, new.server.http) != (old.server.https, old.server.http):
                log.warning("reload: listener addresses changed; they take effect after a restart")
            if new.server.data_dir != old.server.data_dir:
                log.warning("reload: data_dir changed; it takes effect after a restart")
                new = _with_data_dir(new, old)
            if new.storage != old.storage:
                log.warning("reload: [storage] changed; it takes effect after a restart")
                new = replace(new, storage=old.storage)
            old_state = self.state
            assert old_state is not None and self.selector is not None
            reused = {
                name: pool
                for name, pool in old_state.pools.items()
                if old.upstreams.get(name) == new.upstreams.get(name)
            }
            access_log = self._access_log(new.server.access_log)
            await self._apply_admin(new.server.admin)
            self.state = ProxyState.build(new, access_log, pools=reused, metrics=self.metrics)
            self._hook_pools()
            self.access_log = self.state.access_log
            self.selector.update(cache, self.state.router, http2=new.server.http2)
            self.config = new
            if uses_acme(new) and self.http01 is None:
                await self._start_http01()
            self._start_background(new)
            if self.supervisors or any(u.command for u in new.upstreams.values()):
                self._queue_workers_reload(old)
            retired = [p for name, p in old_state.pools.items() if reused.get(name) is not p]
            if retired:
                asyncio.get_running_loop().create_task(self._retire_pools(retired, new))
            if self.metrics is not None:
                self.metrics.reloads["success"] += 1
            source = self.config_path or "reverse-proxy's flags"
            log.info("reloaded %s: %d site(s)", source, len(new.sites))
            return True

    async def _retire_pools(self, pools: list, config: Config) -> None:
        # Connections that started before the reload may still be using the old pools; give
        # them as long as a request may take, then close what is left.
        await asyncio.sleep(config.limits.upstream_read_timeout + config.server.shutdown_grace)
        for pool in pools:
            with contextlib.suppress(Exception):
                await pool.close()

    # --- SIGTERM --------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))

    def _on_stop_signal(self, name: str) -> None:
        if not self.stopping.is_set():
            log.info("%s: draining (up to %s s), no new connections", name, self._grace())
            notify("STOPPING=1")
        self.stopping.set()

    def _on_sigint(self) -> None:
        self._sigint_count += 1
        if self._sigint_count > 1:
            log.warning("second SIGINT: exiting now without draining")
            for protocol in list(self.registry.protocols):
                _abort(protocol)
            raise SystemExit(1)
        self._on_stop_signal("SIGINT")

    def _grace(self) -> float:
        return self.config.server.shutdown_grace

    async def drain(self) -> None:
        self.draining = True
        for listener in self.https_listeners:
            listener.stop_accepting()
            for task in list(listener.tasks):  # handshakes in progress carry no request yet
                task.cancel()
        for server in self.plain_servers:
            await close_plain_server(server)
        for protocol in list(self.registry.protocols):
            protocol.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace()
        while busy := [p for p in self.registry.protocols if p.owes_client]:
            if loop.time() >= deadline:
                log.warning("shutdown_grace over: closing %d connection(s) still busy", len(busy))
                break
            # Responses end at their own pace; a few checks a second cost nothing here.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.registry.idle_event.wait(), 0.05)
        for protocol in list(self.registry.protocols):
            _abort(protocol)  # what is left only waits for a close_notify that may never come
        for name in list(self.background):
            self._stop_task(name)
        await self.control.stop()
        await self.admin.stop()
        await self._stop_workers()
        if self.http01 is not None:
            await asyncio.to_thread(self.http01.close)
        await asyncio.to_thread(self.storage.close)
        if self.state is not None:
            with contextlib.suppress(Exception):
                await self.state.close()
        if self.access_writer is not None:
            await asyncio.to_thread(self.access_writer.close)  # every line written, or dropped
        log.info("stopped")

    async def serve(self) -> None:
        self.install_signal_handlers()
        await self.stopping.wait()
        await self.drain()


def _version() -> str:
    from proxy import __version__

    return __version__


def cert_status_json(status: object) -> dict:
    """One `tlsproxy certs` line (certs.models.CertStatus) as JSON: times in ISO 8601."""
    from dataclasses import asdict

    doc = asdict(status)  # type: ignore[call-overload]
    doc["hosts"] = list(doc["hosts"])
    for key in ("not_after", "next_renewal"):
        if doc[key] is not None:
            doc[key] = doc[key].isoformat()
    return doc


def _warn_broken(config: Config) -> None:
    # Meant for tests only: a production config that kept one must not go unnoticed.
    for site in config.sites:
        if site.broken is not None:
            log.warning(
                "site %s serves a deliberately broken certificate (%s): clients must refuse it",
                ", ".join(site.hosts),
                site.broken,
            )


def _abort(protocol: object) -> None:
    transport = getattr(protocol, "transport", None)
    if transport is not None:
        transport.abort()


def _sockname(address: object) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def _with_data_dir(new: Config, old: Config) -> Config:
    return replace(new, server=replace(new.server, data_dir=old.server.data_dir))


def worker_socket_dir(config: Config) -> Path:
    """Where supervised workers' `{socket}` paths go: the systemd unit's RuntimeDirectory
    (/run/tlsproxy: short paths, on tmpfs, removed when the service stops), else data_dir/run."""
    return runtime_directory() or config.server.data_dir / "run"


def release_startup_memory() -> None:
    """Start-up (imports, key generation, config parsing) leaves freed heap that glibc keeps;
    hand it back so the long-running process's resident size reflects what it really uses."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


async def run_server(config: Config, trace: Sequence[str] = ()) -> int:
    setup_logging(config.server.log_level)
    server = ProxyServer(config, trace)
    await server.start()
    release_startup_memory()
    notify("READY=1")
    await server.serve()
    return 0
