"""A client with no TLS version or cipher in common gets OpenSSL's alert, as from nginx
(protocol_version, handshake_failure), not a bare close; the debug log says why. Both event
loops drop the alert OpenSSL queued on a failed handshake, so the proxy flushes it itself."""

from __future__ import annotations

import re

import pytest

from tests.integration.harness import AppProcess, basic_config
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import s_client

CASES = [
    # SECLEVEL=0: this machine's OpenSSL would not even offer TLS 1.1 otherwise.
    (
        ("-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"),
        "tlsv1 alert protocol version",
        "SSL alert number 70",
        r"\[SSL: UNSUPPORTED_PROTOCOL\].*: no TLS version in common",
    ),
    (
        ("-tls1_2", "-cipher", "AES128-SHA:@SECLEVEL=0"),  # CBC, no ECDHE: not served
        "alert handshake failure",
        "SSL alert number 40",
        r"\[SSL: NO_SHARED_CIPHER\].*: no cipher in common",
    ),
    (
        ("-tls1_3", "-ciphersuites", "TLS_AES_128_CCM_8_SHA256"),
        "alert handshake failure",
        "SSL alert number 40",
        r"\[SSL: NO_SHARED_CIPHER\].*: no cipher in common",
    ),
]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_nothing_in_common_gets_the_alert(
    make_proxy: MakeProxy, example_app: AppProcess, loop: str
) -> None:
    proxy = make_proxy(basic_config(example_app.server), start=False)
    proxy.loop = loop
    proxy.start()
    for args, says, number, logged in CASES:
        mark = len(proxy.log())
        result = s_client(proxy.port, "-servername", "localhost", *args)
        assert result.returncode != 0, result.stdout
        assert says in result.stderr and number in result.stderr, (args, result.stderr)
        assert "BEGIN CERTIFICATE" not in result.stdout
        line = proxy.wait_for_log(r"handshake failed: .*", start=mark).group(0)
        assert re.search(logged, line) and line.endswith("alert sent"), line
    # And the others are served as before.
    ok = s_client(proxy.port, "-servername", "localhost", "-tls1_2")
    assert ok.returncode == 0, ok.stderr
