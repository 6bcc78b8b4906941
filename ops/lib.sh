# Shared by the install and uninstall scripts of ops/linux and ops/macos: sourced, not run.
#
# The functions read the sourcing script's settings: dry_run (0 or 1) and me ("install" or
# "uninstall", the prefix of its messages) always; the others where a function says so.
# shellcheck shell=bash
# shellcheck disable=SC2154  # the settings are assigned by the sourcing script

# run CMD...: run it, or in a dry run print it (shell-quoted) and do nothing.
run() {
  if [ "$dry_run" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
note() { echo "$me: $*" >&2; }
die() { echo "$me.sh: $*" >&2; exit 1; }

# need_root WHY: stop unless root, or a dry run (which changes nothing).
need_root() {
  if [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "$1"
  fi
}

# --- install ------------------------------------------------------------------------------

# make_folders ROOT_GROUP: what decides what is served (software, configuration, baselines) is
# root's; logs and state are the account's. Reads user, prefix, etc, logs, home.
make_folders() {
  run install -d -o root -g "$1" -m 0755 "$prefix"
  run install -d -o root -g "$user" -m 0750 "$etc"
  run install -d -o root -g "$user" -m 0750 "$etc/baseline"
  run install -d -o "$user" -g "$user" -m 0750 "$logs"
  run install -d -o "$user" -g "$user" -m 0750 "$home"
  run install -d -o "$user" -g "$user" -m 0750 "$home/state"
}

# warn_unless_model_readable AS_USER...: the model must be readable by the account (and should
# not be writable by it); AS_USER is the platform's way to run a command as the account.
# Reads user, model.
warn_unless_model_readable() {
  if [ "$dry_run" = 0 ] && ! "$@" test -r "$model/config.json"; then
    note "warning: $user cannot read $model/config.json; make the model readable by it" \
      "(e.g. chgrp -R $user $model && chmod -R g+rX,g-w $model)"
  fi
}

# pip_install_lock VENV LOCK: install exactly the packages of a lock, each file checked against
# its --hash (pip's hash-checking mode; --no-deps, as pip-sync: a lock lists every package).
# A file without hashes is refused unless allow_unhashed=1 (the operator insists): then pip
# installs whatever the index serves for each pin. Reads allow_unhashed.
pip_install_lock() {
  local pip=("$1/bin/pip" install --quiet --disable-pip-version-check)
  if [ "$allow_unhashed" = 1 ]; then
    run "${pip[@]}" -r "$2"
  elif ! grep -q -- '--hash=' "$2"; then
    die "$2 pins no package by --hash: install from a lock (ops/locks/, written by" \
        "uv pip compile --generate-hashes), or pass --allow-unhashed to accept it as it is"
  else
    run "${pip[@]}" --require-hashes --no-deps -r "$2"
  fi
}

# install_daemon_venv VENV: sovereignd from this checkout in a root-owned venv, so the account
# cannot change the code it runs; its dependencies (and the setuptools that builds it) from the
# hash lock; skipped when built already. Reads skip_venvs, python, repo, allow_unhashed.
install_daemon_venv() {
  if [ "$skip_venvs" = 0 ] && [ ! -x "$1/bin/sovereignd" ]; then
    run "$python" -m venv "$1"
    pip_install_lock "$1" "$repo/ops/locks/daemon.txt"
    run "$1/bin/pip" install --quiet --disable-pip-version-check --no-deps \
      --no-build-isolation "$repo"
  fi
}

# write_config TEMPLATE: the configuration from the platform's template, written once and never
# overwritten. Reads cfg, user, prefix, etc, logs, home, model.
write_config() {
  if [ -f "$cfg" ]; then
    note "configuration $cfg exists; left as it is"
    return
  fi
  local tmp
  tmp="$(mktemp -t sovereignd-yaml.XXXXXX)"
  sed -e "s|@USER@|$user|g" -e "s|@GROUP@|$user|g" -e "s|@PREFIX@|$prefix|g" \
      -e "s|@ETC@|$etc|g" -e "s|@LOGS@|$logs|g" -e "s|@HOME@|$home|g" \
      -e "s|@MODEL@|$model|g" "$1" > "$tmp"
  if [ "$dry_run" = 1 ]; then
    sed 's/^/#   /' "$tmp"  # what would be written
  fi
  run install -o root -g "$user" -m 0640 "$tmp" "$cfg"
  rm -f "$tmp"
}

# write_baselines: the approved weights and software as they are now, root-owned, unless
# --no-baseline. Reads baseline, sovereignd, cfg, etc, user.
write_baselines() {
  if [ "$baseline" = 1 ]; then
    run "$sovereignd" baseline --config "$cfg"
    run chown -R "root:$user" "$etc/baseline"
    run chmod -R u=rwX,g=rX,o= "$etc/baseline"
  fi
}

# --- uninstall ----------------------------------------------------------------------------

# remove_what_was_asked REMOVE_ACCOUNT: software, configuration, the account (by the
# platform's command REMOVE_ACCOUNT) and its home, and logs, each only when asked. Logs are
# audit records: kept unless --remove-logs. Reads software, config, account, remove_logs,
# prefix, etc, home, logs.
remove_what_was_asked() {
  if [ "$software" = 1 ]; then
    run rm -rf "$prefix"
  fi
  if [ "$config" = 1 ]; then
    run rm -rf "$etc"
  fi
  if [ "$account" = 1 ]; then
    "$1"
    run rm -rf "$home"
  fi
  if [ "$remove_logs" = 1 ]; then
    note "removing $logs: the request and event records go with it"
    run rm -rf "$logs"
  else
    note "logs kept in $logs (audit records; --remove-logs removes them)"
  fi
}
