"""Logger names and the access log.

Loggers: ``tlsproxy`` (lifecycle), ``tlsproxy.tls`` (handshakes), ``tlsproxy.access`` (one line
per request), ``tlsproxy.upstream``, ``tlsproxy.workers``, ``tlsproxy.certs``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal

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
    disabled log costs one attribute read on the hot path."""

    def __init__(self, fmt: Literal["text", "json", "off"] = "text") -> None:
        self.fmt = fmt
        self.enabled = fmt != "off"

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
    ) -> None:
        if not self.enabled or not access_logger.isEnabledFor(logging.INFO):
            return
        now = time.time()
        host_text = host.decode("latin-1") if host else "-"
        if self.fmt == "json":
            line = json.dumps(
                {
                    "time": round(now, 3),
                    "client": client,
                    "sni": sni,
                    "host": host_text,
                    "method": method.decode("latin-1"),
                    "target": target.decode("latin-1"),
                    "status": status,
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "upstream": upstream,
                    "duration_ms": round(duration * 1000, 3),
                },
                separators=(",", ":"),
            )
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            line = (
                f"{stamp}Z {client} sni={sni or '-'} host={host_text} "
                f'"{method.decode("latin-1")} {target.decode("latin-1")}" {status} '
                f"in={bytes_in} out={bytes_out} upstream={upstream} "
                f"{duration * 1000:.1f}ms"
            )
        access_logger.info(line)
