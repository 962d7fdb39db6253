"""What the deploy tests share: the units in deploy/ read as systemd reads them, copies of them
pointed at a temporary install, an install an unprivileged user can run, and a NOTIFY_SOCKET.

The units name /opt/tlsproxy (the venv of the README's install steps) and /etc/tlsproxy. The
tests put the same things in a temporary directory that every user may traverse (pytest's own
tmp_path is 0700, root's) and rewrite those two paths in copies of the units."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import select
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
SERVICE = DEPLOY / "tlsproxy.service"
SOCKET = DEPLOY / "tlsproxy.socket"
INSTALLED = "/opt/tlsproxy"
CONFIG_DIR = "/etc/tlsproxy"
APP_DIR = REPO / "tests" / "integration" / "workers"  # pidapp: a FastAPI app that says its pid
TEST_USER = "tlsproxytest"
# What systemd puts in a service's environment before its own settings (systemd.exec(5)).
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> its values in order, from a unit file's text (comments skipped)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def uncomment_settings(text: str) -> str:
    """The unit with every commented-out setting (`#Key=value`) made active: the optional
    lines the user is told to uncomment."""
    return re.sub(r"(?m)^#([A-Z][A-Za-z]+=)", r"\1", text)


def systemd_analyze_verify(*units: Path) -> str:
    """What `systemd-analyze verify` finds in the units: "" when nothing. It exits 0 on many
    mistakes (an unknown key, a bad value: "..., ignoring"), so its output counts too."""
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = (done.stdout + done.stderr).strip()
    if done.returncode != 0 and not findings:
        findings = f"exit status {done.returncode}"
    return findings


@dataclass
class Install:
    """A temporary stand-in for /opt/tlsproxy (venv), /etc/tlsproxy (etc), /var/lib/tlsproxy
    (state) and /run/tlsproxy (run)."""

    root: Path

    @property
    def venv(self) -> Path:
        return self.root / "opt" / "tlsproxy"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "tlsproxy"

    @property
    def state(self) -> Path:
        return self.root / "var" / "lib" / "tlsproxy"

    @property
    def run(self) -> Path:
        return self.root / "run" / "tlsproxy"

    def rewrite(self, text: str) -> str:
        """A unit's text with its paths pointed at this install."""
        return (
            text.replace(INSTALLED, str(self.venv))
            .replace(CONFIG_DIR, str(self.etc))
            .replace("/var/lib/tlsproxy", str(self.state))
        )

    def unit_copies(self, directory: Path, *, uncomment: bool = False) -> tuple[Path, Path]:
        """Both units, rewritten, in `directory` (verify finds tlsproxy.socket beside the
        service only there)."""
        directory.mkdir(parents=True, exist_ok=True)
        copies = []
        for unit in (SERVICE, SOCKET):
            text = self.rewrite(unit.read_text())
            if uncomment:
                text = uncomment_settings(text)
            copy = directory / unit.name
            copy.write_text(text)
            copies.append(copy)
        return copies[0], copies[1]


def as_user(user: str, argv: list[str], *, caps: list[str] = (), no_new_privs: bool = False):
    """`argv` as systemd's User=/Group= with AmbientCapabilities= and CapabilityBoundingSet=
    set to `caps` (names like "net_bind_service") would start it: setpriv's equivalent."""
    keep = ",".join(["-all", *(f"+{c}" for c in caps)])
    command = [
        "setpriv",
        f"--reuid={user}",
        f"--regid={user}",
        "--init-groups",
        f"--inh-caps={keep}",
        f"--ambient-caps={keep}",
        f"--bounding-set={keep}",
    ]
    if no_new_privs:
        command.append("--no-new-privs")
    # setpriv's own execve still looks the program up with root's powers (a path under /root,
    # mode 0700, is found; its libraries then are not). systemd execs as the user alone: so
    # does env, exec'd first (the pid stays the same, as LISTEN_PID needs).
    return [*command, "--", "/usr/bin/env", "--", *argv]


def cap_names(setting: list[str]) -> list[str]:
    """AmbientCapabilities=CAP_NET_BIND_SERVICE -> ["net_bind_service"] (setpriv's spelling)."""
    return [c.lower().removeprefix("cap_") for value in setting for c in value.split()]


def ensure_user(name: str = TEST_USER) -> tuple[int, int, bool]:
    """(uid, gid, created): a system user with no home and no shell, made if missing."""
    created = False
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        entry = pwd.getpwnam(name)
        created = True
    return entry.pw_uid, entry.pw_gid, created


