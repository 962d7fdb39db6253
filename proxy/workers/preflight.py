"""What `tlsproxy check` verifies of an upstream `command` before `run` trips on it.

- The program exists: on the PATH the workers get (the proxy's, the upstream's `env`, the
  proxy's venv `bin` last), or as given, relative to the directory workers run in.
- For uvicorn, gunicorn and hypercorn, the app (`MODULE:ATTR`) imports: in a child process of
  the interpreter that would run it (the program's `#!` line, or the `python` of
  `python -m uvicorn`), in the workers' directory with their environment, bounded in time. An
  import runs the app's module-level code: what a worker would run at start anyway.
- The worker sockets (`{socket}`) fit in the kernel's 107 bytes.
Each failure is a ConfigError naming `upstream.NAME.command` (or `server.data_dir`) and, for the
import, the module, in one line.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from proxy.config import Config, UpstreamConfig, check_socket_path
from proxy.errors import ConfigError
from proxy.workers.supervisor import socket_path, worker_environment

IMPORT_TIMEOUT = 30.0
_SERVERS = ("uvicorn", "gunicorn", "hypercorn")
_APP = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*(\(.*\))?")
# Options whose value is the next argument (so it is not mistaken for the app).
_PATH_OPTIONS = ("--app-dir", "--chdir", "--pythonpath")
_SH_LAUNCHER = re.compile(rb"'''exec' (\S+)")
# The import, in the child: argv = [app_dir or "", MODULE, ATTR].
_IMPORT = (
    "import importlib, sys\n"
    "sys.path.insert(0, sys.argv[1] or '.')\n"
    "obj = importlib.import_module(sys.argv[2])\n"
    "for name in sys.argv[3].split('.'):\n"
    "    obj = getattr(obj, name)\n"
)


def check_commands(config: Config, *, timeout: float = IMPORT_TIMEOUT) -> list[str]:
    """Check every upstream with a `command`; returns one line per app that imported."""
    cwd = config.source.parent if config.source else Path.cwd()
    done = []
    for name, upstream in config.upstreams.items():
        if upstream.command is None:
            continue
        key = f"upstream.{name}.command"
        if "{socket}" in upstream.command:
            from proxy.server import worker_socket_dir

            # A socket's number grows with each worker start: room for six digits, and for
            # the largest pid Linux hands out.
            longest = socket_path(worker_socket_dir(config), name, 999_999, pid=4_194_304)
            check_socket_path(
                str(longest), "server.data_dir", f"too long for the sockets of {key}: one would be"
            )
        line = check_command(upstream, key, cwd, timeout=timeout)
        if line:
            done.append(line)
    return done


def check_command(
    upstream: UpstreamConfig, key: str, cwd: Path, *, timeout: float = IMPORT_TIMEOUT
) -> str | None:
    assert upstream.command is not None
    argv = shlex.split(upstream.command)
    env = worker_environment(upstream, "check")
    program = _find_program(argv[0], cwd, env, key)
    server, app, app_dir = _app_of(argv)
    if server is None or app is None:
        return None
    python = _interpreter(argv, program)
    module, _, attr = app.partition(":")
    attr = attr.split("(", 1)[0]  # gunicorn's "module:create_app()": the factory must exist
    try:
        result = subprocess.run(
            [python, "-c", _IMPORT, app_dir or "", module, attr],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(
            key, f"{server} app {app!r}: importing module {module!r} took over {timeout:g}s"
        ) from None
    except OSError as exc:
        raise ConfigError(key, f"cannot run {python} to import {app!r}: {exc.strerror}") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise ConfigError(
            key, f"{server} app {app!r} does not import (module {module!r}, in {cwd}): {why}"
        )
    return f"{key}: {server} app {app!r} imports ({python})"


def _find_program(name: str, cwd: Path, env: dict[str, str], key: str) -> str:
    if "/" in name:
        path = cwd / os.path.expanduser(name)
        if not path.is_file():
            raise ConfigError(key, f"program {name} not found (looked in {cwd})")
        if not os.access(path, os.X_OK):
            raise ConfigError(key, f"program {path} is not executable")
        return str(path)
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    if found is None:
        raise ConfigError(
            key,
            f"program {name!r} not found on the workers' PATH (install it beside tlsproxy, "
            "give its full path, or set PATH in env)",
        )
    return found


def _app_of(argv: list[str]) -> tuple[str | None, str | None, str | None]:
    """(server, "MODULE:ATTR", app dir) of a uvicorn/gunicorn/hypercorn command line."""
    base = os.path.basename(argv[0])
    server = next((s for s in _SERVERS if base == s), None)
    rest = argv[1:]
    if server is None and base.startswith("python"):
        for i, (a, b) in enumerate(itertools.pairwise(argv)):
            if a == "-m" and b in _SERVERS:
                server, rest = b, argv[i + 2 :]
                break
    if server is None:
        return None, None, None
    app = app_dir = None
    skip = False
    for i, arg in enumerate(rest):
        if skip:
            skip = False
            continue
        if arg in _PATH_OPTIONS and i + 1 < len(rest):
            app_dir, skip = rest[i + 1], True
            continue
        for option in _PATH_OPTIONS:
            if arg.startswith(option + "="):
                app_dir = arg.split("=", 1)[1]
        if arg.startswith("-"):
            # "--uds {socket}" and friends: their values never look like MODULE:ATTR.
            continue
        if app is None and _APP.fullmatch(arg):
            app = arg
    return server, app, app_dir


def _interpreter(argv: list[str], program: str) -> str:
    """The Python that would import the app: `python -m X`'s own, else the program's `#!`."""
    if os.path.basename(argv[0]).startswith("python"):
        return program
    try:
        with open(program, "rb") as f:
            first, second = f.readline(512), f.readline(1024)
    except OSError:
        return sys.executable
    if not first.startswith(b"#!"):
        return sys.executable  # not a script: the best guess left is the proxy's own
    words = first[2:].decode(errors="replace").split()
    if words and os.path.basename(words[0]) == "env" and len(words) > 1:
        return shutil.which(words[1]) or words[1]
    # pip's launcher for a venv whose path is too long for a #! line: #!/bin/sh, then a line
    # starting with three quotes, exec' and the venv's python.
    long_path = _SH_LAUNCHER.match(second)
    if long_path:
        return long_path.group(1).decode(errors="replace")
    return words[0] if words else sys.executable
