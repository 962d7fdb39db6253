"""Everything one config generation needs to serve requests, built once per (re)load.

Open connections keep the state they started with, so a SIGHUP never changes the rules in the
middle of a connection; pools whose upstream config did not change are handed over by the
server so their idle connections survive a reload.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.config import Config, Limits
from proxy.downstream.forwarding import TrustedProxies
from proxy.downstream.routing import Router
from proxy.logs import AccessLog
from proxy.metrics import Metrics
from proxy.upstream.pool import UpstreamPool


@dataclass(eq=False)
class ProxyState:
    limits: Limits
    router: Router
    trusted: TrustedProxies
    pools: dict[str, UpstreamPool]
    access_log: AccessLog
    metrics: Metrics | None = None  # None while `[server] admin` is off: nothing counted
    # Whether a request's start time is wanted (for the access log or the metrics).
    timed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.timed = self.access_log.enabled or self.metrics is not None

    @classmethod
    def build(
        cls,
        config: Config,
        access_log: AccessLog,
        pools: dict[str, UpstreamPool] | None = None,
        metrics: Metrics | None = None,
    ) -> ProxyState:
        given = pools or {}
        return cls(
            limits=config.limits,
            router=Router(config.sites, config.server.default_site),
            trusted=TrustedProxies(config.server.trusted_proxies),
            pools={
                name: given.get(name) or UpstreamPool(upstream, config.limits)
                for name, upstream in config.upstreams.items()
            },
            access_log=access_log,
            metrics=metrics,
        )

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()
