"""The SNI callback's choice (sans-I/O: a stand-in cache and site table, no handshakes)."""

from __future__ import annotations

from types import SimpleNamespace

from proxy.downstream.routing import Router
from proxy.tls import CertificateSelector

SITES = [
    SimpleNamespace(hosts=("localhost",), name="localhost"),
    SimpleNamespace(hosts=("app.test",), name="app.test"),  # tls = "acme", not issued yet
    SimpleNamespace(hosts=("*.wild.test",), name="*.wild.test"),
]


class Cache:
    """A certificate cache holding only some sites' certificates; `localhost` is the default."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names  # server name -> certificate

    def lookup_exact_or_wildcard(self, server_name: str) -> str | None:
        name = server_name.rstrip(".").lower()
        return self.names.get(name) or self.names.get("*." + name.partition(".")[2])

    def lookup(self, server_name: str | None) -> str | None:
        found = self.lookup_exact_or_wildcard(server_name) if server_name else None
        return found or self.names.get("localhost")


def selector() -> CertificateSelector:
    cache = Cache({"localhost": "cert-localhost", "*.wild.test": "cert-wild"})
    return CertificateSelector(cache, Router(SITES, "localhost"))  # type: ignore[arg-type]


def test_a_name_with_its_own_certificate_gets_it() -> None:
    assert selector().choose("a.wild.test") == "cert-wild"
    assert selector().choose("LOCALHOST.") == "cert-localhost"


def test_a_site_whose_certificate_is_not_issued_yet_fails_instead_of_the_default() -> None:
    assert selector().choose("app.test") is None
    assert selector().choose("App.Test.") is None


def test_unknown_names_and_no_sni_get_the_default_site() -> None:
    assert selector().choose("unknown.test") == "cert-localhost"
    assert selector().choose("a.b.wild.test") == "cert-localhost"  # one label only
    assert selector().choose(None) == "cert-localhost"


def test_refusal_is_an_unrecognized_name_alert() -> None:
    import ssl

    ssl_object = SimpleNamespace()
    assert selector().on_server_name(ssl_object, "app.test", None) == (  # type: ignore[arg-type]
        ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    )
    assert not hasattr(ssl_object, "tlsproxy_cert")
