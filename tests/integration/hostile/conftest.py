"""The hostile-input suites (issue 9): fuzzing, faults, resources, soak, TLS edges.

They reuse the end-to-end fixtures of tests/integration/proxy (real `tlsproxy run` processes,
real uvicorn apps). Long modes are switched on by environment variables, documented in the
README: TLSPROXY_FUZZ_SECONDS, TLSPROXY_SOAK_SECONDS.
"""

from __future__ import annotations

from tests.integration.proxy.conftest import (  # noqa: F401 (fixtures, found by name)
    example_app,
    make_module_proxy,
    make_proxy,
    sink_app,
    uds_app,
)
