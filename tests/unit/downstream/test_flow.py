"""ReadGate over a recording stand-in for a TLS transport: the order of its calls is the
contract (pause, then keep the TLS layer off the socket; resume, then let it read the socket
only after what waits was decrypted; never again after a close_notify)."""

from __future__ import annotations

from collections.abc import Callable

from proxy.downstream.flow import PEER_BUSY, PIPELINE, ReadGate


class FakeTransport:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.calls.append(("pause",))

    def resume_reading(self) -> None:
        self.calls.append(("resume",))

    def set_read_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.calls.append(("limits", high, low))


class FakeLoop:
    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def run_soon(self) -> None:
        soon, self.soon = self.soon, []
        for callback in soon:
            callback()


def gate(tls: bool = True) -> tuple[ReadGate, FakeTransport, FakeLoop]:
    transport, loop = FakeTransport(), FakeLoop()
    return ReadGate(transport, tls=tls, loop=loop), transport, loop  # type: ignore[arg-type]


def test_pausing_a_tls_transport_keeps_its_tls_layer_off_the_socket() -> None:
    g, transport, _ = gate()
    g.pause(PEER_BUSY)
    g.pause(PIPELINE)  # a second reason changes nothing on the transport
    assert transport.calls == [("pause",), ("limits", 1, 0)]


def test_the_socket_is_read_again_only_after_the_waiting_records_were_decrypted() -> None:
    g, transport, loop = gate()
    g.pause(PEER_BUSY)
    g.pause(PIPELINE)
    transport.calls.clear()
    g.resume(PEER_BUSY)
    assert transport.calls == []  # another reason holds
    g.resume(PIPELINE)
    assert transport.calls == [("resume",)]  # the TLS layer's read is scheduled by now
    loop.run_soon()
    assert transport.calls == [("resume",), ("limits", None, None)]


def test_paused_again_before_the_socket_is_read_stays_off_it() -> None:
    g, transport, loop = gate()
    g.pause(PIPELINE)
    g.resume(PIPELINE)
    g.pause(PEER_BUSY)
    transport.calls.clear()
    loop.run_soon()
    assert transport.calls == []


def test_after_a_close_notify_the_socket_is_never_read_again() -> None:
    g, transport, loop = gate()
    g.hold_socket()
    g.pause(PIPELINE)
    g.resume(PIPELINE)
    loop.run_soon()
    g.open()
    assert ("limits", None, None) not in transport.calls
    assert transport.calls[0] == ("limits", 1, 0)


def test_open_reads_at_once_whatever_the_reasons() -> None:
    g, transport, _ = gate()
    g.pause(PEER_BUSY | PIPELINE)
    transport.calls.clear()
    g.open()
    assert g.reasons == 0
    assert transport.calls == [("limits", None, None), ("resume",)]


def test_plain_tcp_only_pauses_and_resumes() -> None:
    g, transport, loop = gate(tls=False)
    g.pause(PIPELINE)
    g.resume(PIPELINE)
    assert transport.calls == [("pause",), ("resume",)]
    assert loop.soon == []


def test_a_closing_transport_is_left_alone() -> None:
    g, transport, loop = gate()
    transport.closing = True
    g.pause(PIPELINE)
    g.resume(PIPELINE)
    loop.run_soon()
    assert transport.calls == []
