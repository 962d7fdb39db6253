"""`tlsproxy` / `python -m proxy`: run, check, ca, certs, status, storage, reverse-proxy.

Exit status: 0 on success; 2 on a bad config or a file it names, with one line on stderr that
names the key or file; 1 when the proxy cannot start for another reason (a port already taken).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from proxy.config import Config, load_config
from proxy.errors import ConfigError, StartupError

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
# `status`, as LSB init scripts and systemctl say it: 3 not running, 4 status unknown.
EXIT_NOT_RUNNING, EXIT_STATUS_UNKNOWN = 3, 4

DESCRIPTION = """\
A TLS-terminating reverse proxy for Python web apps. It owns the https port, picks each
connection's certificate by SNI (from files, a built-in local CA or ACME), speaks HTTP/2 or
HTTP/1.1 with clients, and forwards each request as HTTP/1.1 to your app's workers over pooled
keep-alive connections."""


EPILOG = """\
exit status: 0 on success; 2 on a bad config or a file it names (one line naming the key or
file), bad arguments, or a prestart step that failed; 1 when it cannot start otherwise (a port
taken). status: 3 when no proxy runs, 4 when one cannot be asked.

signals (run): SIGTERM/SIGINT stop accepting, let in-flight requests finish within
server.shutdown_grace, stop the workers, exit 0 (a second SIGINT exits at once). SIGHUP re-reads
the config and certificates (open connections keep theirs) and restarts the workers one at a
time; a bad config at SIGHUP is logged and the running one stays."""


def _version() -> str:
    # The source itself, not the installed metadata: an editable install whose pyproject
    # version was bumped since, or a checkout never installed, still tells the truth.
    from proxy import __version__

    return __version__


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line (and exit 2), like every other error of this program."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"tlsproxy: error: {message} (see `{self.prog} --help`)\n")


REVERSE_PROXY_HELP = """\
HTTPS for HOST in front of ADDR, with no config file: the same proxy `run` starts, built from
these flags.

HOST's certificate comes from the local CA when no public CA could issue it (localhost and
*.localhost, *.test, *.internal, *.local, *.home.arpa, *.example, *.invalid, one-label names,
IP addresses): trust DATA_DIR/ca/root.pem (`curl --cacert`). Any other name gets one over ACME
from Let's Encrypt (--staging: its staging CA, untrusted but with generous rate limits; first
check there that DNS and port 80 reach this machine).

Ports: `--from HOST` listens on 443 (https) and 80 (redirects to https, and ACME http-01), as
Caddy does; `--from HOST:PORT` listens on PORT only (add --http-port for a plain port).
localhost and *.localhost listen on loopback only (127.0.0.1, and ::1 with IPv6), an IP
address on that address, other names on every address (0.0.0.0, and :: with IPv6).

examples:
  tlsproxy reverse-proxy --from app.localhost:8443 --to :8000
  tlsproxy reverse-proxy --from app.example.com --to 127.0.0.1:8000 --email ops@example.com
  tlsproxy reverse-proxy --from app.example.com --to unix:/run/app.sock --staging

