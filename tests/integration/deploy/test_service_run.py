"""deploy/tlsproxy.service's commands run the way systemd runs them, and the socket unit's way of
passing ports, with the real tools:

- ExecStart= as User= with only the unit's capabilities (setpriv, what systemd does between fork
  and exec), in its WorkingDirectory=, with systemd's environment (NOTIFY_SOCKET,
  RUNTIME_DIRECTORY, STATE_DIRECTORY): it binds two ports below 1024 on 127.0.0.1, says READY=1,
  serves through its supervised workers, which run as that user without any capability, with
  their sockets in the RuntimeDirectory; data_dir is written by the user.
- ExecReload= line by line, stopping at the first that fails (as systemd does): a good config is
  reloaded (RELOADING=1, READY=1); a bad one fails the reload at `tlsproxy check`, naming the
  key, and the proxy is never signalled and keeps serving.
- systemd-socket-activate holds both ports and passes them to `tlsproxy run` started with NO
  capability: serving on them proves that the proxy adopted the sockets rather than bound them.

Needs root (to become the unprivileged user, as systemd does; CI runs as root), setpriv
(util-linux) and systemd-socket-activate (systemd)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.deploy.support import (
    SERVICE,
    SYSTEMD_PATH,
    TEST_USER,
    Install,
    Notifications,
    as_user,
    cap_names,
    children,
    cmdline,
    ensure_user,
    low_ports,
    make_install,
    proc_status,
    remove_install,
    unit_settings,
)
from tests.integration.harness import stop_process

NET_BIND_SERVICE = 1 << 10  # CAP_NET_BIND_SERVICE's bit in /proc/PID/status

missing = [
    c for c in ("setpriv", "useradd", "systemd-socket-activate", "curl") if not shutil.which(c)
]
pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="needs root: it becomes an unprivileged user with setpriv, as systemd does",
    ),
    pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}"),
]


@pytest.fixture(scope="module")
def user() -> Iterator[tuple[int, int]]:
    uid, gid, created = ensure_user(TEST_USER)
    yield uid, gid
    if created:
        subprocess.run(["userdel", TEST_USER], capture_output=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def install(user: tuple[int, int]) -> Iterator[Install]:
    try:
        install = make_install(TEST_USER)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    for directory in (install.state, install.run):  # StateDirectory=, RuntimeDirectory=
        os.chown(directory, *user)
    yield install
    remove_install(install)


@pytest.fixture(scope="module")
def service(install: Install) -> dict[str, list[str]]:
    return unit_settings(install.rewrite(SERVICE.read_text()))


def write_config(install: Install, https: int, http: int, *, name: str = "tlsproxy.toml") -> Path:
    command = (
        f"{install.python} -m uvicorn pidapp:app --uds {{socket}} "
        "--no-access-log --log-level warning"
    )
    config = install.etc / name
    config.write_text(
        f"""
[server]
https = ["127.0.0.1:{https}"]
http = ["127.0.0.1:{http}"]
data_dir = "{install.state}"
default_site = "localhost"
shutdown_grace = "3s"

[[site]]
hosts = ["localhost"]
tls = "internal"
upstream = "app"

