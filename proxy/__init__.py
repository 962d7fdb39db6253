"""tlsproxy: the proxy side (listeners, TLS termination, HTTP forwarding, workers)."""
