#!/usr/bin/env bash
# Re-render the example HAProxy configuration in this folder (three hosts at documentation
# addresses, RFC 5737); a test keeps the file equal to what `sovereignd fleet haproxy` writes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"${SOVEREIGND:-$here/../../.venv/bin/sovereignd}" fleet haproxy \
  --node mac1=192.0.2.11:8000 --node mac2=192.0.2.12:8000 --node mac3=192.0.2.13:8000 \
  --listen 0.0.0.0:8000 --stats-socket /run/haproxy/admin.sock \
  -o "${SOVEREIGND_FLEET_OUTPUT:-$here/haproxy.cfg}"