exit status: as `run`: 0 after a clean stop (SIGTERM/SIGINT); 2 on bad arguments (one line
naming the flag); 1 when it cannot start otherwise (a port taken)."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tlsproxy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tlsproxy {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, config_required: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "-c", "--config", required=config_required, metavar="FILE", help="the TOML config file"
        )
        return p

    run = add(
        "run",
        "run in the foreground until SIGTERM/SIGINT (graceful drain); SIGHUP reloads the config "
        "and certificates without dropping open connections",
    )
    _add_run_options(run)
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
        "one line per managed certificate: hosts, issuer, not-after, next renewal, error (the "
        "running proxy's view through [server] admin when it answers there, else read from "
        "data_dir); `certs renew HOST` asks the running proxy to renew HOST's certificate now",
    )
    certs.add_argument(
        "action",
        nargs="?",
        choices=("renew",),
        help="renew: a fresh certificate for HOST now (local CA: done when the command returns;"
        " ACME: ordered in the background, the result in the log and `tlsproxy certs`)",
    )
    certs.add_argument("host", nargs="?", metavar="HOST", help="a host of a [[site]] (with renew)")
    status = add(
        "status",
        "the running proxy: its listeners, sites and their certificates, upstreams, and "
        "supervised workers (pid, state, uptime, requests, RSS)",
        config_required=False,
    )
    status.add_argument(
        "--data-dir",
        metavar="DIR",
        help="instead of -c: the data_dir of the proxy to ask (say, a reverse-proxy's)",
    )
    status.epilog = (
        "exit status: 0 when a proxy runs on the config's data_dir (asked through its "
        "[server] admin endpoint when the config has one, else DATA_DIR/control.sock); 3 when "
        "none does; 4 when one may run but cannot be asked (permissions)"
    )
    storage = add(
        "storage",
        "storage copy: copy everything in this config's [storage] (say, a data_dir) into the "
        "storage of --to-config (say, a Redis), keys and all",
    )
    storage.add_argument("action", choices=("copy",), help="copy: the only action")
    storage.add_argument(
        "--to-config",
        required=True,
        metavar="FILE",
        help="the config whose [storage] receives the copy (file: its data_dir)",
    )
    storage.epilog = (
        "Stop the instances using either storage first: locks are not copied, and a "
        "certificate renewed during the copy may be missed. Copying into a storage that "
        "already holds keys overwrites the ones with the same names and keeps the others. "
        "exit status: 0 done (the count printed); 2 a bad config or encryption key file; "
        "1 a storage that fails (Redis unreachable, a value that does not decrypt)."
    )
    _add_reverse_proxy(sub)
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop (default: uvloop; asyncio is the standard library's)",
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="override server.log_level (debug shows one line per TLS handshake)",
    )
    p.add_argument(
        "--trace",
        action="append",
        metavar="HOST",
        help="print, for each connection whose SNI is HOST, every step of its TLS termination "
        "and of each request (ClientHello, certificate, handshake, request head, routing, "
        "header rewriting, upstream, response and timings) to the log, secrets hidden; "
        "repeatable; '*' traces every connection (see README: How TLS termination works here)",
    )


