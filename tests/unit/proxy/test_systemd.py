"""Socket activation and sd_notify, against real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from proxy.systemd import notify, passed_sockets, runtime_directory, same_address

CHILD = """
import os, sys
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[1] == "mine" else "1"
from proxy.systemd import passed_sockets
found = passed_sockets()
print(len(found), found[0].getsockname()[1] if found else 0,
      "LISTEN_FDS" in os.environ, found[0].get_inheritable() if found else None)
"""


def run_child(sock: socket.socket, whose: str) -> list[str]:
    os.set_inheritable(sock.fileno(), True)
    code = f"import os; os.dup2({sock.fileno()}, 3)\n" + CHILD
    done = subprocess.run(
        [sys.executable, "-c", code, whose],
        env={**os.environ, "LISTEN_FDS": "1"},
        pass_fds=(sock.fileno(),),
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def test_a_socket_passed_to_this_pid_is_taken_and_the_variables_removed() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        count, port, left, inheritable = run_child(sock, "mine")
        assert (count, port) == ("1", str(sock.getsockname()[1]))
        assert left == "False"  # the app's workers do not see LISTEN_FDS
        assert inheritable == "False"


def test_sockets_meant_for_another_pid_are_left_alone() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert run_child(sock, "other")[:2] == ["0", "0"]


def test_no_variables_no_sockets() -> None:
    assert passed_sockets({}) == []
    assert passed_sockets({"LISTEN_FDS": "x", "LISTEN_PID": str(os.getpid())}) == []


def test_same_address_compares_host_and_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert same_address(sock, ("127.0.0.1", port))
        assert not same_address(sock, ("127.0.0.1", port + 1))
        assert not same_address(sock, ("0.0.0.0", port))


def test_notify_sends_to_the_abstract_socket(monkeypatch) -> None:
    name = f"tlsproxy-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1")
        assert listener.recv(100) == b"READY=1"


def test_notify_without_a_manager_is_a_quiet_no(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "@nobody-listens-here-tlsproxy")
    assert not notify("READY=1")


def test_runtime_directory_is_the_units_first_one() -> None:
    assert runtime_directory({"RUNTIME_DIRECTORY": "/run/tlsproxy"}) == Path("/run/tlsproxy")
    # RuntimeDirectory=tlsproxy other: systemd joins them with ":".
    assert runtime_directory({"RUNTIME_DIRECTORY": "/run/tlsproxy:/run/other"}) == Path(
        "/run/tlsproxy"
    )


def test_no_runtime_directory_outside_systemd() -> None:
    assert runtime_directory({}) is None
    assert runtime_directory({"RUNTIME_DIRECTORY": ""}) is None
    assert runtime_directory({"RUNTIME_DIRECTORY": "relative/dir"}) is None
