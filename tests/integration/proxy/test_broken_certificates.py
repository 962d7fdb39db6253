"""Broken certificates on demand, refused by real clients.

One `tlsproxy run` serves six sites with `broken = KIND` and one good site, all from the same
local CA. Every client here trusts that CA's root and connects with the site's own name, so
each refusal is for the one thing the kind gets wrong; the good site on the same proxy, and the
same names once a SIGHUP turns `broken` off, are accepted by the same clients, so a test that
passed for a wrong reason (a bad CA file, a dead proxy) would fail here.

What each client says was read on this machine (OpenSSL 3.0, curl 7.88): the assertions hold
the reason (OpenSSL's verify code and text, curl's exit status 60 and its reason), not the rest
of the wording.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
from dataclasses import dataclass

import httpx
import pytest

from tests.integration.harness import AppProcess, tlsproxy, write_config
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, dns_names, served_certificate


@dataclass(frozen=True)
class Kind:
    name: str
    verify_code: int  # OpenSSL's X509_V_ERR_*, as Python's ssl reports it
    reason_text: str  # how OpenSSL (and so Python and httpx) words it; {host}: the name asked
    curl_text: str  # curl's reason, a regex matched against its stderr; {host} as above

    @property
    def host(self) -> str:
        return f"{self.name}.test"

    def reason(self, host: str) -> str:
        return self.reason_text.format(host=host)

    def curl(self, host: str) -> str:
        return self.curl_text.format(host=re.escape(host))


KINDS = [
    Kind("expired", 10, "certificate has expired", r"certificate has expired$"),
    Kind("not-yet-valid", 9, "certificate is not yet valid", r"certificate is not yet valid$"),
    Kind(
        "wrong-host",
        62,
        "Hostname mismatch, certificate is not valid for '{host}'",
        r"no alternative certificate subject name matches target host name '{host}'",
    ),
    Kind("self-signed", 18, "self-signed certificate", r"problem: self-signed certificate$"),
    Kind(
        "untrusted-root",
        19,
        "self-signed certificate in certificate chain",
        r"self-signed certificate in certificate chain$",
    ),
    Kind(
        "incomplete-chain",
        20,
        "unable to get local issuer certificate",
        r"unable to get local issuer certificate$",
    ),
]
GOOD = "good.test"


def config(upstream: str, *, broken: bool = True) -> str:
    sites = [f'[[site]]\nhosts = ["{GOOD}"]\nupstream = "app"\n']
    for kind in KINDS:
        # A second name per site: the broken certificate is served for every host of the site.
        line = f'broken = "{kind.name}"\n' if broken else ""
        sites.append(
            f'[[site]]\nhosts = ["{kind.host}", "www.{kind.host}"]\nupstream = "app"\n{line}'
        )
    return (
        '[server]\nhttps = ["127.0.0.1:0"]\nhttp = []\ndata_dir = "data"\n'
        f'shutdown_grace = "2s"\n\n{"".join(sites)}\n'
        f'[upstream.app]\nservers = ["{upstream}"]\n'
    )


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, example_app: AppProcess) -> Proxy:
    return make_module_proxy(config(example_app.server))


# --- the three clients ----------------------------------------------------------------------


def curl(proxy: Proxy, host: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl", "--silent", "--show-error", "--max-time", "10",
            "--cacert", str(proxy.ca), "--resolve", f"{host}:{proxy.port}:127.0.0.1",
            f"https://{host}:{proxy.port}/",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )  # fmt: skip


def python_ssl(proxy: Proxy, host: str) -> str:
    """The TLS version of a handshake that the default client context accepted."""
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock,
        proxy.context().wrap_socket(sock, server_hostname=host) as tls,
    ):
        return str(tls.version())


def httpx_get(proxy: Proxy, host: str) -> httpx.Response:
    with httpx.Client(verify=proxy.context(), timeout=10) as client:
        return client.get(
            f"https://127.0.0.1:{proxy.port}/",
            headers={"Host": host},
            extensions={"sni_hostname": host},
        )


def verification_error(exc: BaseException) -> ssl.SSLCertVerificationError:
    """The ssl error under httpx's ConnectError (httpx wraps httpcore's, which wraps it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    raise AssertionError(f"no SSLCertVerificationError under {exc!r}")


def assert_refused_by_all(proxy: Proxy, kind: Kind, host: str) -> None:
    result = curl(proxy, host)
    assert result.returncode == 60, (result.returncode, result.stderr)
    assert re.search(kind.curl(host), result.stderr, re.M), result.stderr
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        python_ssl(proxy, host)
    assert refused.value.verify_code == kind.verify_code
    assert refused.value.verify_message.startswith(kind.reason(host))
    with pytest.raises(httpx.ConnectError) as failed:
        httpx_get(proxy, host)
    assert kind.reason(host) in str(failed.value)
    assert verification_error(failed.value).verify_code == kind.verify_code


def assert_accepted_by_all(proxy: Proxy, host: str) -> None:
    result = curl(proxy, host)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["message"] == "Hello from behind tlsproxy"
    assert python_ssl(proxy, host).startswith("TLSv1.")
    assert httpx_get(proxy, host).status_code == 200


