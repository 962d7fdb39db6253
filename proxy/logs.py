"""Logger names and the access log.

Loggers: ``tlsproxy`` (lifecycle), ``tlsproxy.tls`` (handshakes), ``tlsproxy.access`` (one line
per request), ``tlsproxy.upstream``, ``tlsproxy.workers``, ``tlsproxy.certs``, ``tlsproxy.trace``
(`run --trace HOST`: the walk-through of each traced connection, proxy/trace.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

log = logging.getLogger("tlsproxy")
tls_log = logging.getLogger("tlsproxy.tls")
access_logger = logging.getLogger("tlsproxy.access")
upstream_log = logging.getLogger("tlsproxy.upstream")
workers_log = logging.getLogger("tlsproxy.workers")


def setup_logging(level: str = "info") -> None:
    """Log to stderr (systemd's journal takes it from there), one line per record."""
    root = logging.getLogger("tlsproxy")
    root.setLevel(getattr(logging, level.upper()))
    if not any(getattr(h, "_tlsproxy", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._tlsproxy = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    # Access lines are already complete sentences: print them bare on stdout.
    if not access_logger.handlers:
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(logging.Formatter("%(message)s"))
        access_logger.addHandler(out)
        access_logger.propagate = False
    access_logger.setLevel(logging.INFO)


class AccessLog:
    """Formats one line per finished request. `enabled` is checked by callers first, so that a
    disabled log costs one attribute read on the hot path.

    Lines go to `writer` (proxy.line_writer.LineWriter: stdout, never blocking the event loop;
    what `tlsproxy run` uses) or, without one, to the `tlsproxy.access` logger. A line is built
    by one f-string: no log record, no formatter, and the time stamp is made once a second."""

    def __init__(self, fmt: Literal["text", "json", "off"] = "text", writer: Any = None) -> None:
        self.fmt = fmt
        self.enabled = fmt != "off"
        self._write: Callable[[str], None] = writer.write if writer is not None else _to_logger
        self._as_json = fmt == "json"
        self._second = -1
        self._stamp = ""

    def emit(
        self,
        *,
        client: str,
        sni: str | None,
        host: bytes | None,
        method: bytes,
        target: bytes,
        status: int,
        bytes_in: int,
        bytes_out: int,
        upstream: str,
        duration: float,
        protocol: str = "http/1.1",
    ) -> None:
        if not self.enabled:
            return
        host_text = host.decode("latin-1") if host else "-"
        method_text, target_text = method.decode("latin-1"), target.decode("latin-1")
        if self._as_json:
            # The same text json.dumps(..., separators=(",", ":")) gives, without building a
            # dict: strings through json's own (C) string encoder, numbers as json writes them.
            quote = _json_string
            line = (
                f'{{"time":{round(time.time(), 3)!r},"client":{quote(client)},'
                f'"sni":{quote(sni) if sni is not None else "null"},"host":{quote(host_text)},'
                f'"method":{quote(method_text)},"target":{quote(target_text)},'
                f'"status":{status},"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
                f'"upstream":{quote(upstream)},"duration_ms":{round(duration * 1000, 3)!r},'
                f'"protocol":{quote(protocol)}}}'
            )
        else:
            second = int(time.time())
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
            line = (
                f"{self._stamp} {client} sni={sni or '-'} host={host_text} "
                f'"{method_text} {target_text}" {status} in={bytes_in} out={bytes_out} '
                f"upstream={upstream} {duration * 1000:.1f}ms proto={protocol}"
            )
        self._write(line)


_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def _to_logger(line: str) -> None:
    if access_logger.isEnabledFor(logging.INFO):
        access_logger.info(line)
