"""The RFC 2136 client against a real named: two values at one name, exact deletes, zone
discovery, and the propagation timeout's message."""

from __future__ import annotations

import dns.asyncquery
import dns.message
import pytest

from certs.challenges.dns01 import Dns01Error, Rfc2136Client, TxtRecord, load_tsig_key


async def _values(c, name: str) -> set[str]:
    response = await dns.asyncquery.tcp(
        dns.message.make_query(name, "TXT"), "127.0.0.1", port=c.dns_port, timeout=5
    )
    return {b"".join(rd.strings).decode() for rrset in response.answer for rd in rrset}


@pytest.fixture
def named(components):
    c = components()
    return c, Rfc2136Client("127.0.0.1", c.dns_port, load_tsig_key(c.tsig_key))


async def test_two_values_at_one_name_added_and_deleted_exactly(named):
    c, client = named
    name = "_acme-challenge.app.test."
    a, b = TxtRecord(name, "value-a"), TxtRecord(name, "value-b")
    await client.add([a])
    await client.add([b])
    await client.wait_visible([a, b], 5)
    assert await _values(c, name) == {"value-a", "value-b"}
    await client.delete([a])
    assert await _values(c, name) == {"value-b"}
    await client.delete([b])
    assert await _values(c, name) == set()


async def test_zone_and_authoritative_servers_are_found(named):
    c, client = named
    zone = await client.zone_for("_acme-challenge.www.app.test.")
    assert zone.to_text() == "test."
    # ns.test is 127.0.0.1: the same server, asked once.
    assert await client.authoritative_servers(zone) == [("127.0.0.1", c.dns_port)]


async def test_a_record_that_never_shows_times_out_saying_what_and_where(named):
    c, client = named
    missing = TxtRecord("_acme-challenge.other.test.", "never-added")
    with pytest.raises(Dns01Error) as info:
        await client.wait_visible([missing], 0.5)
    message = str(info.value)
    assert "not visible after 0.5s" in message and "propagation_timeout" in message
    assert f'TXT _acme-challenge.other.test. "never-added" at 127.0.0.1:{c.dns_port}' in message
    assert "NXDOMAIN" in message
