"""deploy/tlsproxy.service and deploy/tlsproxy.socket as systemd reads them: `systemd-analyze
verify` finds nothing in them (nor in their optional lines), and does find a broken copy; the
socket unit listens exactly where the config it shows does, so the proxy adopts every socket."""

from __future__ import annotations

import ipaddress
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.integration.deploy.support import (
    SERVICE,
    SOCKET,
    Install,
    systemd_analyze_verify,
    uncomment_settings,
    unit_settings,
)

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="needs systemd-analyze (apt-get install systemd)",
)


@pytest.fixture
def install(tmp_path: Path) -> Install:
    """Enough of an install for verify, which checks that ExecStart= names an executable: the
    units' /opt/tlsproxy/bin/tlsproxy is this environment's console script."""
    install = Install(tmp_path)
    (install.venv / "bin").mkdir(parents=True)
    script = Path(sys.executable).parent / "tlsproxy"
    assert script.exists(), f"{script}: install the project (pip install -e .)"
    (install.venv / "bin" / "tlsproxy").symlink_to(script)
    return install


def test_both_units_verify_without_a_finding(install: Install, tmp_path: Path) -> None:
    service, socket_unit = install.unit_copies(tmp_path / "units")
    assert systemd_analyze_verify(service, socket_unit) == ""


def test_their_optional_lines_verify_too(install: Install, tmp_path: Path) -> None:
    # Requires=/After=tlsproxy.socket, ReadWritePaths=, the run-as-the-app's-user lines ...
    service, socket_unit = install.unit_copies(tmp_path / "units", uncomment=True)
    enabled = unit_settings(service.read_text())
    assert enabled["Unit.Requires"] == ["tlsproxy.socket"]
    assert "Service.ReadWritePaths" in enabled
    assert systemd_analyze_verify(service, socket_unit) == ""


@pytest.mark.parametrize(
    "unit, old, new, found",
    [
        ("service", "NoNewPrivileges=", "NoNewPrivilegs=", "Unknown key"),
        ("service", "/bin/tlsproxy run", "/bin/tlsproxy-gone run", "not executable"),
        ("service", "Type=notify", "Type=notifyy", "Failed to parse service type"),
        ("socket", "ListenStream=0.0.0.0:443", "ListenStream=0.0.0.0:99999", "address value"),
        ("socket", "BindIPv6Only=ipv6-only", "BindIPv6Only=ipv6only", "bind IPv6 only"),
        ("socket-gone", "#Requires=", "Requires=", "tlsproxy.socket"),
    ],
)
def test_verify_finds_what_is_wrong_with_a_broken_copy(
    install: Install, tmp_path: Path, unit: str, old: str, new: str, found: str
) -> None:
    # The check above can fail: each of these breaks one line and verify says which.
    service, socket_unit = install.unit_copies(tmp_path / "units")
    target = socket_unit if unit == "socket" else service
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    if unit == "socket-gone":
        socket_unit.unlink()
    findings = systemd_analyze_verify(*[u for u in (service, socket_unit) if u.exists()])
    assert found in findings


def _addresses(text: str) -> set[tuple[str, int]]:
    found = set()
    for spelled in text:
        host, _, port = spelled.rpartition(":")
        found.add((str(ipaddress.ip_address(host.strip("[]"))), int(port)))
    return found


def _shown_config(text: str, key: str) -> list[str]:
    match = re.search(rf'{key} = \[((?:\s*"[^"]*",?)*)\s*\]', text)
    assert match, f"no `{key} = [...]` in the comments"
    return re.findall(r'"([^"]+)"', match.group(1))


def test_the_socket_unit_listens_exactly_where_the_config_it_shows_does() -> None:
    # The proxy adopts a passed socket only if its address equals a listener's (INTERFACE.md):
    # "443" alone (a dual-stack [::]:443) would match none and be closed.
    text = SOCKET.read_text()
    settings = unit_settings(text)
    listen = settings["Socket.ListenStream"]
    assert all(re.fullmatch(r"(\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):\d+", a) for a in listen), listen
    for text_with_config in (text, SERVICE.read_text()):  # the install steps show it too
        config = _shown_config(text_with_config, "https") + _shown_config(text_with_config, "http")
        assert _addresses(config) == _addresses(listen)
    # The proxy binds "[::]:443" with IPV6_V6ONLY; a dual-stack one would also clash with 0.0.0.0.
    assert settings["Socket.BindIPv6Only"] == ["ipv6-only"]


def test_the_service_speaks_what_the_proxy_does_on_this_systemd() -> None:
    settings = unit_settings(SERVICE.read_text())
    # systemd 252 has no Type=notify-reload; the proxy sends READY=1 itself (proxy/systemd.py).
    assert settings["Service.Type"] == ["notify"]
    assert settings["Service.NotifyAccess"] == ["main"]
    reload_lines = settings["Service.ExecReload"]
    assert re.fullmatch(r"\S+/tlsproxy check -c \S+", reload_lines[0])
    assert reload_lines[-1] == "/bin/kill -HUP $MAINPID"
    assert settings["Service.RuntimeDirectory"] == ["tlsproxy"]
    assert settings["Service.EnvironmentFile"] == ["-/etc/tlsproxy/env"]
    # Every optional line is there to be uncommented, and only once.
    optional = unit_settings(uncomment_settings(SERVICE.read_text()))
    assert optional["Service.User"] == ["tlsproxy", "USER"]
