"""TLSProxy: a real `tlsproxy run`, in its own process, in front of an app, for one test.

What start() does, in order:
1. makes a temporary directory with the data_dir (and the shared local CA, if one is given);
2. binds the listening socket itself (127.0.0.1, port 0), so the port is known at once and no
   other process can take it between choosing and binding;
3. starts the upstream: nothing for `upstream=`; uvicorn workers the proxy supervises for an
   import string; uvicorn in a thread of this process for an ASGI object;
4. writes the config (TOML), validates it as `tlsproxy check` does, and starts the proxy with the
   socket passed as systemd would (LISTEN_FDS) and a NOTIFY_SOCKET to hear "READY=1" on: the
   proxy says it once its certificates are loaded and its workers answer, so no polling.
stop() sends SIGTERM (a clean drain), SIGKILL if that takes too long, stops the app and removes
the directory. The proxy also dies with the test process (PR_SET_PDEATHSIG), so a killed test
run leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import copy
import os
import secrets
import select
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from proxy.testing.authority import CertificateAuthority
from proxy.testing.errors import StartError
from proxy.testing.toml_text import dumps

# Runs in the child before the proxy: moves the passed socket to fd 3 and says it is for this
# PID (what systemd does between fork and exec), and ties the child's life to the test's.
_LAUNCH = """\
import ctypes, os, signal, sys
fd = int(os.environ.pop("TLSPROXY_TESTING_FD"))
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
parent = int(os.environ.pop("TLSPROXY_TESTING_PARENT"))
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit(1)  # the test process died before prctl took effect
from proxy.cli import main
sys.exit(main(sys.argv[1:]))
"""
UPSTREAM = "app"
_running: weakref.WeakSet[TLSProxy] = weakref.WeakSet()


class ClientCert(NamedTuple):
    """A client certificate chain and its key, as files (curl --cert/--key, httpx, ssl)."""

    cert_file: Path
    key_file: Path


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`extra` laid over `base`: tables merge key by key, [[site]] entries are added to the
    sites, anything else replaces what was there."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if key == "site" and isinstance(value, list | tuple):
            merged["site"] = [*merged.get("site", []), *copy.deepcopy(list(value))]
        elif isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class TLSProxy:
    """A real tlsproxy in front of an app, on 127.0.0.1, with its own local CA.

    The app: exactly one of `app` (an import string such as "pkg.module:app", served by
    `workers` uvicorn processes the proxy supervises; or an ASGI callable, served in this
    process), `upstream` ("127.0.0.1:8000", "unix:/path": a server the test runs), or a
    `config` with [[site]] tables of its own.
    `hosts`: the first site's names (SNI and Host); `site`: more keys of that site (such as
    client_auth). `config`: extra TOML keys, merged (tables key by key, [[site]] tables
    added). `broken`: host name -> broken certificate kind ("expired", ...), each a site of
    its own in front of the same app. `ca`: a shared local CA (the `tlsproxy_ca` fixture;
    without one the proxy makes its own). `directory`: where the config, data_dir and log go
    (a temporary directory, removed at stop, when not given).
    """

    def __init__(
        self,
        app: Any = None,
        *,
        hosts: Sequence[str] = ("localhost",),
        upstream: str | None = None,
        workers: int | str = 1,
        site: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        broken: Mapping[str, str] | None = None,
        ca: CertificateAuthority | None = None,
        directory: str | os.PathLike[str] | None = None,
        log_level: str = "debug",
        loop: str = "uvloop",
        start_timeout: float = 60.0,
    ) -> None:
        if isinstance(hosts, str):
            hosts = [hosts]
        if not hosts:
            raise ValueError("hosts: give at least one name, e.g. hosts=['api.test']")
        given = [name for name, v in (("app", app), ("upstream", upstream)) if v is not None]
        if len(given) > 1:
            raise ValueError("give either app= or upstream=, not both")
        if not given and not (config and "site" in config):
            raise ValueError("give app=, upstream=, or a config with its own [[site]] tables")
        self.app = app
        self.hosts = [h.lower() for h in hosts]
        self.upstream = upstream
        self.workers = workers
        self.site = dict(site or {})
        self.extra = dict(config or {})
        self.broken = dict(broken or {})
        self.ca = ca
        self.log_level = log_level
        self.loop = loop
        self.start_timeout = start_timeout
        self._own_directory = directory is None
        self._directory_arg = directory
        self.directory: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._notify: socket.socket | None = None
        self._app_thread: Any = None
        self._log: Any = None
        self.port = 0
        self.startup_seconds: float | None = None

    # -- paths -------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self._dir / "tlsproxy.toml"

    @property
    def data_dir(self) -> Path:
        return self._dir / "data"

    @property
    def log_file(self) -> Path:
        return self._dir / "tlsproxy.log"

    @property
    def ca_file(self) -> Path:
        """The local CA's root certificate (PEM) that the proxy's certificates chain to."""
        return self.data_dir / "ca" / "root.pem"

    @property
    def _dir(self) -> Path:
        if self.directory is None:
            raise RuntimeError("the proxy is not started: use `with TLSProxy(...) as p`")
        return self.directory

    @property
    def all_hosts(self) -> list[str]:
        """Every name this proxy answers: the first site's, the broken ones', the config's."""
        names = [*self.hosts, *(h.lower() for h in self.broken)]
        for site in self.extra.get("site", []):
            names.extend(h.lower() for h in site.get("hosts", []))
        return names

    # -- life --------------------------------------------------------------------------------
    def start(self) -> TLSProxy:
        self._prepare()
        try:
            self._launch()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> TLSProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> TLSProxy:
        # The child is forked from this (the loop's) thread: PR_SET_PDEATHSIG fires when the
        # thread that forked exits, and a worker thread of to_thread may exit any time.
        self._prepare()
        try:
            self._launch()
            await asyncio.to_thread(self._wait_ready)
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    def _prepare(self) -> None:
        self._started_at = time.perf_counter()
        if self._own_directory:
            self.directory = Path(tempfile.mkdtemp(prefix="tlsproxy-"))
        else:
            self.directory = Path(self._directory_arg)  # type: ignore[arg-type]
            self.directory.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if self.ca is not None:
            self.ca.install(self.data_dir)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1024)
        self.port = self._sock.getsockname()[1]
        if self.app is not None and not isinstance(self.app, str):
            from proxy.testing.asgi_thread import AsgiThread

            self._app_thread = AsgiThread(self.app)
            self._app_thread.start()
        self._write_config()
        self._issue_certificates()

    def _document(self) -> dict[str, Any]:
        server: dict[str, Any] = {
            "https": [f"127.0.0.1:{self.port}"],
            "http": [],
            "data_dir": str(self.data_dir),
            # A test that leaves a connection open should not wait 30 s at teardown.
            "shutdown_grace": "2s",
        }
        document: dict[str, Any] = {"server": server}
        if self.app is not None or self.upstream is not None:
            server["default_site"] = self.hosts[0]
            sites = [{"hosts": list(self.hosts), "upstream": UPSTREAM, **self.site}]
            sites += [
                {"hosts": [host], "upstream": UPSTREAM, "broken": kind}
                for host, kind in self.broken.items()
            ]
            document["site"] = sites
            document["upstream"] = {UPSTREAM: self._upstream_table()}
        return merge(document, self.extra)

    def _upstream_table(self) -> dict[str, Any]:
        if self.upstream is not None:
            return {"servers": [self.upstream]}
        if self._app_thread is not None:
            return {"servers": [self._app_thread.address]}
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            str(self.app),
            "--uds",
            "{socket}",
        ]  # the supervisor adds --forwarded-allow-ips for a worker on a unix socket
        return {"command": shlex.join(command), "workers": self.workers}

    def _issue_certificates(self) -> None:
        """What the proxy does first at start-up, done here: this process has `cryptography`
        loaded already, while the proxy would start a child process for it (isolate_crypto),
        about a fifth of a second. The proxy then finds the leaves stored and valid."""
        from proxy.certificates import cert_specs, certificate_manager, default_cert_name
        from proxy.config import load_config

        config = load_config(self.config_file)
        certificate_manager(config).load(cert_specs(config), default_cert_name(config))

    def _write_config(self) -> None:
        from proxy.certificates import check_config
        from proxy.config import load_config

        # As `tlsproxy check` would: a bad key is a ConfigError naming it, here in the test,
        # and the file the proxy reads is replaced only by a config that passed.
        candidate = self.config_file.with_suffix(".new.toml")
        candidate.write_text(dumps(self._document()))
        try:
            check_config(load_config(candidate))
        except BaseException:
            candidate.unlink()
            raise
        candidate.replace(self.config_file)

    def _launch(self) -> None:
        assert self._sock is not None
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if sys.platform == "linux":
            # The abstract namespace: no file, no limit of sun_path on the directory's depth.
            name = f"tlsproxy-testing-{os.getpid()}-{secrets.token_hex(6)}"
            self._notify.bind("\0" + name)
            notify_socket = "@" + name
        else:
            notify_socket = str(self._dir / "notify.sock")
            self._notify.bind(notify_socket)
        env = dict(os.environ)
        env.update(
            NOTIFY_SOCKET=notify_socket,
            TLSPROXY_TESTING_FD=str(self._sock.fileno()),
            TLSPROXY_TESTING_PARENT=str(os.getpid()),
            # The app's workers import it as this test process would.
            PYTHONPATH=os.pathsep.join(_import_path()),
            PYTHONUNBUFFERED="1",
        )
        self._log = open(self.log_file, "ab")
        argv = ["run", "-c", str(self.config_file), "--log-level", self.log_level]
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, *argv, "--loop", self.loop],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            pass_fds=(self._sock.fileno(),),
            env=env,
            cwd=self._dir,
            start_new_session=True,  # Ctrl-C reaches the test, which stops the proxy
        )
        _running.add(self)

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._notify is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            message = self._next_notification(deadline)
            if message is None:
                if self._proc.poll() is not None:
                    raise StartError(
                        f"tlsproxy exited with status {self._proc.returncode} at start-up:\n"
                        + self.logs()
                    )
                if time.monotonic() > deadline:
                    raise StartError(
                        f"tlsproxy was not ready within {self.start_timeout:g}s:\n" + self.logs()
                    )
                continue
            if "READY=1" in message.split("\n"):
                self.startup_seconds = time.perf_counter() - self._started_at
                return

    def _next_notification(self, deadline: float) -> str | None:
        assert self._notify is not None
        wait = max(0.0, min(0.05, deadline - time.monotonic()))
        readable, _, _ = select.select([self._notify], [], [], wait)
        if not readable:
            return None
        return self._notify.recv(4096).decode(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the proxy (SIGTERM, then SIGKILL), the app, and remove the temporary
        directory. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc, timeout)
            _running.discard(self)
        if self._app_thread is not None:
            self._app_thread.stop()
            self._app_thread = None
        for resource in (self._sock, self._notify, self._log):
            if resource is not None:
                with contextlib.suppress(OSError):
                    resource.close()
        self._sock = self._notify = self._log = None
        if self._own_directory and self.directory is not None:
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    # -- using it ----------------------------------------------------------------------------
    def url(self, host: str | None = None, path: str = "/") -> str:
        """https://HOST:PORT/PATH for one of the proxy's names (the first one by default)."""
        if not path.startswith("/"):
            path = "/" + path
        return f"https://{host or self.hosts[0]}:{self.port}{path}"

    def ssl_context(
        self, client_cert: ClientCert | tuple[str, str] | None = None
    ) -> ssl.SSLContext:
        """A client context that trusts the proxy's local CA only (and presents
        `client_cert`, a (cert, key) pair such as client_cert() returns, when given)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert is not None:
            context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        return context

    def client(self, *, cert: ClientCert | tuple[str, str] | None = None, **kwargs: Any) -> Any:
        """An httpx.Client that trusts the local CA and reaches the proxy's names on
        127.0.0.1; `cert` presents a client certificate. Other arguments go to httpx.Client."""
        from proxy.testing.loopback import client

        verify = kwargs.pop("verify", None) or self.ssl_context(cert)
        return client(self.all_hosts, verify, http2=kwargs.pop("http2", False), **kwargs)

    def async_client(
        self, *, cert: ClientCert | tuple[str, str] | None = None, **kwargs: Any
    ) -> Any:
        """client(), as an httpx.AsyncClient."""
        from proxy.testing.loopback import async_client

        verify = kwargs.pop("verify", None) or self.ssl_context(cert)
        return async_client(self.all_hosts, verify, http2=kwargs.pop("http2", False), **kwargs)

    def client_cert(self, name: str) -> ClientCert:
        """A client certificate for `name` from the local CA (`tlsproxy ca --client NAME`),
        written next to the config; verifies against client_auth = { ca = "internal" }."""
        out = self._dir / "client-certs"
        out.mkdir(exist_ok=True)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy",
                "ca",
                "-c",
                str(self.config_file),
                "--client",
                name,
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"tlsproxy ca --client {name} failed: {done.stderr.strip()}")
        return ClientCert(out / f"{name}.pem", out / f"{name}.key")

    def reload(
        self, *, config: Mapping[str, Any] | None = None, broken: Mapping[str, str] | None = None
    ) -> None:
        """SIGHUP, after rewriting the config when `config` (the extra keys, replacing the
        ones given before) or `broken` is given; returns once the proxy serves again. A config
        that `tlsproxy check` would refuse is a ConfigError, and nothing changes; RuntimeError
        with the proxy's reason when the proxy itself kept its previous config."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("the proxy is not running")
        if config is not None or broken is not None:
            before = self.extra, self.broken
            self.extra = dict(config) if config is not None else self.extra
            self.broken = dict(broken) if broken is not None else self.broken
            try:
                self._write_config()
            except BaseException:
                self.extra, self.broken = before
                raise
        mark = len(self.logs())
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + self.start_timeout
        reloading = False
        while True:
            message = self._next_notification(deadline)
            if message is not None:
                lines = message.split("\n")
                reloading = reloading or "RELOADING=1" in lines
                if reloading and "READY=1" in lines:
                    break
            elif self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the proxy did not finish reloading:\n" + self.logs())
        failed = [line for line in self.logs()[mark:].splitlines() if "reload failed" in line]
        if failed:
            raise RuntimeError(failed[0])

    def logs(self) -> str:
        """Everything the proxy printed so far: its log (stderr) and access log (stdout)."""
        try:
            return self.log_file.read_text(errors="replace")
        except (FileNotFoundError, RuntimeError):
            return ""

    def renew(self, host: str | None = None) -> dict[str, Any]:
        """Issue a fresh leaf for `host`'s site now (`tlsproxy certs renew`); returns once the
        proxy serves it, with its "serial" (hex), "not_before" and "not_after"."""
        from proxy.control import ask

        return ask(self.data_dir, {"op": "renew", "host": host or self.hosts[0]})


def terminate(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
    """SIGTERM (a clean drain), SIGKILL after `timeout`; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def _import_path() -> list[str]:
    """Where this process imports from, for the proxy and the app's workers: tlsproxy's own
    packages first (a project with a module named `proxy` must not replace the proxy), then
    the current directory (as `python -m pytest` sees it), then this process's sys.path."""
    paths = [str(Path(__file__).resolve().parents[2]), os.getcwd()]
    paths += [p for p in sys.path if p and os.path.isdir(p) and p not in paths]
    return paths


@atexit.register
def _stop_forgotten() -> None:
    # A proxy started without `with` and never stopped: do not leave it running.
    for proxy in list(_running):
        with contextlib.suppress(Exception):
            proxy.stop(timeout=3.0)
