"""The proxy's side of certificates: what each site asks of `certs/`, in certs' own terms.

`certs/` never imports the proxy's config, so this module translates sites and the [acme] table
into `CertSpec`s and `AcmeSettings`, and builds the managers the server and the CLI use.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from certs.errors import CertError
from certs.manager import CertificateManager
from certs.models import CertSpec, ClientAuthSpec
from certs.storage import Storage, StorageError
from proxy.config import AcmeConfig, ClientAuth, Config, TlsFiles
from proxy.errors import ConfigError
from proxy.tls import server_context


def cert_specs(config: Config) -> list[CertSpec]:
    specs = []
    for site in config.sites:
        client_auth = _client_auth_spec(site.client_auth)
        if isinstance(site.tls, TlsFiles):
            specs.append(
                CertSpec(
                    name=site.name,
                    hosts=site.hosts,
                    source="files",
                    cert_file=site.tls.cert,
                    key_file=site.tls.key,
                    client_auth=client_auth,
                )
            )
        else:
            specs.append(
                CertSpec(
                    name=site.name,
                    hosts=site.hosts,
                    source=site.tls,
                    challenge=site.challenge,
                    broken=site.broken,
                    client_auth=client_auth,
                )
            )
    return specs


def _client_auth_spec(client_auth: ClientAuth | None) -> ClientAuthSpec | None:
    if client_auth is None:
        return None
    return ClientAuthSpec(ca=client_auth.ca, required=client_auth.required)


def default_cert_name(config: Config) -> str | None:
    """The spec whose certificate answers clients without SNI or with an unknown name."""
    if config.server.default_site is None:
        return None
    site = config.site_by_host(config.server.default_site)
    return site.name if site else None


def uses_acme(config: Config) -> bool:
    return any(site.tls == "acme" for site in config.sites)


def acme_settings(acme: AcmeConfig):  # -> certs.issuers.acme.AcmeSettings
    from certs.issuers.acme import AcmeSettings, DnsUpdateSettings

    dns = None
    if acme.dns is not None:
        dns = DnsUpdateSettings(
            server_host=acme.dns.server.host,
            server_port=acme.dns.server.port,
            tsig_key_file=Path(acme.dns.tsig_key),
            zone=acme.dns.zone,
            propagation_timeout=acme.dns.propagation_timeout,
        )
    return AcmeSettings(
        directory=acme.directory,
        email=acme.email,
        default_challenge=acme.challenge,
        ca_bundle=acme.ca_bundle,
        eab_kid=acme.eab_kid,
        eab_hmac_key=acme.eab_hmac_key,
        profile=acme.profile,
        dns=dns,
    )


def open_storage(config: Config) -> Storage:
    """`config`'s [storage]: data_dir, or data_dir as the working copy of a shared store.
    ConfigError naming the key when it cannot be opened (redis-py missing, a bad key file)."""
    try:
        return Storage.open(config.server.data_dir, config.storage)
    except StorageError as exc:
        raise ConfigError(key_of_cert_error(config, exc), str(exc)) from None


def certificate_manager(
    config: Config, *, isolate_crypto: bool = False, storage: Storage | None = None
) -> CertificateManager:
    """The manager of `config`'s certificates: its storage and the local CA's leaf lifetime."""
    return CertificateManager(
        config.server.data_dir,
        server_context,
        leaf_lifetime=leaf_lifetime(config),
        isolate_crypto=isolate_crypto,
        root_files=root_files(config),
        storage=storage if storage is not None else open_storage(config),
    )


def root_files(config: Config) -> tuple[Path, Path] | None:
    """[local_ca] root_cert and root_key, when the user brings a root."""
    ca = config.local_ca
    if ca.root_cert is None or ca.root_key is None:
        return None
    return ca.root_cert, ca.root_key


def leaf_lifetime(config: Config) -> timedelta:
    return timedelta(seconds=config.local_ca.leaf_lifetime)


def check_config(
    config: Config, *, isolate_crypto: bool = False, storage: Storage | None = None
) -> None:
    """Everything `tlsproxy check` and start-up verify beyond the TOML itself: the files named,
    the data directory, the ACME settings. Raises ConfigError naming the key at fault.

    `isolate_crypto` (what `run` passes): the checks that need `cryptography` run in a child
    process, so that the long-running proxy does not carry it (certs.crypto_worker)."""
    manager = certificate_manager(config, isolate_crypto=isolate_crypto, storage=storage)
    if not isolate_crypto:
        # `tlsproxy check` asks: a wrong URL or password is a config error to hear of now.
        # `run` starts without the shared store (it serves data_dir's copy meanwhile).
        try:
            manager.storage.ping()
        except StorageError as exc:
            raise ConfigError(key_of_cert_error(config, exc), str(exc)) from None
    specs = cert_specs(config)
    try:
        manager.validate(specs)
    except CertError as exc:
        raise ConfigError(key_of_cert_error(config, exc), str(exc)) from None
    if config.acme is not None and uses_acme(config):
        from certs.issuers.acme import validate_settings

        try:
            validate_settings(acme_settings(config.acme))
        except CertError as exc:
            raise ConfigError(_acme_key_of(config.acme, exc), str(exc)) from None


def _acme_key_of(acme: AcmeConfig, exc: CertError) -> str:
    path = getattr(exc, "path", None)
    if path is not None and acme.ca_bundle is not None and Path(path) == acme.ca_bundle:
        return "acme.ca_bundle"
    if path is not None and acme.dns is not None and Path(path) == acme.dns.tsig_key:
        return "acme.dns.tsig_key"
    return "acme"


def key_of_cert_error(config: Config, exc: CertError) -> str:
    if isinstance(exc, StorageError):
        key_file = config.storage.encryption_key_file
        if key_file is not None and str(key_file) in str(exc):
            return "storage.encryption_key_file"
        return "storage.url" if config.storage.backend == "redis" else "storage.backend"
    path = getattr(exc, "path", None)
    if path is not None and Path(path) == config.local_ca.root_cert:
        return "local_ca.root_cert"
    if path is not None and Path(path) == config.local_ca.root_key:
        return "local_ca.root_key"
    for i, site in enumerate(config.sites):
        auth = site.client_auth
        if path is not None and auth is not None and auth.ca != "internal":
            if Path(path) == auth.ca:
                return f"site[{i}].client_auth.ca"
        tls = site.tls
        if path is not None and not isinstance(tls, str):
            if Path(path) == tls.cert:
                return f"site[{i}].tls.cert"
            if Path(path) == tls.key:
                return f"site[{i}].tls.key"
    if path is not None:
        # data_dir itself, a file in it, or the ancestor that keeps it from being made
        data_dir = config.server.data_dir
        if (
            Path(path) == data_dir
            or Path(path) in data_dir.parents
            or data_dir in Path(path).parents
        ):
            return "server.data_dir"
    return "tls"
