"""Integration tests against a real tlsproxy: one line puts it in front of an app.

    from proxy.testing import TLSProxy

    with TLSProxy(app="pkg.module:app", hosts=["api.test"]) as p:
        assert p.client().get(p.url("api.test", "/")).status_code == 200

The pytest plugin (proxy.testing.pytest_plugin, registered through the `pytest11` entry point)
gives the same as fixtures: `tlsproxy` (a factory) and `tlsproxy_ca` (one CA per session).
httpx (for .client()) and uvicorn (for app=) come with `pip install tlsproxy[testing]`.
"""

from proxy.testing.authority import CertificateAuthority
from proxy.testing.errors import StartError
from proxy.testing.process import ClientCert, TLSProxy

__all__ = ["CertificateAuthority", "ClientCert", "StartError", "TLSProxy"]
