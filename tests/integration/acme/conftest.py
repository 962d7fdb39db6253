"""Real Pebble (ACME CA) and BIND 9 (named) for the ACME tests, on free loopback ports.

Each test gets its own named and pebble in tmp_path, configured from copies of
/work/shared/components (read-only in CI) with the ports rewritten:
- named is authoritative for "test." and takes TSIG-signed RFC 2136 updates (TXT only);
- pebble resolves every name through that named (-dnsserver), so HTTP-01 reaches 127.0.0.1 on
  the port the test serves and DNS-01 sees the TXT records the code under test published.
Pebble's own HTTPS certificate comes from a small CA made once per session (Pebble's Debian
package ships none). Every process is stopped at teardown (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certs.acme_manager import AcmeManager
from certs.cache import CertificateCache
from certs.challenges.http01 import Http01Responder, token_from_path
from certs.issuers.acme import AcmeSettings, DnsUpdateSettings
from tests.integration.certs.conftest import client_context, connect, echo_server
from tests.integration.harness import ProxyProcess, free_port, stop_process

from .helpers import context_factory, pebble_orders

__all__ = ["client_context", "connect", "echo_server"]


def _components_dir() -> Path:
    """The named configs (named.conf, test.zone, tsig.key; the TSIG key is a test key used on
    loopback only): $TLSPROXY_COMPONENTS if set, else the copy kept beside this file."""
    candidates = [
        os.environ.get("TLSPROXY_COMPONENTS"),
        str(Path(__file__).resolve().parent / "components"),
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "dns" / "named.conf").is_file():
            return Path(candidate)
    return Path(candidates[-1])


SHARED = _components_dir()


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )


PEBBLE = _binary("pebble")
NAMED = _binary("named")

MISSING = "needs the pebble and named binaries (apt-get install -y pebble bind9)"


# -- Pebble's HTTPS certificate ------------------------------------------------------------


@dataclass(frozen=True)
class PebbleTls:
    ca: Path
    cert: Path
    key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="session")
def pebble_tls(tmp_path_factory: pytest.TempPathFactory) -> PebbleTls:
    return make_pebble_tls(tmp_path_factory.mktemp("pebble-tls"))


def make_pebble_tls(directory: Path) -> PebbleTls:
    """A CA and, under it, Pebble's HTTPS certificate for 127.0.0.1/localhost, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble test HTTPS CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        # X.509-strict clients (Python 3.13's default context) refuse a leaf without it.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    tls = PebbleTls(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    tls.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(_pem_key(key))
    return tls


# -- processes -------------------------------------------------------------------------------


def _wait_ready(proc: subprocess.Popen, ports: list[int], log: Path, marker: str | None) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited: {log.read_text()[-2000:]}")
        ok = True
        for port in ports:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    pass
            except OSError:
                ok = False
                break
        if ok and (marker is None or marker in log.read_text()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{proc.args[0]} not ready on {ports}: {log.read_text()[-2000:]}")


@dataclass
class Components:
    root: Path
    tls: PebbleTls
    dns_port: int
    acme_port: int
    mgmt_port: int
    http_port: int
    tls_port: int
    pebble_env: dict[str, str]
    validity: int | None
    extra_config: dict[str, object] = field(default_factory=dict)
    # More zones for named to serve, as {"example.com": "zone file text"}: public-looking names
    # (which the code under test treats unlike *.test) that still resolve on loopback only.
    zones: dict[str, str] = field(default_factory=dict)
    named: subprocess.Popen | None = None
    pebble: subprocess.Popen | None = None
    logs: list[Path] = field(default_factory=list)
    root_pem_cached: bytes = b""  # the root of the Pebble that ran last (it may be stopped)

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    @property
    def tsig_key(self) -> Path:
        return self.root / "dns" / "tsig.key"

    @property
    def pebble_log(self) -> Path:
        return self.root / "pebble.log"

    def settings(self, **overrides: object) -> AcmeSettings:
        values: dict[str, object] = {
            "directory": self.directory,
            "email": "ops@example.test",
            "default_challenge": "http-01",
            "ca_bundle": self.tls.ca,
            "eab_kid": None,
            "eab_hmac_key": None,
            "profile": None,
            "dns": DnsUpdateSettings(
                server_host="127.0.0.1",
                server_port=self.dns_port,
                tsig_key_file=self.tsig_key,
                zone=None,
                propagation_timeout=10.0,
            ),
        }
        values.update(overrides)
        return AcmeSettings(**values)  # type: ignore[arg-type]

    # named
    def start_named(self) -> None:
        dns = self.root / "dns"
        work = dns / "work"
        work.mkdir(parents=True, exist_ok=True)
        conf = (SHARED / "dns" / "named.conf").read_text()
        conf, n = re.subn(r"listen-on port \d+", f"listen-on port {self.dns_port}", conf)
        assert n == 1, "named.conf layout changed: no 'listen-on port'"
        for zone, text in self.zones.items():
            (work / f"{zone}.zone").write_text(text)
            conf += f'\nzone "{zone}." {{ type primary; file "{zone}.zone"; }};\n'
        (dns / "named.conf").write_text(conf)
        shutil.copy(SHARED / "dns" / "tsig.key", dns / "tsig.key")
        shutil.copy(SHARED / "dns" / "test.zone", work / "test.zone")
        log = self.root / "named.log"
        self.named = subprocess.Popen(
            [str(NAMED), "-g", "-c", "../named.conf"],
            cwd=work,
            stdin=subprocess.DEVNULL,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        _wait_ready(self.named, [self.dns_port], log, " running")

    # pebble
    def start_pebble(self) -> None:
        directory = self.root / "pebble"
        directory.mkdir(exist_ok=True)
        config: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.acme_port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(self.tls.cert),
            "privateKey": str(self.tls.key),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity is not None:
            config["certificateValidityPeriod"] = self.validity
        config.update(self.extra_config)
        (directory / "pebble-config.json").write_text(json.dumps({"pebble": config}))
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            **self.pebble_env,
        }
        with self.pebble_log.open("ab") as log:
            self.pebble = subprocess.Popen(
                [
                    str(PEBBLE),
                    "-config",
                    "pebble-config.json",
                    "-dnsserver",
                    f"127.0.0.1:{self.dns_port}",
                ],
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_ready(self.pebble, [self.acme_port, self.mgmt_port], self.pebble_log, None)
        self.root_pem()

    def stop_pebble(self) -> None:
        if self.pebble is not None:
            stop_process(self.pebble, 5)
            self.pebble = None

    def stop(self) -> None:
        self.stop_pebble()
        if self.named is not None:
            stop_process(self.named, 5)
            self.named = None

    def orders(self) -> int:
        """How many orders this Pebble has taken since it started (see pebble_orders)."""
        return pebble_orders(self.pebble_log)

    def root_pem(self) -> bytes:
        """Pebble's current issuing root (it changes on every pebble start)."""
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        url = f"https://127.0.0.1:{self.mgmt_port}/roots/0"
        with urllib.request.urlopen(url, context=ctx, timeout=5) as response:
            self.root_pem_cached = response.read()
        return self.root_pem_cached


StartComponents = Callable[..., Components]


@pytest.fixture
def components(tmp_path: Path, pebble_tls: PebbleTls) -> Iterator[StartComponents]:
    """start(pebble_env={...}, validity=SECONDS, zones={NAME: TEXT}) -> Components (named +
    pebble, running)."""
    skip_without_components()
    started: list[Components] = []

    def start(
        pebble_env: dict[str, str] | None = None,
        validity: int | None = None,
        extra_config: dict[str, object] | None = None,
        zones: dict[str, str] | None = None,
    ) -> Components:
        return start_components(
            tmp_path / f"components{len(started)}",
            pebble_tls,
            started,
            pebble_env=pebble_env,
            validity=validity,
            extra_config=extra_config,
            zones=zones,
        )

    yield start
    for c in started:
        c.stop()


def skip_without_components() -> None:
    if PEBBLE is None or NAMED is None:
        pytest.skip(MISSING)
    if not (SHARED / "dns" / "named.conf").is_file():
        pytest.skip(f"no components configs at {SHARED} (set TLSPROXY_COMPONENTS)")


def start_components(
    root: Path,
    tls: PebbleTls,
    started: list[Components],
    *,
    pebble_env: dict[str, str] | None = None,
    validity: int | None = None,
    extra_config: dict[str, object] | None = None,
    zones: dict[str, str] | None = None,
    http_port: int | None = None,
) -> Components:
    """named + pebble in `root`, running, appended to `started` before they start (so that
    the caller's teardown stops whatever did start). `http_port`: where Pebble sends HTTP-01
    validation (a free port by default)."""
    c = Components(
        root=root,
        tls=tls,
        dns_port=free_port(),
        acme_port=free_port(),
        mgmt_port=free_port(),
        http_port=http_port or free_port(),
        tls_port=free_port(),
        pebble_env={"PEBBLE_AUTHZREUSE": "0", **(pebble_env or {})},
        validity=validity,
        extra_config=extra_config or {},
        zones=zones or {},
    )
    c.root.mkdir(parents=True)
    started.append(c)
    c.start_named()
    c.start_pebble()
    return c


# -- an HTTP-01 responder on Pebble's httpPort -------------------------------------------------


async def _serve_http01(
    responder: Http01Responder, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Just enough HTTP/1.1 for Pebble's validation GET: the key authorization or 404."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        target = head.split(b" ", 2)[1].decode("latin-1")
        token = token_from_path(target)
        body = responder.lookup(token) if token else None
        if body is None:
            writer.write(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
        else:
            data = body.encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                + f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
                + data
            )
        await writer.drain()
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, IndexError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def http01_server() -> AsyncIterator[Callable[[Http01Responder, int], Awaitable[None]]]:
    servers: list[asyncio.base_events.Server] = []

    async def start(responder: Http01Responder, port: int) -> None:
        server = await asyncio.start_server(
            lambda r, w: _serve_http01(responder, r, w), "127.0.0.1", port
        )
        servers.append(server)

    yield start
    for server in servers:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


@dataclass
class AcmeSetup:
    c: Components
    responder: Http01Responder
    cache: CertificateCache
    manager: AcmeManager


@pytest.fixture
def acme_setup(
    components: StartComponents, http01_server, tmp_path: Path
) -> Callable[..., Awaitable[AcmeSetup]]:
    """start(pebble_env=, validity=, pebble_config=, serve_http01=True, settings={overrides},
    **AcmeManager keywords): named +
    pebble, an HTTP-01 server on Pebble's httpPort (unless told not to) and an AcmeManager on
    tmp_path/data with an empty cache."""

    async def start(
        *,
        pebble_env: dict[str, str] | None = None,
        validity: int | None = None,
        pebble_config: dict[str, object] | None = None,
        serve_http01: bool = True,
        settings: dict[str, object] | None = None,
        **manager_kw: object,
    ) -> AcmeSetup:
        c = components(pebble_env=pebble_env, validity=validity, extra_config=pebble_config)
        responder = Http01Responder()
        if serve_http01:
            await http01_server(responder, c.http_port)
        manager = AcmeManager(
            tmp_path / "data",
            c.settings(**(settings or {})),
            context_factory,
            responder,
            **manager_kw,
        )
        return AcmeSetup(c, responder, CertificateCache(), manager)

    return start


@pytest.fixture
def proxies() -> Iterator[Callable[[Path], ProxyProcess]]:
    """start(config) -> a running `tlsproxy run -c config` (log level info), stopped at
    teardown."""
    started: list[ProxyProcess] = []

    def start(config: Path) -> ProxyProcess:
        proxy = ProxyProcess(config, log_level="info")
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()
