"""The testing API (proxy.testing) and its pytest plugin, used as a test author would."""

from __future__ import annotations

from tests.integration.proxy.conftest import example_app  # noqa: F401 (a fixture, found by name)
