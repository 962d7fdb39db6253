"""Front contexts: which verify mode a connection starts with, and the SNI callback's refusal
of a connection that started with the wrong one (sans-I/O: stand-in cache, no handshakes)."""

from __future__ import annotations

import ssl
from pathlib import Path
from types import SimpleNamespace

import pytest

from certs.models import ClientAuthSpec
from proxy.config import ClientAuth, Site
from proxy.downstream.routing import Router
from proxy.tls import CertificateSelector

REQUIRED = ClientAuthSpec("internal", required=True)
OPTIONAL = ClientAuthSpec(Path("/ca.pem"), required=False)
SITES = [
    Site(("open.test",), "internal", "app"),
    Site(("req.test",), "internal", "app", client_auth=ClientAuth("internal", True)),
    Site(("opt.test",), "internal", "app", client_auth=ClientAuth(Path("/ca.pem"), False)),
]


class Context:
    """A certificate context as the selector sees it: a name and the client CAs in its store."""

    def __init__(self, name: str, cas: tuple[bytes, ...] = (b"root",)) -> None:
        self.name = name
        self.cas = cas

    def get_ca_certs(self, binary_form: bool = False) -> list[bytes]:
        return list(self.cas)


def installed(
    name: str, client_auth: ClientAuthSpec | None, cas: tuple[bytes, ...] = (b"root",)
) -> SimpleNamespace:
    return SimpleNamespace(spec_name=name, client_auth=client_auth, context=Context(name, cas))


class Cache:
    def __init__(self, entries: list[SimpleNamespace], default: str | None = "open.test") -> None:
        self.by_name = {e.spec_name: e for e in entries}
        self.default = default

    def lookup_exact_or_wildcard(self, server_name: str) -> SimpleNamespace | None:
        return self.by_name.get(server_name)

    def lookup(self, server_name: str | None) -> SimpleNamespace | None:
        found = self.by_name.get(server_name) if server_name else None
        return found or (self.by_name.get(self.default) if self.default else None)

    def entries(self) -> list[SimpleNamespace]:
        return list(self.by_name.values())


def selector(sites=SITES) -> CertificateSelector:
    cache = Cache(
        [
            installed("open.test", None),
            installed("req.test", REQUIRED),
            installed("opt.test", OPTIONAL),
        ]
    )
    return CertificateSelector(cache, Router(sites, "open.test"))  # type: ignore[arg-type]


def test_the_listener_peeks_only_when_a_site_has_client_auth() -> None:
    assert selector().asks_client_certificates
    assert not selector(SITES[:1]).asks_client_certificates


def test_each_name_starts_with_the_verify_mode_of_its_site() -> None:
    s = selector()
    assert s.front_context("open.test") is s.context
    assert s.context.verify_mode == ssl.CERT_NONE
    assert s.front_context("req.test").verify_mode == ssl.CERT_REQUIRED
    assert s.front_context("opt.test").verify_mode == ssl.CERT_OPTIONAL
    assert s.front_context("req.test") is s.front_context("req.test")  # its tickets stay valid
    assert s.front_context(None) is s.context  # the default site, without client_auth
    assert s.front_context("unknown.test") is s.context


def test_front_contexts_keep_the_listener_settings() -> None:
    s = selector()
    front = s.front_context("req.test")
    assert front.sni_callback == s.on_server_name
    assert front.sslobject_class is s.context.sslobject_class
    assert front.minimum_version == s.context.minimum_version
    assert front.get_ciphers() == s.context.get_ciphers()


@pytest.mark.parametrize(
    ("started_as", "server_name"),
    [
        ("open.test", "req.test"),  # the peek read no name, or another one: no certificate asked
        ("open.test", "opt.test"),
        ("req.test", "open.test"),  # would ask a site that wants none
        ("req.test", "opt.test"),  # another client_auth site: its own CA, its own tickets
        ("opt.test", "req.test"),  # optional where it is required
    ],
)
def test_a_connection_started_for_another_site_is_refused(
    started_as: str, server_name: str
) -> None:
    s = selector()
    ssl_object = SimpleNamespace()
    result = s.on_server_name(ssl_object, server_name, s.front_context(started_as))  # type: ignore[arg-type]
    assert result == ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
    assert not hasattr(ssl_object, "tlsproxy_cert")


@pytest.mark.parametrize("name", ["open.test", "req.test", "opt.test"])
def test_a_connection_started_for_its_own_site_goes_on(name: str) -> None:
    s = selector()
    ssl_object = SimpleNamespace(context=None)
    assert s.on_server_name(ssl_object, name, s.front_context(name)) is None  # type: ignore[arg-type]
    assert ssl_object.context.name == name


def test_a_reload_drops_the_front_contexts_of_sites_gone() -> None:
    s = selector()
    before = s.front_context("req.test")
    s.update(Cache([installed("open.test", None), installed("req.test", REQUIRED)]), s.sites)
    assert s.front_context("req.test") is before
    changed = ClientAuthSpec("internal", required=False)
    s.update(Cache([installed("req.test", changed)]), s.sites)
    assert s.front_context("req.test") is not before
    assert s.front_context("req.test").verify_mode == ssl.CERT_OPTIONAL


def test_new_client_cas_get_a_new_front_so_old_tickets_are_refused() -> None:
    s = selector()
    before = s.front_context("req.test")
    reloaded = installed("req.test", REQUIRED, cas=(b"another root",))
    s.cache.by_name["req.test"] = reloaded  # type: ignore[attr-defined]
    after = s.front_context("req.test")
    assert after is not before
    ssl_object = SimpleNamespace(context=None)
    assert (
        s.on_server_name(ssl_object, "req.test", before)  # type: ignore[arg-type]
        == ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
    )
    assert s.on_server_name(ssl_object, "req.test", after) is None  # type: ignore[arg-type]


def test_a_renewal_between_the_peek_and_the_client_hello_keeps_the_front() -> None:
    # The race CI met: a connection started with the front of the old certificate, and the
    # renewed one (same client CAs) was installed before OpenSSL read its ClientHello.
    s = selector()
    before = s.front_context("req.test")
    renewed = installed("req.test", REQUIRED)
    s.cache.by_name["req.test"] = renewed  # type: ignore[attr-defined]
    ssl_object = SimpleNamespace(context=None)
    assert s.on_server_name(ssl_object, "req.test", before) is None  # type: ignore[arg-type]
    assert ssl_object.context is renewed.context
    assert s.front_context("req.test") is before  # and tickets issued before it still resume


def test_a_client_auth_default_site_asks_clients_without_sni() -> None:
    cache = Cache([installed("open.test", None), installed("req.test", REQUIRED)], "req.test")
    s = CertificateSelector(cache, Router(SITES, "req.test"))  # type: ignore[arg-type]
    front = s.front_context(None)
    assert front.verify_mode == ssl.CERT_REQUIRED
    assert s.front_context("unknown.test") is front  # an unknown name gets the default too
    ssl_object = SimpleNamespace(context=None)
    assert s.on_server_name(ssl_object, None, front) is None  # type: ignore[arg-type]
    refused = s.on_server_name(ssl_object, None, s.context)  # type: ignore[arg-type]
    assert refused == ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
