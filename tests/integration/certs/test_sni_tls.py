"""CertificateManager.load() behind a real TLS server: each name gets its certificate."""

import ssl
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from certs.manager import CertificateManager
from certs.models import CertSpec
from tests.unit.certs.factory import make_ca, make_leaf, server_context, write_pair

from .conftest import client_context, connect

LOCAL = CertSpec("localhost", ("localhost", "app.test"), "internal")
WILD = CertSpec("*.wild.test", ("*.wild.test",), "internal")


@pytest.fixture
def files_ca():
    return make_ca("user's own CA")


@pytest.fixture
def files_spec(tmp_path, files_ca):
    now = datetime.now(UTC)
    cert, key = make_leaf(
        files_ca,
        ["files.test"],
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=9),
    )
    cert_file, key_file = write_pair(tmp_path, [cert, files_ca[0]], key)
    return CertSpec("files.test", ("files.test",), "files", cert_file, key_file)


@pytest.fixture
def manager(tmp_path):
    return CertificateManager(tmp_path / "data", server_context)


async def test_each_name_gets_its_certificate(manager, files_spec, files_ca, echo_server):
    cache = manager.load([LOCAL, WILD, files_spec], "localhost")
    server = await echo_server(cache)
    trust_local = client_context(manager.local_ca_root_pem())
    for name, spec_name in [
        ("localhost", "localhost"),
        ("app.test", "localhost"),
        ("a.wild.test", "*.wild.test"),
        ("B.Wild.Test", "*.wild.test"),
    ]:
        client = await connect(server.port, name, trust_local)
        assert client.leaf.serial_number == cache.get(spec_name).info.serial, name
        assert await client.echo() == b"ping\n"
        await client.close()
    files_client = await connect(
        server.port, "files.test", client_context(files_ca[0].public_bytes(Encoding.PEM))
    )
    assert files_client.leaf.serial_number == cache.get("files.test").info.serial
    await files_client.close()
    # the local leaves differ from each other
    assert cache.get("localhost").info.serial != cache.get("*.wild.test").info.serial


async def test_wrong_ca_fails_verification(manager, echo_server):
    server = await echo_server(manager.load([LOCAL], None))
    stranger = client_context(make_ca("stranger")[0].public_bytes(Encoding.PEM))
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        await connect(server.port, "localhost", stranger)


async def test_wrong_name_gets_default_and_fails_hostname_check(manager, echo_server):
    server = await echo_server(manager.load([LOCAL, WILD], "localhost"))
    trust_local = client_context(manager.local_ca_root_pem())
    for name in ("unknown.test", "a.b.wild.test", "wild.test"):
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            await connect(server.port, name, trust_local)


async def test_no_sni_gets_default(manager, echo_server):
    cache = manager.load([LOCAL, WILD], "localhost")
    server = await echo_server(cache)
    no_hostname = client_context(manager.local_ca_root_pem(), check_hostname=False)
    client = await connect(server.port, None, no_hostname)
    assert client.leaf.serial_number == cache.get("localhost").info.serial
    await client.close()


async def test_unknown_name_without_default_fails_handshake(manager, echo_server):
    server = await echo_server(manager.load([LOCAL], None))
    trust_local = client_context(manager.local_ca_root_pem())
    # The alert is dropped by asyncio: the client sees the connection end during the handshake.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await connect(server.port, "unknown.test", trust_local)
    client = await connect(server.port, "localhost", trust_local)  # the server is fine
    await client.close()


async def test_root_survives_restart(tmp_path, echo_server):
    first = CertificateManager(tmp_path / "data", server_context)
    root = first.local_ca_root_pem()
    second = CertificateManager(tmp_path / "data", server_context)
    server = await echo_server(second.load([LOCAL], None))
    assert second.local_ca_root_pem() == root
    client = await connect(server.port, "app.test", client_context(root))
    await client.close()
