"""The TLS layer against odd and hostile clients (issue 9, "TLS layer").

Real `openssl s_client` processes where it can say what we need, and ClientHellos written byte by
byte where it refuses to (a server name over 255 bytes, with a NUL or non-ASCII bytes, old
versions without the client's own policy in the way). A hand-written ClientHello offers TLS 1.2
only, so the server's Certificate message comes back in clear and says which certificate a name
got, without finishing the handshake.

Two proxies: `proxy` has a default_site (localhost), `strict` has none. Each test also checks that
what it did left no traceback or unexpected error in the proxy's log.
"""

from __future__ import annotations

import os
import random
import re
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography import x509

from tests.integration.harness import running
from tests.integration.hostile import procstats
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, RawUpstream, proxy_config

PUNYCODE = "xn--bcher-kva.test"  # bücher.test
MAX_CONNECTIONS = 64
LIMITS = f'handshake_timeout = "1s"\nmax_connections = {MAX_CONNECTIONS}\n'
# Lines that must never appear in the proxy's log, whatever a client sends.
LOG_ALARMS = re.compile(r"Traceback|unexpected error|Exception ignored| ERROR | CRITICAL ")

# TLS constants (RFC 8446, RFC 5246).
ALERT, HANDSHAKE = 21, 22
SERVER_HELLO, CERTIFICATE, SERVER_HELLO_DONE = 2, 11, 14
PROTOCOL_VERSION, UNRECOGNIZED_NAME, NO_RENEGOTIATION = 70, 112, 100
HANDSHAKE_FAILURE = 40


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    with running(RawUpstream("ok")) as server:
        yield server


def edges_config(upstream: RawUpstream, default_site: str | None) -> str:
    return proxy_config(
        [(["localhost"], "raw"), ([PUNYCODE], "raw")],
        {"raw": upstream.server},
        default_site=default_site,
        limits=LIMITS,
    )


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, upstream: RawUpstream) -> Proxy:
    return make_module_proxy(edges_config(upstream, "localhost"))


@pytest.fixture(scope="module")
def strict(make_module_proxy: MakeProxy, upstream: RawUpstream) -> Proxy:
    return make_module_proxy(edges_config(upstream, None), name="strict")


@pytest.fixture(autouse=True)
def quiet_logs(proxy: Proxy, strict: Proxy) -> Iterator[None]:
    marks = [(p, len(p.log())) for p in (proxy, strict)]
    yield
    for p, mark in marks:
        assert p.proc is not None and p.proc.poll() is None, "the proxy died"
        new = p.log()[mark:]
        assert not LOG_ALARMS.search(new), new[-3000:]


