"""`tlsproxy` / `python -m proxy`: run, check, ca, certs, status.

Exit status: 0 on success; 2 on a bad config or a file it names, with one line on stderr that
names the key or file; 1 when the proxy cannot start for another reason (a port already taken).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from proxy.config import Config, load_config
from proxy.errors import ConfigError, StartupError

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

DESCRIPTION = """\
A TLS-terminating reverse proxy for Python web apps. It owns the https port, picks each
connection's certificate by SNI (from files, a built-in local CA or ACME), and forwards
HTTP/1.1 to your app's workers over pooled keep-alive connections."""


EPILOG = """\
exit status: 0 on success; 2 on a bad config or a file it names (one line naming the key or
file), or a prestart step that failed; 1 when it cannot start otherwise (a port taken).

signals (run): SIGTERM/SIGINT stop accepting, let in-flight requests finish within
server.shutdown_grace, stop the workers, exit 0 (a second SIGINT exits at once). SIGHUP re-reads
the config and certificates (open connections keep theirs) and restarts the workers one at a
time; a bad config at SIGHUP is logged and the running one stays."""


def _version() -> str:
    # The source itself, not the installed metadata: an editable install whose pyproject
    # version was bumped since, or a checkout never installed, still tells the truth.
    from proxy import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsproxy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tlsproxy {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-c", "--config", required=True, metavar="FILE", help="the TOML config file")
        return p

    run = add(
        "run",
        "run in the foreground until SIGTERM/SIGINT (graceful drain); SIGHUP reloads the config "
        "and certificates without dropping open connections",
    )
    run.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop (default: uvloop; asyncio is the standard library's)",
    )
    run.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="override server.log_level (debug shows one line per TLS handshake)",
    )
    add(
        "check",
        "validate the config and every file it names (a local_ca root of your own included), "
        "that each upstream command's program exists and its uvicorn/gunicorn/hypercorn app "
        "imports, and that unix socket paths fit in 107 bytes; print what would run",
    )
    ca = add(
        "ca",
        "print the local CA's root certificate (PEM), creating the CA if missing; with "
        "--client NAME, write a client certificate for mutual TLS instead",
    )
    ca.epilog = (
        "With --client NAME: writes NAME.pem (the client certificate, then the intermediate "
        "that signed it) and NAME.key (its private key, mode 0600) into the current directory "
        "or --out DIR. The certificate comes from the local CA's client intermediate (created "
        'if missing) and is accepted by sites with client_auth = { ca = "internal" }. Use it '
        "as: curl --cert NAME.pem --key NAME.key https://HOST/"
    )
    ca.add_argument(
        "--client",
        metavar="NAME",
        help="issue a client certificate whose subject is CN=NAME (also the file names)",
    )
    ca.add_argument(
        "--out",
        metavar="DIR",
        default=".",
        help="where --client writes NAME.pem and NAME.key (default: the current directory)",
    )
    certs = add(
        "certs",
        "one line per managed certificate: hosts, issuer, not-after, next renewal, error; "
        "`certs renew HOST` asks the running proxy to renew HOST's certificate now",
    )
    certs.add_argument(
        "action", nargs="?", choices=("renew",), help="renew: a fresh certificate for HOST now"
    )
    certs.add_argument("host", nargs="?", metavar="HOST", help="a host of a [[site]] (with renew)")
    add(
        "status", "the supervised app workers of a running proxy: pid, state, uptime, requests, RSS"
    )
    return parser


def _fail(message: str, code: int) -> int:
    print(f"tlsproxy: error: {message}", file=sys.stderr)
    return code


def _load(path: str) -> Config:
    return load_config(path)


