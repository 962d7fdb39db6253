"""tlsproxy certificates: storage, local CA, ACME, selection by name. Never imports proxy/."""
