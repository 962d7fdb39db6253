"""tlsproxy: the proxy side (listeners, TLS termination, HTTP forwarding, workers)."""

# The one place the version is written: pyproject.toml reads it from here (setuptools' dynamic
# version) and `tlsproxy --version` prints it, so a checkout and its installed copy agree.
__version__ = "0.1.0"