[upstream.app]
command = "{command}"
workers = 2
health = "/healthz"
stop_timeout = "3s"
"""
    )
    return config


def systemd_env(install: Install, notify: Notifications) -> dict[str, str]:
    """The environment systemd gives the service (systemd.exec(5), "Environment variables in
    spawned processes"), nothing of this test's."""
    return {
        "PATH": SYSTEMD_PATH,
        "LANG": "C.UTF-8",
        "USER": TEST_USER,
        "LOGNAME": TEST_USER,
        "HOME": "/nonexistent",
        "SHELL": "/usr/sbin/nologin",
        "INVOCATION_ID": os.urandom(16).hex(),
        "NOTIFY_SOCKET": notify.address,
        "RUNTIME_DIRECTORY": str(install.run),
        "STATE_DIRECTORY": str(install.state),
    }


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "60", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def ca_file(install: Install, config: Path) -> Path:
    done = subprocess.run(
        as_user(TEST_USER, [str(install.venv / "bin" / "tlsproxy"), "ca", "-c", str(config)]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    path = install.root / "ca.pem"
    path.write_text(done.stdout)
    return path


def get(ca: Path, port: int) -> subprocess.CompletedProcess:
    return curl(
        "--cacert",
        str(ca),
        "--resolve",
        f"localhost:{port}:127.0.0.1",
        f"https://localhost:{port}/",
    )


def workers_of(pid: int) -> list[int]:
    return [p for p in children(pid) if "uvicorn" in cmdline(p)]


def exec_reload(service: dict[str, list[str]], main_pid: int, env: dict[str, str], caps):
    """Each ExecReload= line in turn as the service's user, $MAINPID filled in; the first one
    that fails ends the reload, as in systemd. The failed command's result, or None."""
    for line in service["Service.ExecReload"]:
        argv = shlex.split(line.replace("$MAINPID", str(main_pid)))
        done = subprocess.run(
            as_user(TEST_USER, argv, caps=caps),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
            cwd="/",
        )
        if done.returncode != 0:
            return done
    return None


def test_execstart_as_systemd_runs_it(install: Install, service, user, tmp_path: Path) -> None:
    uid, gid = user
    exec_start = shlex.split(service["Service.ExecStart"][0])
    assert exec_start[0] == str(install.venv / "bin" / "tlsproxy")
    caps = cap_names(service["Service.AmbientCapabilities"])
    assert caps == cap_names(service["Service.CapabilityBoundingSet"]) == ["net_bind_service"]
    https, http = low_ports(2)
    config = write_config(install, https, http)
    assert exec_start[-2:] == ["-c", str(config)]  # the unit's config path, rewritten
    notify = Notifications()
    env = systemd_env(install, notify)
    log = tmp_path / "service.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            as_user(
                TEST_USER,
                exec_start,
                caps=caps,
                no_new_privs=service["Service.NoNewPrivileges"] == ["true"],
            ),
            env=env,
            cwd=service["Service.WorkingDirectory"][0],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    try:
        try:
            notify.wait_for("READY=1", 90, proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log.read_text()}") from None
        ca = ca_file(install, config)
        answer = get(ca, https)
        assert answer.returncode == 0, answer.stderr + log.read_text()[-3000:]
        assert '"pid"' in answer.stdout
        redirect = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{http}/")
        assert redirect.stdout == "308"

        # The proxy: the unit's user, the unit's one capability.
        status = proc_status(proc.pid)
        assert status["Uid"].split() == [str(uid)] * 4
        assert status["Gid"].split() == [str(gid)] * 4
        assert int(status["CapEff"], 16) == NET_BIND_SERVICE
        assert int(status["CapBnd"], 16) == NET_BIND_SERVICE
        # Its workers: the same user, and no capability at all (ambient ones are not passed on).
        workers = workers_of(proc.pid)
        assert len(workers) == 2, [cmdline(p) for p in children(proc.pid)]
        for pid in workers:
            status = proc_status(pid)
            assert status["Uid"].split() == [str(uid)] * 4
            assert int(status["CapEff"], 16) == 0 and int(status["CapAmb"], 16) == 0
            # ... nor the proxy's notify socket: systemd hears the proxy only.
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not any(v.startswith(b"NOTIFY_SOCKET=") for v in environ)
            assert f"RUNTIME_DIRECTORY={install.run}".encode() in environ
        # Their sockets are in RuntimeDirectory=; data_dir is the user's and was written.
        sockets = sorted(install.run.glob("app-*.sock"))
        assert len(sockets) == 2, sorted(install.run.iterdir())
        assert all(s.owner() == TEST_USER for s in sockets)
        assert not (install.state / "run").exists()
        written = [p for p in install.state.rglob("*") if p.is_file() or p.is_socket()]
        assert written and all(p.owner() == TEST_USER for p in written)
        assert (install.state / "control.sock").is_socket()

        # systemctl reload with a good config: checked, then SIGHUP; the proxy says so.
        assert exec_reload(service, proc.pid, env, caps) is None
        notify.wait_for("RELOADING=1", 30, proc)
        notify.wait_for("READY=1", 60, proc)
        # ... with a bad one: the check fails the reload, naming the key; no signal is sent.
        good = config.read_text()
        config.write_text(good.replace("shutdown_grace", "shutdown_grase"))
        failed = exec_reload(service, proc.pid, env, caps)
        assert failed is not None and failed.returncode == 2
        assert "shutdown_grase" in failed.stderr
        assert notify.drain(1.0) == []  # the proxy heard nothing: no RELOADING=1
        answer = get(ca, https)
        assert answer.returncode == 0 and '"pid"' in answer.stdout
        config.write_text(good)

        # systemctl stop: SIGTERM to the proxy (KillMode=mixed), STOPPING=1, exit 0.
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 30)
        assert proc.wait(30) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        stop_process(proc, 10)
        notify.close()


def test_socket_activation_serves_on_ports_it_could_not_bind(
    install: Install, service, tmp_path: Path
) -> None:
    https, http = low_ports(2)
    config = write_config(install, https, http, name="activated.toml")
    exec_start = [*shlex.split(service["Service.ExecStart"][0])[:-1], str(config)]
    notify = Notifications()
    log = tmp_path / "activated.log"
    # As a .socket unit: the ports are bound by root (here systemd-socket-activate, which execs
    # the command on the first connection with LISTEN_FDS=2 and LISTEN_PID set); the proxy runs
    # as the user with no capability, so it cannot have bound them itself.
    argv = ["systemd-socket-activate", "-l", f"127.0.0.1:{https}", "-l", f"127.0.0.1:{http}"]
    for name, value in systemd_env(install, notify).items():
        argv += ["-E", f"{name}={value}"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*argv, "--", *as_user(TEST_USER, exec_start, caps=[])],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            cwd=service["Service.WorkingDirectory"][0],
        )
    try:
        ca = ca_file(install, config)
        # This first connection starts the proxy, and waits in the socket's queue meanwhile.
        answer = get(ca, https)
        assert answer.returncode == 0, answer.stderr + log.read_text()[-3000:]
        notify.wait_for("READY=1", 5, proc)
        assert '"pid"' in answer.stdout
        redirect = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{http}/")
        assert redirect.stdout == "308"
        assert int(proc_status(proc.pid)["CapEff"], 16) == 0
        assert "matches no listener" not in log.read_text()
    finally:
        stop_process(proc, 10)
        notify.close()