def _runs_as(user: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        as_user(user, argv), capture_output=True, text=True, timeout=60, check=False, cwd="/"
    )


def _readable_by(user: str, path: Path) -> bool:
    return _runs_as(user, ["/bin/ls", str(path)]).returncode == 0


def make_install(user: str) -> Install:
    """A venv the user can run, with tlsproxy and the test app's packages, in a fresh directory.

    It is built from an interpreter of this Python version that the user may execute (this one
    may sit under /root, mode 0700, as pyenv's does) and sees this environment's packages through
    a .pth; tlsproxy's own packages are copied, as an install would, so the checkout need not be
    readable. Raises RuntimeError with the reason when no such interpreter is found."""
    root = Path(tempfile.mkdtemp(prefix="tlsproxy-deploy-"))
    os.chmod(root, 0o755)
    install = Install(root)
    try:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        candidates = [
            os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
            f"/usr/bin/python{version}",
            f"/usr/local/bin/python{version}",
        ]
        probe = "import sys; print('%d.%d' % sys.version_info[:2])"
        base = next(
            (
                c
                for c in dict.fromkeys(candidates)
                if os.access(c, os.X_OK)
                and _runs_as(user, [c, "-c", probe]).stdout.strip() == version
            ),
            None,
        )
        if base is None:
            raise RuntimeError(
                f"no Python {version} that user {user} may run (tried {', '.join(candidates)})"
            )
        subprocess.run(
            [base, "-m", "venv", "--without-pip", str(install.venv)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        site = Path(
            subprocess.run(
                [
                    str(install.python),
                    "-c",
                    "import sysconfig; print(sysconfig.get_path('purelib'))",
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.strip()
        )
        src = install.root / "src"
        for package in ("proxy", "certs"):
            shutil.copytree(
                REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__")
            )
        shutil.copy(APP_DIR / "pidapp.py", src / "pidapp.py")
        lines = [str(src)]
        for theirs in dict.fromkeys((sysconfig.get_path("purelib"), sysconfig.get_path("platlib"))):
            if not _readable_by(user, Path(theirs)):
                copy = install.root / "site" / Path(theirs).name
                shutil.copytree(theirs, copy, symlinks=True, dirs_exist_ok=True)
                theirs = str(copy)
            lines.append(f"import site; site.addsitedir({theirs!r})")
        (site / "tlsproxy-test.pth").write_text("\n".join(lines) + "\n")
        # The console script pip would write for [project.scripts] tlsproxy = "proxy.cli:main".
        script = install.venv / "bin" / "tlsproxy"
        script.write_text(
            f"#!{install.python}\nimport sys\nfrom proxy.cli import main\nsys.exit(main())\n"
        )
        script.chmod(0o755)
        check = _runs_as(
            user, [str(install.python), "-c", "import proxy.cli, uvicorn, fastapi, pidapp"]
        )
        if check.returncode != 0:
            raise RuntimeError(
                f"user {user} cannot import tlsproxy from {install.venv}: {check.stderr}"
            )
        for directory in (install.etc, install.state, install.run):
            directory.mkdir(parents=True)
        os.chmod(install.state, 0o700)
        os.chmod(install.run, 0o700)
        return install
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def remove_install(install: Install) -> None:
    shutil.rmtree(install.root, ignore_errors=True)


class Notifications:
    """A NOTIFY_SOCKET, in the abstract namespace (any user may send to it, no file)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"tlsproxy-deploy-{os.getpid()}-{secrets.token_hex(6)}"
        self.sock.bind("\0" + name)
        self.address = "@" + name
        self.seen: list[str] = []

    def wait_for(self, state: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"exited with {proc.returncode} before {state}")
            readable, _, _ = select.select([self.sock], [], [], 0.1)
            if readable:
                message = self.sock.recv(4096).decode(errors="replace")
                self.seen.append(message)
                if state in message.split("\n"):
                    return
        raise AssertionError(f"no {state} within {timeout} s; got {self.seen}")

    def drain(self, seconds: float) -> list[str]:
        """What arrives in the next `seconds`."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.sock], [], [], left)
            if readable:
                got.append(self.sock.recv(4096).decode(errors="replace"))
        self.seen += got
        return got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def low_ports(count: int, preferred: tuple[int, ...] = (443, 80)) -> list[int]:
    """`count` ports free on 127.0.0.1 below 1024 (binding them needs CAP_NET_BIND_SERVICE):
    443 and 80 when free, else others."""
    chosen: list[int] = []
    for port in [*preferred, *range(1023, 600, -1)]:
        if len(chosen) == count:
            break
        if port in chosen:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
    return chosen


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def children(pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""
