"""The pool's pure decisions: which server, which idle connection, what expired."""

from __future__ import annotations

from proxy.config import Limits, UpstreamConfig, UpstreamServer
from proxy.upstream.pool import ServerSlot, UpstreamPool


class IdleConnection:
    """Just the state the assignment step reads from a pooled connection."""

    def __init__(self, last_activity: float, closed: bool = False) -> None:
        self.last_activity = last_activity
        self.closed = closed


A = UpstreamServer(host="127.0.0.1", port=1)
B = UpstreamServer(host="127.0.0.1", port=2)


def make_pool(*servers: UpstreamServer, keepalive: float = 4.0) -> UpstreamPool:
    return UpstreamPool(
        UpstreamConfig("app", servers=servers, keepalive_timeout=keepalive), Limits()
    )


def test_least_outstanding_server_is_chosen():
    pool = make_pool(A, B)
    pool.slots[0].outstanding = 3
    pool.slots[1].outstanding = 1
    assert pool.choose_server().server == B
    pool.slots[1].outstanding = 5
    assert pool.choose_server().server == A


def test_ties_rotate():
    pool = make_pool(A, B)
    chosen = {pool.choose_server().server for _ in range(4)}
    assert chosen == {A, B}


def test_the_freshest_idle_connection_is_taken():
    pool = make_pool(A)
    old, new = IdleConnection(10.0), IdleConnection(11.0)
    pool.slots[0].idle[:] = [old, new]
    slot, conn, expired = pool._assign(now=12.0)
    assert conn is new and expired == [] and slot.idle == [old]


def test_expired_connections_are_returned_for_closing():
    pool = make_pool(A, keepalive=4.0)
    old, newer = IdleConnection(1.0), IdleConnection(2.0)
    pool.slots[0].idle[:] = [old, newer]
    slot, conn, expired = pool._assign(now=6.5)
    assert conn is None
    assert set(map(id, expired)) == {id(old), id(newer)}
    assert slot.idle == []


def test_closed_connections_are_skipped():
    pool = make_pool(A)
    good, closed = IdleConnection(10.0), IdleConnection(10.5, closed=True)
    pool.slots[0].idle[:] = [good, closed]
    _, conn, _ = pool._assign(now=11.0)
    assert conn is good


def test_no_servers_means_no_slot():
    pool = make_pool()
    assert pool._assign(now=0.0) == (None, None, [])


def test_set_servers_keeps_known_slots_and_retires_others():
    pool = make_pool(A, B)
    slot_a = pool.slots[0]
    slot_a.outstanding = 2
    pool.set_servers([A])
    assert pool.slots == [slot_a] and slot_a.outstanding == 2
    assert pool.outstanding(A) == 2 and pool.outstanding(B) == 0
    assert isinstance(pool.slots[0], ServerSlot)
