"""Tools for the end-to-end proxy tests, beside the lead's harness (which this only extends).

- `Proxy`: a `tlsproxy run` process (harness.ProxyProcess) that also knows its local CA root.
- `TlsConn`: a raw TLS socket for requests httpx would refuse to send (ambiguous framing,
  pipelining, slowloris); responses are parsed back with an h11 client so they must be valid.
- `TcpServer`: the base of hand-written upstreams: records every byte and each close.
- `RawUpstream`: a hand-written TCP upstream that records every byte and can hang or die.
- Certificates made with `cryptography` for `tls = {cert, key}` sites and broken-config checks.
- `s_client`: the real `openssl s_client`, and the certificate it was served.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import h11
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.harness import ProxyProcess, local_ca
from tests.unit.certs.factory import CA_KEY_USAGE

# --- the proxy process --------------------------------------------------------------------------


class Proxy(ProxyProcess):
    """`tlsproxy run` plus the root of its local CA (fetched with `tlsproxy ca` once started)."""

    ca: Path

    def start(self, timeout: float = 20.0) -> Proxy:
        super().start(timeout)
        self.ca = local_ca(self.dir, self.config_file)
        return self

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def client(self, **kwargs: object) -> httpx.Client:
        kwargs.setdefault("timeout", 30)
        return httpx.Client(verify=self.context(), **kwargs)  # type: ignore[arg-type]

    def url(self, path: str = "/", host: str = "localhost") -> str:
        return f"https://{host}:{self.port}{path}"

    def conn(self, sni: str | None = "localhost", **kwargs: object) -> TlsConn:
        context = self.context()
        if sni is None:  # no name to check; the chain is still verified against the local CA
            context.check_hostname = False
        return TlsConn(self.port, sni, context=context, **kwargs)  # type: ignore[arg-type]

    def vm_hwm_kib(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")


def proc_status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} for pid {pid}")


def curl_to(
    port: int, cacert: Path, host: str, *args: str, path: str = "/"
) -> subprocess.CompletedProcess[str]:
    """Real curl to https://HOST:PORT/PATH through the proxy on 127.0.0.1, trusting `cacert`."""
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(cacert),
            "--resolve",
            f"{host}:{port}:127.0.0.1",
            *args,
            f"https://{host}:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )


# --- raw TLS client -----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        values = [v.decode("latin-1") for k, v in self.headers if k == wanted]
        return ", ".join(values) if values else None


def unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class TlsConn:
    """One TLS connection driven by hand. `send` writes raw bytes; `response` reads exactly one
    response with an h11 client (so a malformed or truncated answer raises)."""

    def __init__(
        self,
        port: int,
        sni: str | None = "localhost",
        *,
        context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            self.sock = (context or unverified_context()).wrap_socket(raw, server_hostname=sni)
        except BaseException:
            raw.close()
            raise
        self._h11 = h11.Connection(h11.CLIENT)

    def __enter__(self) -> TlsConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, method: bytes = b"GET") -> Response:
        conn = self._h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        # The bytes went out raw; this only moves h11's client state so it parses the answer.
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        head: h11.Response | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(self._recv())
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return Response(head.status_code, list(head.headers), bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before a response")

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            return b""

    def wait_closed(self, timeout: float) -> tuple[float | None, bytes]:
        """Read until the peer closes: (seconds it took or None if still open, bytes read)."""
        start = time.monotonic()
        data = bytearray()
        self.sock.settimeout(0.1)
        while time.monotonic() - start < timeout:
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except (ConnectionResetError, ssl.SSLError, OSError):
                return time.monotonic() - start, bytes(data)
            if not chunk:
                return time.monotonic() - start, bytes(data)
            data += chunk
        return None, bytes(data)


class HalfClosingClient:
    """A TLS client driven by hand (ssl.SSLObject over memory BIOs), so that it can send its
    close_notify and its FIN after the request and still read what comes back, as TLS 1.3
    allows (RFC 8446 6.1) and socat or ncat do on end of input."""

    def __init__(
        self,
        proxy: Proxy,
        version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
        sni: str = "localhost",
    ) -> None:
        context = proxy.context()
        context.maximum_version = version
        self.sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=sni)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def half_close(self) -> None:
        try:
            self.tls.unwrap()  # writes our close_notify; the server's has not come yet
        except ssl.SSLWantReadError:
            pass
        self._flush()
        self.sock.shutdown(socket.SHUT_WR)

    def read_all(self) -> bytes:
        data = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                if not self._fill():
                    return data
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return data
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        self.sock.close()


def wait_tcp_closed(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closed a plain socket (EOF or reset), None if it stayed open."""
    start = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - start < timeout:
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
    return None


def parse_responses(raw: bytes, methods: list[bytes]) -> list[Response]:
    """Consecutive responses in `raw`, one per method, each a valid HTTP/1.1 message."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(raw)
    out = []
    for method in methods:
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        head = conn.next_event()
        assert isinstance(head, h11.Response), head
        body = bytearray()
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            body += event.data
        out.append(Response(head.status_code, list(head.headers), bytes(body)))
    return out


# --- a hand-written upstream --------------------------------------------------------------------


_CONTENT_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)\s*$")


