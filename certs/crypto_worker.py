"""The certificate work that needs `cryptography`, done in a short-lived child process.

Why a child: importing `cryptography` grows a process by about 10 MiB that it never gives back,
and `tlsproxy run` lives for months while it needs that library for a few hundred milliseconds a
week (a local-CA leaf every few days, a check of the user's files at start-up and on SIGHUP).
So an isolated CertificateManager (`isolate_crypto=True`) runs these steps here instead, with
the same code a non-isolated manager runs in its own process, and reads the outcome from storage.

Protocol: `python -m certs.crypto_worker` reads one JSON request on stdin and writes one JSON
reply on stdout, then exits.
    request  {"op": "validate" | "issue" | "issue_many" | "broken" | "ca",
              "manager": {settings}, "now": epoch seconds, ...}
    reply    {"ok": {...}, "logs": [[logger, level, message], ...]}
          or {"error": {"kind": ..., ...}, "logs": [...]}
An error is raised again in the parent as the same class with the same text, so `tlsproxy run`
prints what `tlsproxy check` prints. The child's log records are replayed in the parent's logs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CertError, CertificateFileError, IssuanceError, LockTimeout
from .files import refuse_passphrase
from .models import CertSpec, ClientAuthSpec
from .storage import Storage, StorageSettings

if TYPE_CHECKING:
    from .manager import CertificateManager

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])
# Beyond waiting for the lock: start-up and imports, key generation, a possible CA repair.
_SLACK = 60.0

# -- parent side ---------------------------------------------------------------------------


def run_worker(manager: CertificateManager, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Blocking: run `op` in a child and return its reply's "ok" part; re-raises its error.
    Call it from a worker thread when an event loop is running."""
    request = {
        "op": op,
        "now": manager._clock(),
        "manager": {
            "data_dir": str(manager.storage.root),
            "storage": _encode_storage(manager.storage.settings),
            "leaf_lifetime": manager.leaf_lifetime.total_seconds(),
            "renew_ratio": manager.renew_ratio,
            "lock_timeout": manager.lock_timeout,
            "root_files": None
            if manager.root_files is None
            else [str(path) for path in manager.root_files],
        },
        **{k: _encode(v) for k, v in args.items()},
    }
    timeout = manager.worker_timeout
    if op in ("issue", "issue_many", "broken"):
        timeout = max(timeout, manager.lock_timeout + _SLACK)
    try:
        proc = subprocess.run(
            # -P: the current directory (which may hold anything) is not searched for modules.
            [sys.executable, "-P", "-m", "certs.crypto_worker"],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=timeout,
            env=_child_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise IssuanceError(f"crypto worker ({op}) gave no answer within {timeout:g}s") from None
    except OSError as e:
        raise IssuanceError(f"crypto worker ({op}) could not start: {e}") from None
    try:
        reply = json.loads(proc.stdout)
        if not isinstance(reply, dict) or not ("ok" in reply or "error" in reply):
            raise ValueError("not a reply")
    except ValueError:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        last = lines[-1] if lines else "no output"
        raise IssuanceError(
            f"crypto worker ({op}) failed (exit status {proc.returncode}): {last}"
        ) from None
    for name, level, message in reply.get("logs", []):
        logging.getLogger(name).log(level, "%s", message)
    if "error" in reply:
        raise _decode_error(reply["error"])
    return reply["ok"]


def _child_env() -> dict[str, str]:
    """The child must run this very code: when it was found outside the installed packages (a
    checkout on PYTHONPATH or the current directory), the child is told where."""
    import site

    env = dict(os.environ)
    installed = {*site.getsitepackages(), site.getusersitepackages()}
    if _PACKAGE_PARENT not in installed:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
    return env


def _encode(value: Any) -> Any:
    if isinstance(value, CertSpec):
        return {
            "name": value.name,
            "hosts": list(value.hosts),
            "source": value.source,
            "cert_file": None if value.cert_file is None else str(value.cert_file),
            "key_file": None if value.key_file is None else str(value.key_file),
            "challenge": value.challenge,
            "broken": value.broken,
            "client_auth": None
            if value.client_auth is None
            else {"ca": str(value.client_auth.ca), "required": value.client_auth.required},
        }
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _encode_storage(settings: StorageSettings) -> dict[str, Any]:
    # The URL may carry Redis's password: it travels on the child's stdin, never its argv.
    return {
        "backend": settings.backend,
        "url": settings.url,
        "prefix": settings.prefix,
        "encryption_key_file": None
        if settings.encryption_key_file is None
        else str(settings.encryption_key_file),
    }


def _decode_storage(data: dict[str, Any] | None) -> StorageSettings:
    if not data:
        return StorageSettings()
    key_file = data.get("encryption_key_file")
    return StorageSettings(
        backend=data["backend"],
        url=data.get("url"),
        prefix=data.get("prefix", "tlsproxy"),
        encryption_key_file=None if key_file is None else Path(key_file),
    )


def _decode_spec(data: dict[str, Any]) -> CertSpec:
    def path(key: str) -> Path | None:
        return None if data.get(key) is None else Path(data[key])

    return CertSpec(
        name=data["name"],
        hosts=tuple(data["hosts"]),
        source=data["source"],
        cert_file=path("cert_file"),
        key_file=path("key_file"),
        challenge=data.get("challenge"),
        broken=data.get("broken"),
        client_auth=_decode_client_auth(data.get("client_auth")),
    )


def _decode_client_auth(data: dict[str, Any] | None) -> ClientAuthSpec | None:
    if data is None:
        return None
    ca = data["ca"]
    return ClientAuthSpec("internal" if ca == "internal" else Path(ca), bool(data["required"]))


def _encode_error(error: BaseException) -> dict[str, Any]:
    if isinstance(error, CertificateFileError):
        return {"kind": "file", "path": str(error.path), "reason": error.reason}
    if isinstance(error, LockTimeout):
        return {
            "kind": "lock",
            "path": str(error.path),
            "holder": error.holder,
            "timeout": error.timeout,
        }
    if isinstance(error, IssuanceError):
        return {"kind": "issuance", "message": str(error)}
    if isinstance(error, CertError):
        return {"kind": "cert", "message": str(error)}
    if isinstance(error, OSError) and error.errno is not None:
        return {
            "kind": "os",
            "errno": error.errno,
            "strerror": error.strerror,
            "filename": None if error.filename is None else str(error.filename),
        }
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return {"kind": "unexpected", "message": f"{type(error).__name__}: {text}".rstrip(": ")}


def _decode_error(data: dict[str, Any]) -> Exception:
    kind = data.get("kind")
    if kind == "file":
        return CertificateFileError(data["path"], data["reason"])
    if kind == "lock":
        return LockTimeout(Path(data["path"]), data["holder"], data["timeout"])
    if kind == "issuance":
        return IssuanceError(data["message"])
    if kind == "cert":
        return CertError(data["message"])
    if kind == "os":
        if data["filename"] is None:
            return OSError(data["errno"], data["strerror"])
        return OSError(data["errno"], data["strerror"], data["filename"])
    return IssuanceError(f"crypto worker: {data.get('message', data)}")


# -- child side ----------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(message)s"))  # a traceback is kept as text
        self.records: list[list[Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append([record.name, record.levelno, self.format(record)])


def _plain_context(cert_file: Path, key_file: Path, client_ca: Path | None = None) -> Any:
    # The parent checks again with its real context factory (certs cannot import proxy.tls);
    # this one only has to refuse what no TLS context would load.
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file, password=refuse_passphrase)
    if client_ca is not None:
        context.load_verify_locations(cafile=str(client_ca))
    return context


def _serve(request: dict[str, Any]) -> dict[str, Any]:
    from .manager import CertificateManager

    settings = request["manager"]
    now = float(request["now"])
    data_dir = Path(settings["data_dir"])
    manager = CertificateManager(
        data_dir,
        _plain_context,
        clock=lambda: now,
        leaf_lifetime=timedelta(seconds=settings["leaf_lifetime"]),
        renew_ratio=settings["renew_ratio"],
        lock_timeout=settings["lock_timeout"],
        root_files=None
        if settings.get("root_files") is None
        else (Path(settings["root_files"][0]), Path(settings["root_files"][1])),
        storage=Storage.open(data_dir, _decode_storage(settings.get("storage"))),
    )
    if request["op"] == "validate":
        manager.validate([_decode_spec(s) for s in request["specs"]])
        return {}
    if request["op"] == "issue":
        spec = _decode_spec(request["spec"])
        if spec.source != "internal":
            raise IssuanceError(f"{spec.name}: the crypto worker only issues from the local CA")
        with manager.storage.lock(spec.name, timeout=manager.lock_timeout):
            found, issuer, reused = manager.issue_and_save(spec, request.get("current_serial"))
        return {"serial": found[1].serial, "issuer": issuer, "reused": reused}
    if request["op"] == "issue_many":
        for spec in [_decode_spec(s) for s in request["specs"]]:
            with manager.storage.lock(spec.name, timeout=manager.lock_timeout):
                manager.issue_and_save(spec, None)
        return {}
    if request["op"] == "broken":
        specs = [_decode_spec(s) for s in request["specs"]]
        return {"serials": [manager.make_broken_and_save(spec)[1].serial for spec in specs]}
    if request["op"] == "ca":
        manager.local_ca_root_pem()  # creates the CA if it is missing
        return {}
    raise ValueError(f"unknown operation {request['op']!r}")


def main() -> int:
    collect = _Collect()
    root = logging.getLogger("tlsproxy")
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    root.propagate = False  # the parent prints them, once
    try:
        reply: dict[str, Any] = {"ok": _serve(json.load(sys.stdin))}
    except Exception as e:
        if not isinstance(e, CertError | OSError):
            logging.getLogger("tlsproxy.certs").exception("crypto worker failed")
        reply = {"error": _encode_error(e)}
    reply["logs"] = collect.records
    sys.stdout.write(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
