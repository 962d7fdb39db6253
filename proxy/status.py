"""`tlsproxy status`: the running proxy's answer to the control socket's "status" op, as text.

Pure. The document (built by ProxyServer._control_status) is JSON:
    pid, uptime (s), config (path or null), https/http (listener addresses),
    sites [{hosts, tls, upstream, hsts, certificate: {issuer, serial, not_after} | null}],
    upstreams {name: [{server, up}]}, workers [WorkerInfo as a dict]
"""

from __future__ import annotations

from typing import Any

from proxy.workers.status import WorkerInfo, duration, format_workers


def format_report(doc: dict[str, Any]) -> str:
    config = doc.get("config") or "(no config file: reverse-proxy)"
    lines = [f"tlsproxy pid {doc['pid']}, up {duration(float(doc['uptime']))}, config {config}"]
    listeners = [f"https://{a}" for a in doc["https"]] + [f"http://{a}" for a in doc["http"]]
    lines.append(f"listening: {', '.join(listeners)}")
    lines.append("sites:")
    for site in doc["sites"]:
        cert = site.get("certificate")
        if cert is None:
            what = "no certificate yet"
        else:
            what = f"certificate until {cert['not_after']} from {cert['issuer']}"
        hsts = f", hsts {site['hsts']!r}" if site.get("hsts") else ""
        lines.append(
            f"  {', '.join(site['hosts'])} -> {site['upstream']}: tls {site['tls']}, {what}{hsts}"
        )
    lines.append("upstreams:")
    for name, servers in doc["upstreams"].items():
        listed = ", ".join(f"{s['server']} ({'up' if s['up'] else 'down'})" for s in servers)
        lines.append(f"  {name}: {listed or '(no server yet)'}")
    workers = [WorkerInfo(**w) for w in doc.get("workers", [])]
    return "\n".join(lines) + "\n" + format_workers(workers)
