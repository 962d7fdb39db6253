"""Fixtures for the end-to-end tests: real uvicorn apps and `tlsproxy run` processes.

The apps live for the whole session (they are stateless for these tests); each proxy belongs to
the test (or module) that started it and is stopped by the fixture, whatever the test did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import AppProcess, running, write_config
from tests.integration.proxy.support import Proxy

SINK_APP = "tests.integration.proxy.apps.sink:app"

MakeProxy = Callable[..., Proxy]


@pytest.fixture(scope="session")
def example_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    """examples/app.py on uvicorn: /, /pid, /healthz, /echo, /bytes/{n}, /slow/{s}, /ws."""
    with running(AppProcess(tmp_path_factory.mktemp("example-app"))) as app:
        yield app


@pytest.fixture(scope="session")
def sink_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    """apps/sink.py on uvicorn: POST /sink counts and hashes a body, GET /count."""
    with running(AppProcess(tmp_path_factory.mktemp("sink-app"), SINK_APP)) as app:
        yield app


class ProxyFactory:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[Proxy] = []

    def __call__(self, config_text: str, *, start: bool = True, name: str = "tlsproxy") -> Proxy:
        directory = self.base / f"proxy{len(self.started)}"
        proxy = Proxy(write_config(directory, config_text, f"{name}.toml"))
        self.started.append(proxy)
        if start:
            proxy.start()
        return proxy

    def stop_all(self) -> None:
        for proxy in self.started:
            proxy.stop()


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[MakeProxy]:
    """make_proxy(config_text) -> a started Proxy, stopped at the end of the test."""
    factory = ProxyFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def make_module_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeProxy]:
    """Like make_proxy, for a proxy shared by the tests of one module."""
    factory = ProxyFactory(tmp_path_factory.mktemp("proxies"))
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="session")
def uds_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    """examples/app.py on a unix socket."""
    with running(AppProcess(tmp_path_factory.mktemp("uds-app"), uds=True)) as app:
        yield app