def cmd_check(config: Config) -> int:
    from proxy.certificates import check_config
    from proxy.workers.preflight import check_commands

    check_config(config)
    # What `run` would trip on only once it starts workers: the program, the app's import.
    imported = check_commands(config)
    s = config.server
    print(f"config {config.source}: OK")
    print(f"  https: {', '.join(str(a) for a in s.https)}")
    plain = ", ".join(str(a) for a in s.http) or "(none)"
    print(f"  http:  {plain} (redirect to https, ACME http-01)")
    print(f"  data_dir: {s.data_dir}")
    if s.default_site:
        print(
            f"  default_site: {s.default_site} (answers clients without SNI or with unknown names)"
        )
    for site in config.sites:
        tls = site.tls if isinstance(site.tls, str) else f"files {site.tls.cert}"
        broken = f" broken={site.broken} (for tests: clients must refuse it)" if site.broken else ""
        auth = ""
        if site.client_auth is not None:
            need = "required" if site.client_auth.required else "optional"
            auth = f" client_auth={site.client_auth.ca} ({need})"
        print(
            f"  site {', '.join(site.hosts)}: tls={tls}{broken}{auth} -> upstream {site.upstream}"
        )
    if any(site.tls == "internal" for site in config.sites):
        print(f"  local CA: leaves live {_duration(config.local_ca.leaf_lifetime)}")
        if config.local_ca.root_cert is not None:
            print(f"  local CA root: yours, {config.local_ca.root_cert}")
    for name, up in config.upstreams.items():
        if up.command:
            what = f"{up.workers} worker(s): {up.command}"
            if up.prestart:
                what += f"; prestart: {' && '.join(up.prestart)}"
        else:
            what = ", ".join(str(server) for server in up.servers)
        print(f"  upstream {name}: {what} (balance {up.balance})")
    for line in imported:
        print(f"  {line}")
    return EXIT_OK


def cmd_ca(config: Config, client: str | None = None, out: str = ".") -> int:
    from proxy.certificates import certificate_manager, root_files

    if client is not None:
        from certs.client_certs import write_client_certificate
        from certs.errors import CertError

        try:
            cert_path, key_path = write_client_certificate(
                config.server.data_dir, client, Path(out), root_files=root_files(config)
            )
        except CertError as exc:
            return _fail(str(exc), EXIT_CONFIG)
        except OSError as exc:
            return _fail(f"cannot write the client certificate: {exc}", EXIT_FAILURE)
        print(f"wrote {cert_path} and {key_path}")
        return EXIT_OK
    manager = certificate_manager(config)
    sys.stdout.write(manager.local_ca_root_pem().decode("ascii"))
    return EXIT_OK


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_certs(config: Config) -> int:
    from proxy.certificates import acme_settings, cert_specs, certificate_manager
    from proxy.tls import server_context

    specs = cert_specs(config)
    manager = certificate_manager(config)
    statuses = manager.status([s for s in specs if s.source != "acme"])
    acme_specs = [s for s in specs if s.source == "acme"]
    if acme_specs and config.acme is not None:
        from certs.acme_manager import AcmeManager
        from certs.challenges.http01 import Http01Responder

        acme = AcmeManager(
            config.server.data_dir, acme_settings(config.acme), server_context, Http01Responder()
        )
        statuses += acme.status(acme_specs)
    for st in statuses:
        print(
            f"{','.join(st.hosts)}  source={st.source}  issuer={st.issuer or '-'}  "
            f"not_after={_when(st.not_after)}  next_renewal={_when(st.next_renewal)}"
            f" ({st.renewal_reason})  last_error={st.last_error or '-'}"
        )
    return EXIT_OK


def cmd_certs_renew(config: Config, host: str | None) -> int:
    from proxy.control import ControlError, ask

    if not host:
        return _fail("certs renew: which HOST?", EXIT_FAILURE)
    try:
        done = ask(config.server.data_dir, {"op": "renew", "host": host})
    except ControlError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    print(
        f"renewed {host} (site {done['site']}): serial {done['serial']}, "
        f"valid until {done['not_after']}"
    )
    return EXIT_OK


def cmd_status(config: Config) -> int:
    from proxy.workers.status import format_status

    path = config.server.data_dir / "status.json"
    try:
        print(format_status(path), end="")
    except FileNotFoundError:
        return _fail(f"no status file at {path}: no proxy with supervised workers has run", 1)
    return EXIT_OK


def cmd_run(config: Config, loop_kind: str, log_level: str | None) -> int:
    from dataclasses import replace

    from proxy.server import run_server

    if log_level:
        config = replace(config, server=replace(config.server, log_level=log_level))  # type: ignore[arg-type]
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(run_server(config))
    return asyncio.run(run_server(config))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = _load(args.config)
        if args.command == "check":
            return cmd_check(config)
        if args.command == "ca":
            return cmd_ca(config, args.client, args.out)
        if args.command == "certs":
            if args.action == "renew":
                return cmd_certs_renew(config, args.host)
            return cmd_certs(config)
        if args.command == "status":
            return cmd_status(config)
        return cmd_run(config, args.loop, args.log_level)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    except StartupError as exc:
        return _fail(str(exc), getattr(exc, "exit_code", EXIT_FAILURE))
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