# --- one proxy, six broken sites and a good one ---------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_curl_refuses_with_exit_60_and_the_reason(proxy: Proxy, kind: Kind) -> None:
    for host in (kind.host, f"www.{kind.host}"):
        result = curl(proxy, host)
        assert result.returncode == 60, (result.returncode, result.stderr)
        assert re.search(kind.curl(host), result.stderr, re.M), result.stderr


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_python_ssl_refuses_with_the_verify_code(proxy: Proxy, kind: Kind) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        python_ssl(proxy, kind.host)
    assert refused.value.verify_code == kind.verify_code
    assert refused.value.verify_message.startswith(kind.reason(kind.host))
    assert refused.value.reason == "CERTIFICATE_VERIFY_FAILED"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_httpx_refuses_with_a_connect_error_carrying_the_reason(proxy: Proxy, kind: Kind) -> None:
    with pytest.raises(httpx.ConnectError) as failed:
        httpx_get(proxy, kind.host)
    assert kind.reason(kind.host) in str(failed.value)
    assert verification_error(failed.value).verify_code == kind.verify_code


def test_the_good_site_on_the_same_proxy_is_accepted_by_the_same_clients(proxy: Proxy) -> None:
    assert_accepted_by_all(proxy, GOOD)


def test_wrong_host_is_served_for_the_sites_names(proxy: Proxy) -> None:
    for host in ("wrong-host.test", "www.wrong-host.test"):
        served = served_certificate(proxy.port, "-servername", host)
        assert served is not None
        assert dns_names(served) == ["wrong-host.invalid"]


def test_start_up_warns_once_per_broken_site(proxy: Proxy) -> None:
    log = proxy.log()
    for kind in KINDS:
        warning = (
            f"WARNING tlsproxy: site {kind.host}, www.{kind.host} serves a deliberately broken "
            f"certificate ({kind.name}): clients must refuse it"
        )
        assert log.count(warning) == 1, log
    assert f"site {GOOD}" not in log


def test_check_and_certs_show_them_as_for_tests(proxy: Proxy) -> None:
    check = tlsproxy("check", "-c", str(proxy.config_file))
    assert check.returncode == 0, check.stderr
    certs = tlsproxy("certs", "-c", str(proxy.config_file))
    assert certs.returncode == 0, certs.stderr
    for kind in KINDS:
        assert f"broken={kind.name} (for tests: clients must refuse it)" in check.stdout
        (line,) = [x for x in certs.stdout.splitlines() if x.startswith(f"{kind.host},")]
        assert f"next_renewal=- (broken={kind.name} (for tests), never renewed)" in line
    (good,) = [x for x in certs.stdout.splitlines() if x.startswith(f"{GOOD} ")]
    assert "broken" not in good


def test_certs_renew_refuses_to_repair_one(proxy: Proxy) -> None:
    done = tlsproxy("certs", "renew", "www.expired.test", "-c", str(proxy.config_file))
    assert done.returncode == 1
    assert "serves a deliberately broken certificate (expired), never renewed" in done.stderr
    assert_refused_by_all(proxy, KINDS[0], "expired.test")


@pytest.mark.parametrize("command", ["check", "run"])
def test_an_unknown_kind_is_one_line_naming_the_key(tmp_path, command: str) -> None:
    text = config("127.0.0.1:9").replace('broken = "expired"', 'broken = "expird"')
    result = tlsproxy(command, "-c", str(write_config(tmp_path, text)), timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("tlsproxy: error: site[1].broken: expected one of 'expired'")
    assert "'incomplete-chain'" in result.stderr


# --- SIGHUP turns broken off and on for new connections ---------------------------------------


def reload(proxy: Proxy, text: str) -> None:
    mark = len(proxy.log())
    proxy.config_file.write_text(text)
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log(r"reloaded .*: 7 site\(s\)", timeout=30, start=mark)


def test_sighup_turns_broken_off_and_on(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    proxy = make_proxy(config(example_app.server))
    for kind in KINDS:
        assert_refused_by_all(proxy, kind, kind.host)

    mark = len(proxy.log())
    reload(proxy, config(example_app.server, broken=False))
    for kind in KINDS:
        assert_accepted_by_all(proxy, kind.host)
        assert_accepted_by_all(proxy, f"www.{kind.host}")
    assert "deliberately broken" not in proxy.log()[mark:]

    mark = len(proxy.log())
    reload(proxy, config(example_app.server))
    for kind in KINDS:
        assert_refused_by_all(proxy, kind, kind.host)
    assert proxy.log()[mark:].count("deliberately broken") == len(KINDS)
    assert_accepted_by_all(proxy, GOOD)


# --- the same through the testing API (proxy.testing.TLSProxy) --------------------------------


def test_tlsproxy_broken_argument(example_app: AppProcess) -> None:
    from proxy.testing import TLSProxy

    broken = {kind.host: kind.name for kind in KINDS}
    with TLSProxy(upstream=example_app.server, hosts=[GOOD], broken=broken) as p:
        with p.client(timeout=10) as client:
            assert client.get(p.url(GOOD)).status_code == 200
            for kind in KINDS:
                with pytest.raises(httpx.ConnectError) as failed:
                    client.get(p.url(kind.host))
                assert verification_error(failed.value).verify_code == kind.verify_code
                with (
                    socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock,
                    pytest.raises(ssl.SSLCertVerificationError) as refused,
                ):
                    p.ssl_context().wrap_socket(sock, server_hostname=kind.host)
                assert refused.value.verify_message.startswith(kind.reason(kind.host))

            # Another kind for a name, at a reload: new connections get the new one.
            p.reload(broken={**broken, "expired.test": "self-signed"})
            with pytest.raises(httpx.ConnectError) as failed:
                client.get(p.url("expired.test"))
            assert verification_error(failed.value).verify_message == "self-signed certificate"
        assert "serves a deliberately broken certificate (self-signed)" in p.logs()
