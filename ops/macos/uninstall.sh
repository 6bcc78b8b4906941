#!/usr/bin/env bash
# Remove the sovereignd LaunchDaemon, idempotently. By default the service goes: the job is
# booted out, its plist, newsyslog entry and pf anchor removed. Software, configuration, the
# account and its data go only when asked. Logs stay unless --remove-logs: they are audit
# records.
#
# Usage: sudo ops/macos/uninstall.sh [options]
#   --dry-run            print every command instead of running it (works on Linux too)
#   --user NAME          role account (default _sovereignd)
#   --label LABEL        launchd label (default org.sovereignd)
#   --prefix DIR         software (default /usr/local/sovereignd)
#   --etc DIR            configuration and baselines (default /usr/local/etc/sovereignd)
#   --logs DIR           logs (default /usr/local/var/log/sovereignd)
#   --home DIR           the account's home and state (default /usr/local/var/sovereignd)
#   --keep-pf            leave the pf anchor in place
#   --remove-software    also remove the venvs under --prefix
#   --remove-config      also remove the configuration, keys and baselines
#   --remove-account     also remove the account, its group and its home (caches, state)
#   --remove-logs        also remove the logs (audit records: keep a copy first)
set -euo pipefail

me=uninstall
# shellcheck source-path=SCRIPTDIR/.. source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
dry_run=0
user=_sovereignd
label=org.sovereignd
prefix=/usr/local/sovereignd
etc=/usr/local/etc/sovereignd
logs=/usr/local/var/log/sovereignd
home=/usr/local/var/sovereignd
keep_pf=0
software=0
config=0
account=0
remove_logs=0
daemons=/Library/LaunchDaemons
pf_conf=/etc/pf.conf
pf_anchors=/etc/pf.anchors

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --user) user="$2"; shift 2 ;;
    --label) label="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --etc) etc="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --home) home="$2"; shift 2 ;;
    --keep-pf) keep_pf=1; shift ;;
    --remove-software) software=1; shift ;;
    --remove-config) config=1; shift ;;
    --remove-account) account=1; shift ;;
    --remove-logs) remove_logs=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "uninstall.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
need_root "run as root (sudo), or pass --dry-run"
loaded() { launchctl print "system/$1" >/dev/null 2>&1; }

# bootout sends SIGTERM and waits up to the plist's ExitTimeOut: the daemon drains and stops
# the model server itself.
if loaded "$label" || [ "$dry_run" = 1 ]; then
  run launchctl bootout "system/$label"
fi
run rm -f "$daemons/$label.plist" /etc/newsyslog.d/sovereignd.conf

if [ "$keep_pf" = 0 ]; then
  if loaded org.sovereignd.pf || [ "$dry_run" = 1 ]; then
    run launchctl bootout system/org.sovereignd.pf
  fi
  run rm -f "$daemons/org.sovereignd.pf.plist" "$pf_anchors/$label"
  if grep -qF "anchor \"$label\"" "$pf_conf" 2>/dev/null || [ "$dry_run" = 1 ]; then
    # Deletes both lines the installer added: `anchor "L"` and `load anchor "L" from ...`.
    run sed -i.sovereignd-bak -e "/anchor \"$label\"/d" "$pf_conf"
    run pfctl -f "$pf_conf"
  fi
fi
remove_account() {
  if dscl . -read "/Users/$user" >/dev/null 2>&1 || [ "$dry_run" = 1 ]; then
    run dscl . -delete "/Users/$user"
  fi
  if dscl . -read "/Groups/$user" >/dev/null 2>&1 || [ "$dry_run" = 1 ]; then
    run dscl . -delete "/Groups/$user"
  fi
}
remove_what_was_asked remove_account
