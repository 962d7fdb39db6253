"""Errors of proxy.testing."""

from __future__ import annotations


class StartError(RuntimeError):
    """The proxy (or the app) did not start; the message ends with what the proxy printed."""