class TcpServer:
    """A TCP server on 127.0.0.1 (port 0), a thread per connection, for upstreams written by
    hand. It records every byte each connection received (`received[i]`) and when it ended
    (`closed[i]`); a subclass says what to do in `serve`, reading with `recv`."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.closed: list[threading.Event] = []
        self.port = 0

    def start(self) -> TcpServer:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass
        for thread in self._threads:
            thread.join(2)

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data(self) -> bytes:
        return b"".join(bytes(b) for b in list(self.received))

    def serve(self, conn: socket.socket, buf: bytearray) -> None:
        raise NotImplementedError

    def recv(self, conn: socket.socket, buf: bytearray) -> bytes:
        """The next bytes from `conn` (also added to `buf`); b"" once it closed or we stop."""
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return b""
            buf += data
            return data
        return b""

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(0.1)
            self._conns.append(conn)
            buf, closed = bytearray(), threading.Event()
            self.received.append(buf)
            self.closed.append(closed)
            self._spawn(self._run, conn, buf, closed)

    def _run(self, conn: socket.socket, buf: bytearray, closed: threading.Event) -> None:
        try:
            self.serve(conn, buf)
        except OSError:
            pass
        finally:
            conn.close()
            closed.set()


class RawUpstream(TcpServer):
    """An upstream that records everything it receives.

    mode "ok":       answers each request (head + Content-Length body) with 200 "ok", keep-alive
    mode "hang":     accepts and reads, never answers
    mode "truncate": answers the first request with a head announcing `announced` bytes, sends
                     `sent` of them and closes the connection
    """

    def __init__(self, mode: str = "ok", announced: int = 100_000, sent: int = 1000) -> None:
        super().__init__()
        self.mode = mode
        self.announced = announced
        self.sent = sent

    def serve(self, conn: socket.socket, buf: bytearray) -> None:
        pending = b""
        while data := self.recv(conn, buf):
            if self.mode == "hang":
                continue
            pending += data
            while b"\r\n\r\n" in pending:
                head, _, rest = pending.partition(b"\r\n\r\n")
                match = _CONTENT_LENGTH.search(head)
                length = int(match.group(1)) if match else 0
                if len(rest) < length:
                    break
                pending = rest[length:]
                if self.mode == "truncate":
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                        b"Content-Length: %d\r\n\r\n" % self.announced + b"x" * self.sent
                    )
                    time.sleep(0.2)  # let the proxy relay what was sent before the close
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


# --- certificates -------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
        return cert_file, key_file


def make_ca(common_name: str = "tlsproxy tests CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    hosts: list[str],
    *,
    valid_from_days: float = -1,
    valid_until_days: float = 30,
) -> Issued:
    """A leaf for `hosts` signed by `ca`; negative `valid_until_days` makes an expired one."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=valid_from_days))
        .not_valid_after(now + dt.timedelta(days=valid_until_days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


# --- openssl s_client ---------------------------------------------------------------------------

_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def s_client(port: int, *args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """`openssl s_client` to the proxy; stdin is empty so it ends right after the handshake.
    What the server sends first is printed raw (an HTTP/2 server's SETTINGS frame, when ALPN
    chose h2): bytes that are no UTF-8 are replaced."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )


def served_certificate(port: int, *args: str) -> x509.Certificate | None:
    """The leaf the proxy served to `openssl s_client ARGS`, None if the handshake failed."""
    return served_certificate_in(s_client(port, *args))


def served_certificate_in(result: subprocess.CompletedProcess[str]) -> x509.Certificate | None:
    """The leaf in what `openssl s_client` printed, None if its handshake failed."""
    match = _PEM.search(result.stdout)
    if result.returncode != 0 or match is None:
        return None
    return x509.load_pem_x509_certificate(match.group(0).encode())


# --- configs ------------------------------------------------------------------------------------


def proxy_config(
    sites: list[tuple[list[str], str]] | list[tuple[list[str], str, str]],
    upstreams: dict[str, str],
    *,
    default_site: str | None = None,
    limits: str = "",
    server: str = "",
) -> str:
    """A config on a free port: `sites` are (hosts, upstream[, tls TOML value]) with the local CA
    by default, `upstreams` map names to one `servers` entry each."""
    default = f'default_site = "{default_site}"' if default_site else ""
    parts = [
        f'[server]\nhttps = ["127.0.0.1:0"]\nhttp = []\ndata_dir = "data"\n{default}\n{server}\n',
        f"[limits]\n{limits}\n",
    ]
    for hosts, upstream, *tls in sites:
        host_list = ", ".join(f'"{h}"' for h in hosts)
        tls_value = tls[0] if tls else '"internal"'
        parts.append(
            f'[[site]]\nhosts = [{host_list}]\ntls = {tls_value}\nupstream = "{upstream}"\n'
        )
    for name, address in upstreams.items():
        parts.append(f'[upstream.{name}]\nservers = ["{address}"]\n')
    return "\n".join(parts)
