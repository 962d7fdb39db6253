"""Errors of proxy.testing."""

from __future__ import annotations


class StartError(RuntimeError):
    """The proxy (or the app) did not start; the message ends with what the proxy printed."""


def need(module: str, what: str) -> object:
    """Import `module`, which comes with the [testing] extra, or say how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs {module}: pip install 'tlsproxy[testing]'") from None