def served(proxy: Proxy) -> None:
    """An ordinary client still gets an answer."""
    with proxy.conn() as conn:
        conn.send(b"GET /served HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert conn.response().body == b"ok"


# --- a ClientHello written by hand --------------------------------------------------------------


def _vector(length_bytes: int, body: bytes) -> bytes:
    return len(body).to_bytes(length_bytes, "big") + body


def _extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def client_hello(sni: bytes | None = b"localhost", version: int = 0x0303) -> bytes:
    """One TLS record with a ClientHello offering `version` and nothing newer (no
    supported_versions extension), and `sni` as it is, unchecked."""
    # The proxy's suites, and CBC ones that TLS 1.0 and 1.1 can use: an old version is then
    # refused for being old, not for want of a cipher.
    suites = bytes.fromhex("c02bc02fc02cc030cca9cca8c009c013c00ac014002f0035")
    extensions = b""
    if sni is not None:
        extensions += _extension(0, _vector(2, b"\x00" + _vector(2, sni)))
    extensions += _extension(10, _vector(2, bytes.fromhex("001d00170018")))  # groups
    extensions += _extension(11, _vector(1, b"\x00"))  # point formats
    extensions += _extension(13, _vector(2, bytes.fromhex("040305030603080408050806")))
    body = (
        version.to_bytes(2, "big")
        + os.urandom(32)
        + _vector(1, b"")
        + _vector(2, suites)
        + _vector(1, b"\x00")
        + _vector(2, extensions)
    )
    return bytes((HANDSHAKE, 3, 1)) + _vector(2, bytes((1,)) + _vector(3, body))


@dataclass
class Reply:
    """What the server sent back to a hand-written ClientHello, until its first flight ended
    or it closed."""

    data: bytes
    closed: bool  # the server ended the connection (EOF or reset)

    def records(self) -> list[tuple[int, bytes]]:
        out, data = [], self.data
        while len(data) >= 5:
            length = int.from_bytes(data[3:5], "big")
            out.append((data[0], data[5 : 5 + length]))
            data = data[5 + length :]
        return out

    def handshake_messages(self) -> list[tuple[int, bytes]]:
        stream = b"".join(body for kind, body in self.records() if kind == HANDSHAKE)
        out = []
        while len(stream) >= 4:
            length = int.from_bytes(stream[1:4], "big")
            out.append((stream[0], stream[4 : 4 + length]))
            stream = stream[4 + length :]
        return out

    @property
    def alert(self) -> int | None:
        """The description of the first alert the server sent, if any."""
        for kind, body in self.records():
            if kind == ALERT and len(body) == 2:
                return body[1]
        return None

    @property
    def server_hello(self) -> bool:
        return any(kind == SERVER_HELLO for kind, _ in self.handshake_messages())

    @property
    def subject(self) -> str | None:
        """The served leaf's subject, from the (TLS 1.2, so clear-text) Certificate message."""
        for kind, body in self.handshake_messages():
            if kind == CERTIFICATE:
                length = int.from_bytes(body[3:6], "big")
                leaf = x509.load_der_x509_certificate(body[6 : 6 + length])
                return leaf.subject.rfc4514_string()
        return None

    @property
    def refused(self) -> bool:
        return not self.server_hello and self.closed


def exchange(proxy: Proxy, data: bytes, timeout: float = 5.0) -> Reply:
    """Send `data` on a new TCP connection and read until ServerHelloDone or the close."""
    received = b""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:
        sock.sendall(data)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return Reply(received, closed=True)
            if not chunk:
                return Reply(received, closed=True)
            received += chunk
            if any(
                kind == SERVER_HELLO_DONE for kind, _ in Reply(received, False).handshake_messages()
            ):
                return Reply(received, closed=False)


def test_the_hand_written_client_hello_is_a_real_one(proxy: Proxy, strict: Proxy) -> None:
    """The tool the other tests rely on: a name the proxy has gets its certificate, one it
    does not have gets the strict proxy's unrecognized_name alert."""
    reply = exchange(proxy, client_hello(b"localhost"))
    assert reply.server_hello and reply.subject == "CN=localhost" and not reply.closed
    reply = exchange(strict, client_hello(b"unknown.test"))
    assert reply.refused and reply.alert == UNRECOGNIZED_NAME


# --- openssl s_client ---------------------------------------------------------------------------


def s_client(proxy: Proxy, *args: str, timeout: float = 15) -> str:
    """`openssl s_client -msg ARGS` with empty stdin: its stdout and stderr together."""
    result = subprocess.run(
        [
            *("openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}"),
            *("-CAfile", str(proxy.ca), "-msg", *args),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return (result.stdout + result.stderr).decode(errors="replace")


def received(output: str, what: str) -> list[str]:
    """The `-msg` lines for messages the client received ("<<<") that end with `what` (a
    message name such as "ServerHello", or an alert's description)."""
    return [
        line
        for line in output.splitlines()
        if line.startswith("<<<") and line.rstrip().endswith(f" {what}")
    ]


def output_lines(output: str, prefix: str) -> list[str]:
    return [line.rstrip() for line in output.splitlines() if line.startswith(prefix)]


def subject_of(output: str) -> str | None:
    for line in output.splitlines():
        if line.startswith("subject="):
            return line.split("=", 1)[1].replace(" ", "")
    return None


# --- versions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "name"), [("-tls1", "TLS 1.0"), ("-tls1_1", "TLS 1.1")])
def test_tls_1_0_and_1_1_are_refused_by_the_proxy(proxy: Proxy, flag: str, name: str) -> None:
    mark = len(proxy.log())
    # SECLEVEL=0: Debian's OpenSSL would not even offer these versions otherwise.
    out = s_client(proxy, flag, "-cipher", "DEFAULT:@SECLEVEL=0", "-servername", "localhost")
    assert f">>> {name}, Handshake" in out and "ClientHello" in out, out  # it was offered
    assert not received(out, "ServerHello"), out
    assert subject_of(out) is None and "Cipher is (NONE)" in out, out
    # The alert OpenSSL queued, flushed by the proxy (the event loop would drop it), says why.
    alerts = [line for line in output_lines(out, "<<<") if "Alert" in line]
    assert alerts and all(line.endswith("protocol_version") for line in alerts), out
    # And the refusal is the proxy's, not the client's own policy.
    proxy.wait_for_log(r"handshake failed: \[SSL: UNSUPPORTED_PROTOCOL\]", start=mark)
    served(proxy)


@pytest.mark.parametrize("version", [0x0300, 0x0301, 0x0302])
def test_ssl3_tls10_tls11_client_hellos_get_no_server_hello(proxy: Proxy, version: int) -> None:
    reply = exchange(proxy, client_hello(b"localhost", version))
    assert reply.refused, reply
    # SSL 3.0 has no protocol_version alert (TLS 1.0 brought it): OpenSSL, as in nginx, says
    # handshake_failure to it.
    assert reply.alert == (HANDSHAKE_FAILURE if version == 0x0300 else PROTOCOL_VERSION), reply


@pytest.mark.parametrize(("flag", "version"), [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_tls_1_2_and_1_3_are_served(proxy: Proxy, flag: str, version: str) -> None:
    out = s_client(proxy, flag, "-servername", "localhost", "-verify_return_error")
    assert f"New, {version}, Cipher is" in out, out
    assert "Verify return code: 0 (ok)" in out, out
    assert subject_of(out) == "CN=localhost"


# --- renegotiation and key updates --------------------------------------------------------------


def interactive_s_client(
    proxy: Proxy, flag: str, steps: list[tuple[str, bytes]], until: str
) -> str:
    """s_client in its interactive mode. Each step (after, line) writes `line` once `after`
    shows in the output ("R" asks for a renegotiation, "K" for a TLS 1.3 key update; they only
    work after the handshake, and s_client takes a whole read of stdin for one command, so each
    line waits for the previous one to be done). Reads until `until` shows, s_client exits, or
    10 s pass."""
    proc = subprocess.Popen(
        [
            *("openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}"),
            *("-CAfile", str(proxy.ca), "-servername", "localhost", flag, "-msg", "-crlf"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    output = b""
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        deadline = time.monotonic() + 10
        pending = list(steps)
        while time.monotonic() < deadline and until.encode() not in output:
            if pending and pending[0][0].encode() in output:
                proc.stdin.write(pending.pop(0)[1])
                proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                chunk = proc.stdout.read()
                if not chunk:
                    break
                output += chunk
    finally:
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
    return output.decode(errors="replace")


def test_client_initiated_renegotiation_is_refused(proxy: Proxy) -> None:
    for _ in range(3):  # and again: a refusal costs the proxy nothing it keeps
        out = interactive_s_client(
            proxy, "-tls1_2", [("Verify return code", b"R\n")], until="no renegotiation"
        )
        assert "RENEGOTIATING" in out, out  # the client asked
        assert received(out, "no_renegotiation"), out  # the proxy said no
        assert len(received(out, "ServerHello")) == 1, out  # and never handshook again
        served(proxy)


def test_a_tls_1_3_key_update_is_answered_and_the_connection_goes_on(proxy: Proxy) -> None:
    """KeyUpdate is TLS 1.3's legitimate rekeying (what renegotiation is not): the proxy must
    answer one it is asked for and keep serving the connection."""
    request = b"GET /after-key-update HTTP/1.1\nHost: localhost\nConnection: close\n\n"
    steps = [("Verify return code", b"K\n"), ("KEYUPDATE", request)]
    out = interactive_s_client(proxy, "-tls1_3", steps, until="HTTP/1.1 200")
    assert "KEYUPDATE" in out, out
    assert received(out, "KeyUpdate"), out  # the proxy updated its keys too, as asked
    assert "HTTP/1.1 200 OK" in out, out


# --- SNI ----------------------------------------------------------------------------------------

REFUSED = "refused"
LOCALHOST = "CN=localhost"

# (name, with a default_site, without one). What s_client can send goes through s_client too.
SNI_CASES = [
    ("localhost.", LOCALHOST, LOCALHOST),  # a trailing dot: the same name
    ("LOCALHOST", LOCALHOST, LOCALHOST),  # names are case-insensitive
    ("LocalHost.", LOCALHOST, LOCALHOST),
    (PUNYCODE, f"CN={PUNYCODE}", f"CN={PUNYCODE}"),  # punycode is a name like any other
    (PUNYCODE.upper() + ".", f"CN={PUNYCODE}", f"CN={PUNYCODE}"),
    ("127.0.0.1", LOCALHOST, REFUSED),  # an IP literal (RFC 6066 forbids it): unknown name
    ("::1", LOCALHOST, REFUSED),
    ("unknown.test", LOCALHOST, REFUSED),
    ("a" * 64 + ".test", LOCALHOST, REFUSED),  # a label over 63 bytes: unknown name
    (("a" * 62 + ".") * 4 + "a", LOCALHOST, REFUSED),  # 253 bytes, DNS's longest name
    (None, LOCALHOST, REFUSED),  # no SNI at all
]


@pytest.mark.parametrize(
    ("sni", "with_default", "without_default"),
    SNI_CASES,
    ids=[repr(case[0])[:24] for case in SNI_CASES],
)
def test_sni_oddities(
    proxy: Proxy, strict: Proxy, sni: str | None, with_default: str, without_default: str
) -> None:
    args = ["-servername", sni] if sni is not None else ["-noservername"]
    for target, expected in ((proxy, with_default), (strict, without_default)):
        out = s_client(target, *args)
        reply = exchange(target, client_hello(sni.encode() if sni is not None else None))
        if expected == REFUSED:
            assert subject_of(out) is None, out
            assert "SSL alert number 112" in out, out  # unrecognized_name
            assert reply.refused and reply.alert == UNRECOGNIZED_NAME, reply
        else:
            assert subject_of(out) == expected, out
            assert reply.subject == expected, reply
    served(proxy)


@pytest.mark.parametrize(
    "sni",
    [
        b"a" * 256,  # one byte over what RFC 6066 allows
        (b"a" * 60 + b".") * 5 + b"test",  # 309 bytes, in labels
        b"a" * 16000,  # as much as one record holds
        b"local\x00host",  # a NUL inside
    ],
    ids=["256-bytes", "309-bytes", "16000-bytes", "nul"],
)
def test_sni_openssl_rejects_is_a_refused_handshake_on_both(
    proxy: Proxy, strict: Proxy, sni: bytes
) -> None:
    """OpenSSL rejects these names itself, before the SNI callback: no certificate, not even
    the default site's. The alert it queues is dropped (see the README), so the client sees the
    connection close; if an alert does come, it must be a fatal one."""
    for target in (proxy, strict):
        reply = exchange(target, client_hello(sni))
        assert reply.refused, reply
        assert reply.subject is None
    served(proxy)


def test_sni_empty_name_is_no_name(proxy: Proxy, strict: Proxy) -> None:
    """A server_name extension whose name is empty: treated as no SNI."""
    assert exchange(proxy, client_hello(b"")).subject == LOCALHOST
    reply = exchange(strict, client_hello(b""))
    assert reply.refused and reply.alert == UNRECOGNIZED_NAME, reply


def test_sni_with_two_trailing_dots_is_not_refused_with_a_default_site(proxy: Proxy) -> None:
    # Whether it is read as localhost or as an unknown name, the answer here is localhost's
    # certificate (localhost is the default site too); a refusal is neither reading.
    assert exchange(proxy, client_hello(b"localhost..")).subject == LOCALHOST


def test_sni_with_non_ascii_bytes_is_refused_quietly(make_proxy: MakeProxy) -> None:
    with running(RawUpstream("ok")) as upstream:
        own = make_proxy(edges_config(upstream, "localhost"))
        mark = len(own.log())
        for _ in range(3):
            reply = exchange(own, client_hello("bücher.test".encode()))
            assert reply.refused or reply.subject == LOCALHOST, reply
        served(own)
        time.sleep(0.2)  # the log is written by another process
        new = own.log()[mark:]
        assert not LOG_ALARMS.search(new), new


# --- handshakes that never complete -------------------------------------------------------------


def test_handshakes_that_never_complete_are_cut_at_handshake_timeout(proxy: Proxy) -> None:
    hello = client_hello(b"localhost")
    socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(3)]
    opened = time.monotonic()
    silent, half, drip = socks
    names = {silent: "silent", half: "half a ClientHello", drip: "a byte every 100 ms"}
    closed: dict[socket.socket, float] = {}
    try:
        half.sendall(hello[: len(hello) // 2])
        served(proxy)  # stalled handshakes keep no one else waiting
        sent = 0
        while len(closed) < len(socks) and time.monotonic() - opened < 8:
            # The drip would take 20 s to finish its ClientHello: handshake_timeout bounds the
            # whole handshake, not each wait for a read.
            if drip not in closed and sent < len(hello) - 1:
                try:
                    drip.send(hello[sent : sent + 1])
                    sent += 1
                except OSError:
                    closed[drip] = time.monotonic() - opened
            ready, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.1)
            for sock in ready:
                try:
                    if sock.recv(65536):
                        continue  # bytes before the close (an alert): not the close yet
                except OSError:
                    pass
                closed[sock] = time.monotonic() - opened
    finally:
        for sock in socks:
            sock.close()
    print("\nclosed after: " + ", ".join(f"{names[s]} {t:.2f} s" for s, t in closed.items()))
    for sock in socks:
        assert sock in closed, f"{names[sock]}: the handshake was never cut"
        # handshake_timeout is 1 s: generous above for a busy machine; below, it says that the
        # timeout closed it and nothing else.
        assert 0.8 <= closed[sock] <= 4.0, (names[sock], closed[sock])
    served(proxy)


# --- garbage instead of a ClientHello -----------------------------------------------------------


def garbage(rng: random.Random) -> dict[str, bytes]:
    hello = client_hello(b"localhost")
    return {
        "random": rng.randbytes(200),
        "huge-record": b"\x16\x03\x01\xff\xff" + rng.randbytes(100),  # says 64 KiB follow
        "over-16k-record": b"\x16\x03\x01\x48\x01" + rng.randbytes(100),
        "huge-handshake": b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # a 16 MiB hello
        "empty-record": b"\x16\x03\x01\x00\x00",
        "sslv2-hello": sslv2_hello(rng, 0x0303),
        "sslv2-hello-ssl2": sslv2_hello(rng, 0x0002),
        "sslv2-cut": bytes.fromhex("8080010301005700000020") + rng.randbytes(50),
        "alert-first": b"\x15\x03\x03\x00\x02\x02\x28",
        "ccs-first": b"\x14\x03\x03\x00\x01\x01",
        "appdata-first": b"\x17\x03\x03\x00\x10" + rng.randbytes(16),
        "zeros": bytes(1000),
        "hello-then-garbage": hello + rng.randbytes(300),
        "two-hellos": hello + hello,
        "hello-with-flipped-byte": flip(rng, hello),
        "options-request": b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n",
    }


def sslv2_hello(rng: random.Random, version: int) -> bytes:
    """An SSL 2.0-format ClientHello (what very old clients sent first)."""
    specs = bytes.fromhex("00c02f00c03000009c00002f0000ff")
    challenge = rng.randbytes(16)
    body = (
        b"\x01"
        + version.to_bytes(2, "big")
        + struct.pack("!HHH", len(specs), 0, len(challenge))
        + specs
        + challenge
    )
    return bytes((0x80 | len(body) >> 8, len(body) & 0xFF)) + body


def flip(rng: random.Random, data: bytes) -> bytes:
    index = rng.randrange(5, len(data))
    return data[:index] + bytes((data[index] ^ (1 << rng.randrange(8)),)) + data[index + 1 :]


def send_garbage(proxy: Proxy, payloads: list[bytes], timeout: float) -> int:
    """Send each payload on its own connection, all at once; the number the proxy closed
    within `timeout` (the rest are closed here)."""
    socks = []
    try:
        for data in payloads:
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            socks.append(sock)
            try:
                sock.sendall(data)
            except OSError:
                pass  # already refused
        closed = 0
        open_ = list(socks)
        deadline = time.monotonic() + timeout
        while open_ and time.monotonic() < deadline:
            ready, _, _ = select.select(open_, [], [], 0.1)
            for sock in ready:
                try:
                    if sock.recv(65536):
                        continue  # an alert, the plain-text 400: the close comes next
                except OSError:
                    pass
                open_.remove(sock)
                closed += 1
        return closed
    finally:
        for sock in socks:
            sock.close()


def test_garbage_instead_of_a_client_hello_does_no_harm(proxy: Proxy) -> None:
    """Every kind once, then 180 more picked at random (seeded), in waves of 60: each is
    closed (at once or at handshake_timeout), ordinary clients are served between the waves,
    and no slot of max_connections (64) nor file descriptor is left behind: there are three
    times more failed handshakes than slots."""
    rng = random.Random(9)
    kinds = list(garbage(rng).values())
    payloads = kinds + [rng.choice(kinds) for _ in range(180)]
    before = procstats.sample(proxy.pid)
    for start in range(0, len(payloads), 60):
        wave = payloads[start : start + 60]
        assert send_garbage(proxy, wave, timeout=6) == len(wave)
        served(proxy)
    # Every slot is free again: max_connections clients at once are all served.
    conns = []
    try:
        for _ in range(MAX_CONNECTIONS):
            conns.append(proxy.conn())
        for conn in conns:
            conn.send(b"GET /slot HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert [conn.response().body for conn in conns] == [b"ok"] * MAX_CONNECTIONS
    finally:
        for conn in conns:
            conn.close()
    # Counted on the listener's port: the upstream pool keeps its own idle connections a while.
    left = procstats.wait_tcp_connections_at_most(proxy.pid, 0, timeout=5, local_port=proxy.port)
    procstats.change(f"{len(payloads)} garbage connections", before, procstats.sample(proxy.pid))
    assert left == 0, f"{left} client connections still open"