def _add_reverse_proxy(sub: argparse._SubParsersAction) -> None:
    summary = (
        "HTTPS for HOST in front of ADDR, with no config file (local CA for local names, "
        "ACME otherwise)"
    )
    p = sub.add_parser(
        "reverse-proxy",
        help=summary,
        description=REVERSE_PROXY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--from",
        dest="origin",
        required=True,
        metavar="HOST[:PORT]",
        help="the name clients use (an IPv6 address as [::1]:PORT); without a port: 443 and 80",
    )
    p.add_argument(
        "--to",
        required=True,
        metavar="ADDR",
        help="the app: HOST:PORT, :PORT (this machine) or unix:PATH",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="certificates, keys, the ACME account and the local CA "
        "(default: $XDG_DATA_HOME/tlsproxy, else ~/.local/share/tlsproxy)",
    )
    p.add_argument(
        "--http-port",
        metavar="PORT",
        help="the plain-HTTP port (redirects to https, ACME http-01); default: 80 when --from "
        "has no port, none when it has one; 'off' for none",
    )
    p.add_argument("--email", help="ACME: the account's contact address (expiry warnings)")
    p.add_argument(
        "--staging",
        action="store_true",
        help="ACME: Let's Encrypt's staging CA (test certificates, high rate limits)",
    )
    p.add_argument("--directory", metavar="URL", help="ACME: another CA's directory URL")
    p.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="ACME: CA file to trust the ACME server's own HTTPS (a private CA, Pebble)",
    )
    p.add_argument(
        "--internal-certs",
        action="store_true",
        help="the local CA signs HOST's certificate whatever the name",
    )
    p.add_argument(
        "--access-log",
        choices=("text", "json", "off"),
        default="text",
        help="one line per request on stdout (default: text)",
    )
    _add_run_options(p)


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
    if config.storage.encryption_key_file is not None:
        _read_storage_secret(config)
    s = config.server
    print(f"config {config.source}: OK")
    print(f"  https: {', '.join(str(a) for a in s.https)}")
    plain = ", ".join(str(a) for a in s.http) or "(none)"
    print(f"  http:  {plain} (redirect to https, ACME http-01)")
    print(f"  data_dir: {s.data_dir}")
    if s.admin is not None:
        print(f"  admin: http://{s.admin.label} (GET /metrics, /status, /certs)")
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
        hsts = f" hsts={site.hsts!r}" if site.hsts else ""
        print(
            f"  site {', '.join(site.hosts)}: tls={tls}{broken}{auth}{hsts}"
            f" -> upstream {site.upstream}"
        )
    print(f"  storage: {config.storage.describe()}")
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
    from proxy.certificates import certificate_manager, open_storage, root_files

    if client is not None:
        from certs.client_certs import write_client_certificate
        from certs.errors import CertError

        try:
            cert_path, key_path = write_client_certificate(
                config.server.data_dir,
                client,
                Path(out),
                root_files=root_files(config),
                storage=open_storage(config),
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


def _read_storage_secret(config: Config) -> None:
    """ConfigError (exit 2) naming the key when the encryption key file is unusable."""
    from certs.storage import StorageError
    from certs.storage.crypt import read_secret

    assert config.storage.encryption_key_file is not None
    try:
        read_secret(config.storage.encryption_key_file)
    except StorageError as exc:
        raise ConfigError("storage.encryption_key_file", str(exc)) from None


def cmd_storage_copy(config: Config, to_config: str) -> int:
    from certs.storage import StorageError, copy_all, open_backend

    try:
        target_config = _load(to_config)
    except ConfigError as exc:
        raise ConfigError(f"--to-config {to_config}: {exc.key}", exc.message) from None
    ends = []
    for name, which in ((str(config.source), config), (f"--to-config {to_config}", target_config)):
        try:
            ends.append(open_backend(which.storage, which.server.data_dir))
        except StorageError as exc:
            raise ConfigError(f"{name}: storage.encryption_key_file", str(exc)) from None
    source, target = ends
    try:
        if source.describe() == target.describe():
            raise ConfigError("--to-config", f"the same storage as -c: {source.describe()}")
        count = copy_all(source, target)
    except StorageError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    finally:
        source.close()
        target.close()
    print(f"copied {count} keys from {source.describe()} to {target.describe()}")
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


def _from_admin(config: Config, path: str) -> Any:
    """The running proxy's answer on its admin endpoint, or None when the config has none or
    nothing answers there (the caller then asks the control socket or storage)."""
    address = config.server.admin
    if address is None:
        return None
    from proxy.admin import AdminUnreachable, fetch_json

    try:
        return fetch_json(address, path)
    except AdminUnreachable:
        return None
    except (OSError, ValueError) as exc:
        print(f"tlsproxy: admin endpoint {address.label}: {exc}; asking directly", file=sys.stderr)
        return None


def cmd_certs(config: Config) -> int:
    from certs.models import CertStatus
    from proxy.certificates import acme_settings, cert_specs, certificate_manager
    from proxy.tls import server_context

    served = _from_admin(config, "/certs")
    if served is not None:  # the running proxy's view, including what it serves now
        for doc in served["certificates"]:
            doc["hosts"] = tuple(doc["hosts"])
            for key in ("not_after", "next_renewal"):
                if doc[key] is not None:
                    doc[key] = datetime.fromisoformat(doc[key])
        _print_certs([CertStatus(**doc) for doc in served["certificates"]])
        return EXIT_OK
    specs = cert_specs(config)
    manager = certificate_manager(config)
    statuses = manager.status([s for s in specs if s.source != "acme"])
    manager.storage.last_error = None  # said on its lines already; the ACME lines say theirs
    acme_specs = [s for s in specs if s.source == "acme"]
    if acme_specs and config.acme is not None:
        from certs.acme_manager import AcmeManager
        from certs.challenges.http01 import Http01Responder

        acme = AcmeManager(
            config.server.data_dir,
            acme_settings(config.acme),
            server_context,
            Http01Responder(),
            storage=manager.storage,
        )
        statuses += acme.status(acme_specs)
    _print_certs(statuses)
    return EXIT_OK


def _print_certs(statuses: Sequence[Any]) -> None:
    for st in statuses:
        print(
            f"{','.join(st.hosts)}  source={st.source}  issuer={st.issuer or '-'}  "
            f"not_after={_when(st.not_after)}  next_renewal={_when(st.next_renewal)}"
            f" ({st.renewal_reason})  last_error={st.last_error or '-'}"
        )


def cmd_certs_renew(config: Config, host: str | None) -> int:
    from proxy.control import ControlError, ask

    if not host:
        return _fail("certs renew: which HOST?", EXIT_FAILURE)
    try:
        done = ask(config.server.data_dir, {"op": "renew", "host": host})
    except ControlError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    if "acme" not in done:
        print(
            f"renewed {host} (site {done['site']}): serial {done['serial']}, "
            f"valid until {done['not_after']}"
        )
        return EXIT_OK
    # An ACME order runs on in the proxy: say where its result will show.
    if done.get("under_way"):
        what = f"an order for {host} (site {done['site']}) is already under way"
    elif done.get("not_before"):
        what = (
            f"renewal of {host} (site {done['site']}) requested; the CA asked to wait, "
            f"so it is ordered at {done['not_before']}"
        )
    else:
        what = f"renewal of {host} (site {done['site']}) requested from {done['acme']}"
    print(f"{what}; the proxy logs the result and `tlsproxy certs` shows it")
    return EXIT_OK


def cmd_status(data_dir: Path, config: Config | None = None) -> int:
    from proxy.control import ControlError, NoProxy, ask
    from proxy.status import format_report

    doc = _from_admin(config, "/status") if config is not None else None
    if doc is not None:
        print(format_report(doc), end="")
        return EXIT_OK
    try:
        doc = ask(data_dir, {"op": "status"}, timeout=10.0)
    except NoProxy:
        print(f"tlsproxy: no proxy is running on data_dir {data_dir}")
        return EXIT_NOT_RUNNING
    except ControlError as exc:  # it may run, but does not say (LSB: status unknown)
        return _fail(str(exc), EXIT_STATUS_UNKNOWN)
    print(format_report(doc), end="")
    return EXIT_OK


def trace_names(values: Sequence[str] | None) -> list[str]:
    """--trace's values, checked: a host name as a client's SNI says it, or '*'."""
    from proxy.downstream.routing import normalize_host

    names = []
    for value in values or ():
        name = value.strip().lower()
        if name != "*" and (not name or normalize_host(name) != name.rstrip(".") or ":" in name):
            raise ConfigError(
                "--trace", f"expected a host name (as in the SNI) or '*', got {value!r}"
            )
        names.append(name)
    return names


def cmd_run(
    config: Config, loop_kind: str, log_level: str | None, trace: Sequence[str] | None = None
) -> int:
    from dataclasses import replace

    from proxy.server import run_server

    if log_level:
        config = replace(config, server=replace(config.server, log_level=log_level))  # type: ignore[arg-type]
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(run_server(config, trace or ()))
    return asyncio.run(run_server(config, trace or ()))


def reverse_proxy_config(args: argparse.Namespace) -> Config:
    """The Config `run` would get from a file holding what these flags say."""
    from proxy.quick import (
        build_config,
        build_document,
        default_data_dir,
        ipv6_available,
        parse_from,
        upstream_address,
    )

    http_port: int | str | None = "default"
    if args.http_port is not None:
        text = args.http_port.strip().lower()
        if text == "off":
            http_port = None
        elif text.isdigit() and 1 <= int(text) <= 65535:
            http_port = int(text)
        else:
            raise ConfigError(
                "--http-port", f"expected a port from 1 to 65535 or 'off', got {text!r}"
            )
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    document = build_document(
        parse_from(args.origin),
        upstream_address(args.to),
        data_dir=data_dir.absolute(),
        http_port=http_port,  # type: ignore[arg-type]
        email=args.email,
        staging=args.staging,
        directory=args.directory,
        ca_bundle=args.ca_bundle and str(Path(args.ca_bundle).expanduser().absolute()),
        internal_certs=args.internal_certs,
        access_log=args.access_log,
        log_level=args.log_level or "info",
        ipv6=ipv6_available(),
    )
    return build_config(document)


def cmd_reverse_proxy(args: argparse.Namespace) -> int:
    from proxy.quick import as_flag_error

    config = reverse_proxy_config(args)
    site = config.sites[0]
    if site.tls == "internal":
        root = config.server.data_dir / "ca" / "root.pem"
        said = f"certificate from the local CA; clients trust {root}"
    else:
        assert config.acme is not None
        said = f"certificate over ACME from {config.acme.directory}"
    print(f"tlsproxy: {site.name}: {said}", file=sys.stderr)
    try:
        return cmd_run(config, args.loop, None, args.trace)
    except ConfigError as exc:  # from the checks at start-up: name the flag, not a config key
        raise as_flag_error(exc) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("run", "reverse-proxy"):
            args.trace = trace_names(args.trace)  # before anything is read or bound
        if args.command == "reverse-proxy":
            return cmd_reverse_proxy(args)
        if args.command == "status" and (args.config is None) == (args.data_dir is None):
            return _fail("status: give -c FILE or --data-dir DIR (one of them)", EXIT_CONFIG)
        if args.command == "status" and args.data_dir is not None:
            return cmd_status(Path(args.data_dir).expanduser().absolute())
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
            return cmd_status(config.server.data_dir, config)
        if args.command == "storage":
            return cmd_storage_copy(config, args.to_config)
        return cmd_run(config, args.loop, args.log_level, args.trace)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    except StartupError as exc:
        return _fail(str(exc), getattr(exc, "exit_code", EXIT_FAILURE))
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:
        # `tlsproxy check | head`: the reader has what it wanted. Python would report the
        # same error again flushing stdout at exit, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
