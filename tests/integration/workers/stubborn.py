"""A worker that ignores SIGTERM (the supervisor must SIGKILL it after stop_timeout)."""

import signal
import socket
import sys
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("stubborn: listening, ignoring SIGTERM", flush=True)
while True:
    time.sleep(1)
