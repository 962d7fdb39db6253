"""The end-to-end proxy fixtures (real `tlsproxy run` processes, the example app on uvicorn),
shared with tests/integration/proxy."""

from tests.integration.proxy.conftest import example_app, make_proxy  # noqa: F401
