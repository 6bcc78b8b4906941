#!/usr/bin/env bash
# Run every test of sovereignd on a fresh machine: set up what they need, then lint, type-check
# and run the whole suite (fast tier, root tier, end-to-end tier with the real vLLM CPU build,
# chaos tier: kill -9 and SIGSTOP of the real server's processes).
# Usage: ops/test.sh [pytest arguments...]     e.g. ops/test.sh -m "not e2e" -x
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# Debian packages the tests need, installed once when we may: a test lints every script in
# ops/ with shellcheck; another renders the audit report's HTML in headless chromium; another
# lints (and, in the root tier, loads) the nftables rules `sovereignd firewall render` writes;
# the fleet tests run haproxy, prometheus and promtool.
missing=()
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=(nftables)
# The fleet tests run a real HAProxy and Prometheus (with promtool) on free loopback ports.
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing ${missing[*]} (Debian packages)" >&2
    # Debian's haproxy and prometheus packages start their services on install (prometheus
    # on the fixed port 9090); the tests start their own. Deny service starts while installing
    # (policy-rc.d, exit 101), unless this machine already has a policy of its own.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      policy=/usr/sbin/policy-rc.d
      printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 0755 "$policy"
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also when the install fails
    fi
    apt-get update -qq >/dev/null && apt-get install -y -qq "${missing[@]}" >/dev/null
    if [ -n "$policy" ]; then rm -f "$policy"; trap - EXIT; fi
  else
    echo "test: ${missing[*]} missing; install (apt-get install ${missing[*]})" >&2
  fi
fi

ops/demo/setup.sh --only daemon
ops/demo/setup.sh --only model
ops/demo/setup.sh --only mlx

venv="$repo/.venv"
echo "test: ruff" >&2
"$venv/bin/ruff" check daemon tests ops
echo "test: mypy (strict)" >&2
"$venv/bin/mypy"
echo "test: pytest" >&2
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
