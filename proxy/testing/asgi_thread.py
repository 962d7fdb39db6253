"""An ASGI app from the test itself, served by uvicorn in a thread of the test's process.

The test keeps the app object, so it can look at the app's state after a request went through
the real proxy. uvicorn runs its own event loop in the thread; the listening socket is bound
here (port 0), so its port is known before uvicorn starts and no other process can take it.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from proxy.testing.errors import StartError, need


class AsgiThread:
    def __init__(self, app: Any, *, log_level: str = "warning") -> None:
        uvicorn: Any = need("uvicorn", "TLSProxy(app=<ASGI object>)")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(
            app,
            log_level=log_level,
            # The proxy is the only client: trust its X-Forwarded-For/-Proto, so that the app
            # sees the real client address and https, as it would in production.
            proxy_headers=True,
            forwarded_allow_ips="*",
            # Longer than the proxy's pooled-connection expiry (4 s), as uvicorn's default is.
            timeout_keep_alive=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run,
            kwargs={"sockets": [self.sock]},
            name=f"tlsproxy-testing-app {self.address}",
            daemon=True,  # a test that never stops it must not keep the interpreter alive
        )

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise StartError("the ASGI app did not start (its startup failed; see above)")
            if time.monotonic() > deadline:
                self.stop()
                raise StartError(f"the ASGI app did not start within {timeout:g}s")
            time.sleep(0.005)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.thread.is_alive():  # a request that never ends: stop waiting for it
            self.server.force_exit = True
            self.thread.join(timeout)
        self.sock.close()
