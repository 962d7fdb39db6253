#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (run as root), then runs it all:
#   apt: curl, openssl, pebble + bind9 (real ACME CA and DNS server for the ACME tests),
#        nginx + wrk (the benchmark's smoke test), systemd + util-linux + passwd (the deploy
#        tests: systemd-analyze, systemd-socket-activate, setpriv, useradd), nghttp2-client (nghttp
#        and h2load: HTTP/2 tests and benchmark), redis-server (the redis storage backend's
#        tests), haproxy (the balancer in front of tests/integration/cluster's three
#        instances), prometheus (promtool checks and unit-tests deploy/prometheus's alert rules; its
#        server scrapes a real proxy in tests/integration/metrics); pip: the project with its
#        [test] extra.
# Arguments are passed to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for pair in curl:curl openssl:openssl pebble:pebble named:bind9 dig:bind9-dnsutils \
            nginx:nginx wrk:wrk systemd-analyze:systemd systemd-socket-activate:systemd \
            setpriv:util-linux useradd:passwd \
            nghttp:nghttp2-client h2load:nghttp2-client redis-server:redis-server \
            haproxy:haproxy promtool:prometheus prometheus:prometheus; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing with apt-get: ${missing[*]}"
    apt-get update -qq
    # policy-rc.d keeps Debian from starting its own named/nginx services on install; the tests
    # start their own copies on free loopback ports.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
