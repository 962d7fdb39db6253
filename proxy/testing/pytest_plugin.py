"""The pytest plugin: installing tlsproxy is enough to have these fixtures.

- `tlsproxy_ca`: one local CA for the whole session; every proxy the `tlsproxy` fixture starts
  issues from it, so a client made once (`tlsproxy_ca.ssl_context()`) trusts them all.
- `tlsproxy`: a factory taking TLSProxy's arguments; it starts the proxy and stops it (and
  everything it started) at the end of the test. When the test failed, the proxy's log is
  printed with the teardown's output, where pytest shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from proxy.testing.authority import CertificateAuthority
from proxy.testing.process import TLSProxy


@pytest.fixture(scope="session")
def tlsproxy_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """One local CA for the session: every proxy of the `tlsproxy` fixture issues from it.
    `.ca_file` is its root (PEM), `.ssl_context()` a client context trusting it."""
    return CertificateAuthority(tmp_path_factory.mktemp("tlsproxy-ca"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_failed] = report.failed
    return report


_failed = pytest.StashKey[bool]()


@pytest.fixture
def tlsproxy(
    request: pytest.FixtureRequest,
    tlsproxy_ca: CertificateAuthority,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., TLSProxy]]:
    """A factory taking TLSProxy's arguments: `tlsproxy(app=..., hosts=[...])` returns a
    started proxy (proxy.testing.TLSProxy); every one is stopped at the end of the test."""
    started: list[TLSProxy] = []

    def start(*args: Any, **kwargs: Any) -> TLSProxy:
        kwargs.setdefault("ca", tlsproxy_ca)
        # Under pytest's temporary directories, kept for the last runs as pytest keeps them:
        # the config and the proxy's log are there to read after a failure.
        kwargs.setdefault("directory", tmp_path_factory.mktemp("tlsproxy"))
        proxy = TLSProxy(*args, **kwargs)
        started.append(proxy)
        return proxy.start()

    try:
        yield start
    finally:
        failed = request.node.stash.get(_failed, False)
        for proxy in started:
            if failed and proxy.directory is not None:
                print(f"--- tlsproxy log ({proxy.log_file}) ---\n{proxy.logs()}")
            proxy.stop()
