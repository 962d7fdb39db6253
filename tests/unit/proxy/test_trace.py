"""The pure parts of `run --trace`: who is traced, redaction, the header diff against the head
forwarding.request_head really builds, the key exchange group's honest naming, the wording."""

from __future__ import annotations

from proxy.downstream.forwarding import TrustedProxies, request_head
from proxy.trace import (
    ConnectionTrace,
    Tracer,
    certificate_match,
    field_lines,
    head_fields,
    header_diff,
    negotiated_group,
    shown,
)

CLIENT = [
    (b"host", b"app.test"),
    (b"user-agent", b"curl/8"),
    (b"connection", b"keep-alive, x-secret-hop"),
    (b"x-secret-hop", b"1"),
    (b"keep-alive", b"timeout=5"),
    (b"x-forwarded-for", b"6.6.6.6"),
    (b"cookie", b"session=SECRETCOOKIE"),
    (b"authorization", b"Bearer SECRETTOKEN"),
]


def built(client: list[tuple[bytes, bytes]], *, trusted: TrustedProxies) -> bytes:
    return request_head(
        b"GET",
        b"/",
        client,
        client_ip="10.0.0.7",
        host=b"app.test",
        trusted=trusted,
        upgrade=None,
    )


def by_name(changes: list) -> dict[bytes, object]:
    return {c.name: c for c in changes}


def test_the_diff_of_a_real_head_from_an_untrusted_client() -> None:
    _, sent = head_fields(built(CLIENT, trusted=TrustedProxies()))
    changes = by_name(header_diff(CLIENT, sent, trusted=False))
    assert changes[b"connection"].kind == "removed"
    assert "RFC 9110 7.6.1" in changes[b"connection"].why
    assert changes[b"keep-alive"].kind == "removed"
    assert changes[b"x-secret-hop"].kind == "removed"
    assert "Connection header lists it" in changes[b"x-secret-hop"].why
    xff = changes[b"x-forwarded-for"]
    assert xff.kind == "replaced" and xff.after == (b"10.0.0.7",)
    assert "not in trusted_proxies" in xff.why
    for name in (b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"):
        assert changes[name].kind == "added"
    # Fields that went through as they were are no change.
    assert b"host" not in changes and b"user-agent" not in changes and b"cookie" not in changes


def test_a_trusted_client_is_appended_to() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"])
    _, sent = head_fields(built(CLIENT, trusted=trusted))
    xff = by_name(header_diff(CLIENT, sent, trusted=True))[b"x-forwarded-for"]
    assert xff.after == (b"6.6.6.6, 10.0.0.7",)
    assert "appended" in xff.why


def test_http2_host_from_authority_and_joined_cookies() -> None:
    client = [
        (b":method", b"GET"),
        (b":authority", b"app.test"),
        (b"cookie", b"a=1"),
        (b"cookie", b"b=2"),
    ]
    sent = [(b"host", b"app.test"), (b"cookie", b"a=1; b=2")]
    changes = by_name(header_diff(client, sent, trusted=False, http2=True))
    assert changes[b"host"].kind == "added" and ":authority" in changes[b"host"].why
    assert changes[b"cookie"].kind == "replaced" and "RFC 9113" in changes[b"cookie"].why
    assert b":method" not in changes


def test_secrets_are_shown_by_size_only() -> None:
    assert shown(b"authorization", b"Bearer SECRETTOKEN") == "<hidden, 18 bytes>"
    assert shown(b"cookie", b"x") == "<hidden, 1 bytes>"
    assert shown(b"set-cookie", b"a=b") == "<hidden, 3 bytes>"
    assert shown(b"proxy-authorization", b"Basic abc") == "<hidden, 9 bytes>"
    text = "\n".join(field_lines(CLIENT))
    assert "SECRET" not in text
    assert "authorization: <hidden" in text and "cookie: <hidden" in text
    # ... and in the diff, where a removed Proxy-Authorization or a joined cookie shows.
    client = [(b"proxy-authorization", b"Basic SECRETPROXY"), (b"cookie", b"SECRETA")]
    sent = [(b"cookie", b"SECRETA; SECRETB")]
    lines = [line for c in header_diff(client, sent, trusted=False) for line in c.lines()]
    assert lines and not any("SECRET" in line for line in lines)


def test_who_is_traced() -> None:
    tracer = Tracer(["App.Test."])
    assert tracer.wants("app.test") and tracer.wants("APP.TEST")
    assert not tracer.wants("localhost")
    assert not tracer.wants(None)  # no SNI: only '*' traces it
    everything = Tracer(["*"])
    assert everything.wants(None) and everything.wants("anything.test")


def test_the_group_is_named_only_where_it_can_be_known() -> None:
    # The first key share the server supports (GREASE, then x25519).
    assert negotiated_group("TLSv1.3", (0x2A2A, 0x001D)).startswith("x25519 (as offered")
    assert negotiated_group("TLSv1.3", (0x11EC, 0x001D)).startswith("x25519")
    assert "HelloRetryRequest" in negotiated_group("TLSv1.3", (0x9999,))
    assert "cannot name" in negotiated_group("TLSv1.2", (0x001D,))


def test_certificate_match_words() -> None:
    assert certificate_match("app.test", ("app.test",)) == "exact match for app.test"
    assert "wildcard" in certificate_match("a.app.test", ("*.app.test",))
    assert "no site's name" in certificate_match("b.c.app.test", ("*.app.test",))
    assert "no SNI" in certificate_match(None, ("app.test",))


def test_lines_carry_the_connection_and_request_tags() -> None:
    lines: list[str] = []
    conn = ConnectionTrace(7, 0.0, emit=lines.append)
    request = conn.request("s3", 1.0)
    request.head("GET / HTTP/2", [(b":method", b"GET")], "HTTP/2 stream 3")
    request.finished(200, 0, 12, 1.5)
    conn.closed(True, None)
    assert lines[0].startswith("trace c7.s3 5. HTTP inside TLS: HTTP/2 stream 3: GET / HTTP/2")
    assert lines[-2].startswith("trace c7.s3 9. Response: done: 200, 12 bytes")
    assert lines[-1] == "trace c7 end: the client closed it after 1 request(s)"


def test_forwarded_words_the_diff_of_the_head_sent() -> None:
    lines: list[str] = []
    request = ConnectionTrace(1, 0.0, emit=lines.append).request("s1", 0.0)
    h2_fields = [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"app.test")]
    h2_fields += CLIENT[1:]
    request.head("GET / HTTP/2", h2_fields, "HTTP/2 stream 1")
    request.forwarded(
        built([(b"host", b"app.test"), *CLIENT[1:]], trusted=TrustedProxies()), trusted=False
    )
    text = "\n".join(lines)
    assert "trace c1.s1 7. Forwarding: GET / HTTP/1.1: " in text
    assert "- :method, :path, :authority   (HTTP/2 pseudo-header fields" in text
    assert "+ host: app.test   (from :authority (HTTP/2))" in text
    assert "~ x-forwarded-for: 6.6.6.6 -> 10.0.0.7" in text
    assert "SECRET" not in text


def test_bad_trace_names_exit_2_naming_the_flag(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from proxy.cli import main, trace_names

    assert trace_names(["App.Test.", "*"]) == ["app.test.", "*"]
    for bad in ("", "app.test:8443", "a b"):
        assert main(["run", "-c", str(tmp_path / "none.toml"), "--trace", bad]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith("tlsproxy: error: --trace: expected a host name")
            and err.count("\n") == 1
        )
