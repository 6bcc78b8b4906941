#!/usr/bin/env bash
# Remove the sovereignd systemd service, idempotently. By default only the service goes (the
# unit, stopped and disabled); software, configuration, the account and its data go only when
# asked. Logs stay unless --remove-logs: they are audit records.
#
# Usage: sudo ops/linux/uninstall.sh [options]
#   --dry-run            print every command instead of running it
#   --user NAME          service account (default sovereignd)
#   --prefix DIR         software (default /opt/sovereignd)
#   --etc DIR            configuration and baselines (default /etc/sovereignd)
#   --logs DIR           logs (default /var/log/sovereignd)
#   --home DIR           the account's home and state (default /var/lib/sovereignd)
#   --unit-dir DIR       (default /etc/systemd/system)
#   --no-systemctl       do not stop, disable or reload through systemctl
#   --remove-software    also remove the venvs under --prefix
#   --remove-config      also remove the configuration, keys and baselines
#   --remove-account     also remove the account and its home (caches, state)
#   --remove-logs        also remove the logs (audit records: keep a copy first)
set -euo pipefail

me=uninstall
# shellcheck source-path=SCRIPTDIR/.. source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
dry_run=0
user=sovereignd
prefix=/opt/sovereignd
etc=/etc/sovereignd
logs=/var/log/sovereignd
home=/var/lib/sovereignd
unit_dir=/etc/systemd/system
systemctl=1
software=0
config=0
account=0
remove_logs=0

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --user) user="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --etc) etc="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --home) home="$2"; shift 2 ;;
    --unit-dir) unit_dir="$2"; shift 2 ;;
    --no-systemctl) systemctl=0; shift ;;
    --remove-software) software=1; shift ;;
    --remove-config) config=1; shift ;;
    --remove-account) account=1; shift ;;
    --remove-logs) remove_logs=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "uninstall.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
need_root "run as root, or pass --dry-run"

unit="$unit_dir/sovereignd.service"
if [ "$systemctl" = 1 ]; then
  # The unit's TimeoutStopSec lets the daemon drain and stop the model server first.
  run systemctl disable --now sovereignd || note "sovereignd was not enabled or running"
fi
if [ -e "$unit" ] || [ "$dry_run" = 1 ]; then
  run rm -f "$unit"
fi
# The firewall rules install.sh loaded (table inet sovereignd) and their boot unit.
fw_unit="$unit_dir/sovereignd-firewall.service"
if [ -e "$fw_unit" ] || [ "$dry_run" = 1 ]; then
  if [ "$systemctl" = 1 ]; then
    run systemctl disable sovereignd-firewall || note "sovereignd-firewall was not enabled"
  fi
  run rm -f "$fw_unit"
fi
if [ "$dry_run" = 1 ] || nft list table inet sovereignd >/dev/null 2>&1; then
  run nft delete table inet sovereignd
fi
if [ "$systemctl" = 1 ]; then
  run systemctl daemon-reload
fi
remove_account() {
  if getent passwd "$user" >/dev/null || [ "$dry_run" = 1 ]; then
    run userdel "$user"
  fi
}
remove_what_was_asked remove_account
