"""`tlsproxy run --trace app.test`: a real proxy process, real curl over HTTP/1.1 and HTTP/2, the
example app behind it. The trace says each step of the README's walk-through, in order, with
what really happened; other names print nothing; secrets never show; a 421 and a failed
handshake say why."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import (
    AppProcess,
    ProxyProcess,
    basic_config,
    free_port,
    write_config,
)
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, curl_to

OTHER_SITE = """
[[site]]
hosts = ["other.test"]
tls = "internal"
upstream = "app"
"""
SECRET_TOKEN = "Bearer sEcReT-t0ken-4711"
SECRET_COOKIE = "session=c00kie-sEcReT-0815"


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, example_app: AppProcess) -> Iterator[Proxy]:
    directory = tmp_path_factory.mktemp("traced")
    config = write_config(directory, basic_config(example_app.server, extra=OTHER_SITE))
    # At info: the trace needs no debug level (and the debug lines would not be the trace's).
    proxy = Proxy(
        config,
        command=["run", "-c", str(config), "--trace", "app.test", "--trace", "OTHER.test"],
        log_level="info",
    )
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def curl(
    proxy: Proxy, *args: str, host: str = "app.test", path: str = "/"
) -> subprocess.CompletedProcess:
    """The status code curl got, on stdout."""
    return curl_to(
        proxy.port, proxy.ca, host, "-o", "/dev/null", "-w", "%{http_code}", *args, path=path
    )


def connection_trace(proxy: ProxyProcess, start: int) -> tuple[str, list[str]]:
    """The lines of the first traced connection that began after `start` in the log, once
    it ended: (its tag, its lines without the logger's prefix)."""
    first = proxy.wait_for_log(r"trace (c\d+) 1\. DNS and TCP", start=start)
    tag = first.group(1)
    proxy.wait_for_log(rf"trace {tag} (end|4\. Handshake: failed)", start=start)
    lines = [
        line[line.index("trace ") :]
        for line in proxy.log()[first.start() :].splitlines()
        if re.search(rf"trace {tag}[ .]", line)
    ]
    return tag, lines


def steps(lines: list[str]) -> list[str]:
    """The step numbers in the order the lines say them ("1." ... "9.", "end")."""
    out = []
    for line in lines:
        match = re.match(r"trace \S+ (\d\.|end:)", line)
        if match and (not out or out[-1] != match.group(1)):
            out.append(match.group(1))
    return out


def test_http11_request_step_by_step(traced: Proxy) -> None:
    start = len(traced.log())
    done = curl(traced, "--http1.1", "-H", f"Authorization: {SECRET_TOKEN}", "-b", SECRET_COOKIE)
    assert done.stdout == "200", done.stderr
    tag, lines = connection_trace(traced, start)
    text = "\n".join(lines)
    assert steps(lines) == ["1.", "2.", "3.", "4.", "5.", "6.", "7.", "9.", "end:"], text
    assert re.search(r"1\. DNS and TCP: accepted 127\.0\.0\.1:\d+ on 127\.0\.0\.1:\d+", text)
    assert re.search(
        r"2\. ClientHello and SNI: SNI app\.test; ALPN offered http/1\.1; TLS versions "
        r"offered TLSv1\.3,TLSv1\.2\S*; key shares offered x25519",
        text,
    )
    assert re.search(
        r"3\. Certificate choice: site 'localhost', exact match for app\.test; subject "
        r"CN=\S+, issuer CN=tlsproxy local intermediate .*, serial [0-9a-f]+, not_after \d{4}-",
        text,
    )
    assert re.search(
        r"4\. Handshake: done in \d+\.\dms: TLSv1\.3, cipher TLS_\w+, key exchange x25519 "
        r"\(as offered in the client's key share\), new session, ALPN http/1\.1: HTTP/1\.1",
        text,
    )
    assert f"trace {tag}.1 5. HTTP inside TLS: HTTP/1.1 request head as h11 read it: GET / " in text
    assert re.search(rf"trace {tag}\.1      host: app\.test:{traced.port}\n", text)
    assert f"authorization: <hidden, {len(SECRET_TOKEN)} bytes>" in text
    assert f"cookie: <hidden, {len(SECRET_COOKIE)} bytes>" in text
    assert f"6. Routing: Host app.test:{traced.port}, SNI app.test: site 'localhost'" in text
    assert "+ x-forwarded-for: 127.0.0.1   (what the proxy saw, set from the connection)" in text
    assert re.search(r"\+ forwarded: for=127\.0\.0\.1;proto=https;host=", text)
    assert re.search(
        r"7\. Forwarding: upstream 'app' server 127\.0\.0\.1:\d+ \(only server\); pool after "
        r"the choice: 127\.0\.0\.1:\d+ \d+ idle/1 in flight; (reused an idle keep-alive "
        r"connection|no idle connection: opening a new one)",
        text,
    )
    assert re.search(
        r"9\. Response: done: 200, \d+ bytes to the client, 0 request body bytes; handshake "
        r"\d+\.\dms, head \d+\.\dms, .*first response byte \d+\.\dms, last byte \d+\.\dms",
        text,
    )
    assert re.search(rf"trace {tag} end: the client closed it after 1 request\(s\)", text)


def test_http2_stream_and_host_from_authority(traced: Proxy) -> None:
    start = len(traced.log())
    done = curl(traced, "--http2", path="/healthz")
    assert done.stdout == "200", done.stderr
    tag, lines = connection_trace(traced, start)
    text = "\n".join(lines)
    assert steps(lines) == ["1.", "2.", "3.", "4.", "5.", "6.", "7.", "9.", "end:"], text
    assert "ALPN offered h2,http/1.1;" in text
    assert "new session, ALPN h2: HTTP/2" in text
    assert f"trace {tag}.s1 5. HTTP inside TLS: HTTP/2 stream 1" in text
    assert f":authority: app.test:{traced.port}" in text
    assert f"+ host: app.test:{traced.port}   (from :authority (HTTP/2))" in text
    assert "- :method, :path, :scheme, :authority   (HTTP/2 pseudo-header fields: the " in text
    assert f"trace {tag}.s1 9. Response: done: 200" in text


def test_secrets_never_appear(traced: Proxy) -> None:
    start = len(traced.log())
    for version in ("--http1.1", "--http2"):
        done = curl(traced, version, "-H", f"Authorization: {SECRET_TOKEN}", "-b", SECRET_COOKIE)
        assert done.stdout == "200", done.stderr
        connection_trace(traced, start)
        start = len(traced.log())
    log = traced.log()
    assert "authorization: <hidden" in log
    for secret in ("sEcReT", "t0ken-4711", "c00kie"):
        assert secret not in log


def test_another_name_prints_nothing(traced: Proxy) -> None:
    start = len(traced.log())
    done = curl(traced, host="localhost", path="/healthz")
    assert done.stdout == "200", done.stderr
    # A traced connection after it: by its end, the untraced one is long over.
    assert curl(traced).stdout == "200"
    tag, _ = connection_trace(traced, start)
    new = traced.log()[start:]
    assert {m for m in re.findall(r"trace (c\d+)", new)} == {tag}
    assert "SNI localhost" not in new


def test_a_misdirected_request_is_explained(traced: Proxy) -> None:
    start = len(traced.log())
    for version in ("--http1.1", "--http2"):
        done = curl(traced, version, "-H", "Host: other.test")
        assert done.stdout == "421", done.stderr
        _, lines = connection_trace(traced, start)
        text = "\n".join(lines)
        assert (
            "6. Routing: Host other.test, SNI app.test: answered 421: Misdirected Request: "
            "Host belongs to site 'other.test' but the certificate served for SNI app.test "
            "belongs to site 'localhost'"
        ) in text
        assert "9. Response: done: 421" in text
        assert "7. Forwarding" not in text
        if version == "--http1.1":  # an error reply ends an HTTP/1.1 connection
            assert re.search(r"end: the proxy closed it.* after 1 request", text)
        start = len(traced.log())


def test_a_failed_handshake_says_why(traced: Proxy) -> None:
    start = len(traced.log())
    # TLS 1.1 only (its ciphers need OpenSSL's security level 0 on the client's side).
    done = curl(traced, "--tls-max", "1.1", "--ciphers", "DEFAULT@SECLEVEL=0")
    assert done.returncode != 0
    _, lines = connection_trace(traced, start)
    text = "\n".join(lines)
    assert (
        "2. ClientHello and SNI: SNI app.test; ALPN offered h2,http/1.1; TLS versions "
        "offered TLSv1.1;" in text
    )
    assert re.search(
        r"4\. Handshake: failed after \d+\.\dms: .*no TLS version in common "
        r"\(TLS 1\.2 and 1\.3 are served\)",
        text,
    )


def test_help_lists_trace() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    text = " ".join(out.stdout.split())
    assert "--trace HOST" in text
    assert "'*' traces every connection" in text


def test_a_websocket_upgrade_is_said(traced: Proxy) -> None:
    start = len(traced.log())
    with traced.conn(sni="app.test") as conn:
        conn.send(
            b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += conn.sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 101 ")
    _, lines = connection_trace(traced, start)
    text = "\n".join(lines)
    assert "9. Response: 101, upgraded to websocket: bytes now pass both ways as they are" in text


def test_no_sni_retries_and_the_balancer_with_trace_star(
    tmp_path: Path, example_app: AppProcess
) -> None:
    # A server that refuses connections first in the list: round_robin sends the first request
    # there, the connect is refused, and the request is retried on the app.
    dead = free_port()
    config = write_config(
        tmp_path,
        basic_config(example_app.server).replace(
            f'servers = ["{example_app.server}"]',
            f'servers = ["127.0.0.1:{dead}", "{example_app.server}"]\nbalance = "round_robin"',
        ),
    )
    proxy = Proxy(config, command=["run", "-c", str(config), "--trace", "*"], log_level="info")
    proxy.start()
    try:
        # By IP address: curl sends no SNI, which only '*' traces.
        done = curl_to(
            proxy.port, proxy.ca, "127.0.0.1", "-k", "-o", "/dev/null", "-w", "%{http_code}"
        )
        assert done.stdout == "200", done.stderr
        _, lines = connection_trace(proxy, 0)
    finally:
        proxy.stop()
    text = "\n".join(lines)
    assert "2. ClientHello and SNI: SNI none (the client connected by IP address)" in text
    assert (
        "3. Certificate choice: site 'localhost', the default site's (the client sent no SNI)"
        in (text)
    )
    assert f"server 127.0.0.1:{dead} (chosen by round_robin among 2)" in text
    assert re.search(rf"7\. Forwarding: connect failed after .*127\.0\.0\.1:{dead}", text)
    assert "the upstream failed (cannot connect" in text and "): retrying" in text
    assert f"server {example_app.server} (chosen by round_robin among 2)" in text
    assert re.search(r"9\. Response: done: 200, .*, 1 retry;", text)


def test_without_trace_nothing_is_traced(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    proxy = make_proxy(basic_config(example_app.server))  # at debug, the most verbose level
    for version in ("--http1.1", "--http2"):
        assert curl(proxy, version).stdout == "200"
    proxy.wait_for_log(r"handshake 127\.0\.0\.1:\d+ sni=app\.test")
    assert "tlsproxy.trace" not in proxy.log()


def test_reverse_proxy_traces_too_and_a_reload_keeps_it(
    tmp_path: Path, example_app: AppProcess
) -> None:
    port = free_port()
    data = tmp_path / "data"
    proxy = ProxyProcess(
        tmp_path / "reverse-proxy",
        log_level="info",
        command=["reverse-proxy", "--from", f"app.test:{port}", "--to", example_app.server,
                 "--data-dir", str(data), "--trace", "app.test"],
    )  # fmt: skip
    proxy.start()
    try:
        ca = data / "ca" / "root.pem"
        status = ("-o", "/dev/null", "-w", "%{http_code}")
        assert curl_to(port, ca, "app.test", *status).stdout == "200"
        first, _ = connection_trace(proxy, 0)
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log(r"reloaded reverse-proxy's flags")
        start = len(proxy.log())
        assert curl_to(port, ca, "app.test", *status).stdout == "200"
        second, lines = connection_trace(proxy, start)
    finally:
        proxy.stop()
    assert (first, second) == ("c1", "c2")
    assert any("9. Response: done: 200" in line for line in lines)


def _shape(line: str) -> str:
    """A trace line with what differs from run to run (numbers, names, keys) made equal."""
    line = line[line.index("trace ") :]
    line = re.sub(r"(serial|intermediate) [0-9a-f]+", r"\1 X", line)
    line = line.replace("app.test", "localhost")
    return re.sub(r"\d+", "#", line)


def test_the_readme_shows_what_the_trace_prints(traced: Proxy) -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme[readme.index("### Watch it happen: `--trace`") :]
    sample = section[
        section.index("```text\n") + 8 : section.index("\n```", section.index("```text"))
    ]
    # The README's command, against this test's proxy.
    start = len(traced.log())
    done = curl(traced, "--http1.1", "-H", "Keep-Alive: timeout=5", "-H",
                "X-Forwarded-For: 6.6.6.6", "-b", "session=abc")  # fmt: skip
    assert done.stdout == "200", done.stderr
    _, lines = connection_trace(traced, start)
    printed = {_shape(line) for line in lines}
    # The upstream's address and whether its connection was new differ from the README's run.
    varying = ("7. Forwarding: upstream", "connected in", "9. Response: done")
    expected = [_shape(line) for line in sample.splitlines() if not any(v in line for v in varying)]
    assert len(expected) > 15
    missing = [line for line in expected if line not in printed]
    assert not missing, "\n".join(missing) + "\n--- printed:\n" + "\n".join(sorted(printed))
