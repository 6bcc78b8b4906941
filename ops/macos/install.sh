#!/usr/bin/env bash
# Install sovereignd as a macOS LaunchDaemon, idempotently: a hidden role account, folders
# with owners and modes, the daemon's venv, the model server's venv (vLLM + vllm-metal, every
# file pinned by its SHA-256: ops/locks/vllm-metal-macos.txt from PyPI and
# ops/locks/vllm-metal-macos-github.txt for what only GitHub serves, checked by pip before it
# installs anything), the configuration, the frozen baselines, the plist (loaded with launchctl
# bootstrap), the newsyslog entry, and a pf anchor that lets the account reach loopback only.
#
# Usage: sudo ops/macos/install.sh --model DIR [options]
#   --dry-run                print every command instead of running it (works on Linux too)
#   --model DIR              the model directory (read-only for the service account)
#   --server-python PY       Python 3.12 for the vllm-metal venv (default python3.12; its wheels
#                            are cp312)
#   --server-venv DIR        use this server venv (built and reviewed elsewhere) instead
#   --server-requirements FILE  build the server venv from this hash lock instead of vllm-metal's
#                            (e.g. ops/locks/vllm-mlx-macos.txt for vllm-mlx)
#   --github-pins FILE       the SHA-256 pins of vllm-metal's GitHub artifacts (default
#                            ops/locks/vllm-metal-macos-github.txt; same columns)
#   --allow-unhashed         accept requirements without --hash, and GitHub pins without a
#                            SHA-256 (pip installs whatever the server sends)
#   --skip-venvs             build no venv (--server-venv still applies)
#   --user NAME              role account (default _sovereignd)
#   --uid N                  its uid/gid (default: the highest free id from 499 down to 400)
#   --prefix DIR             software (default /usr/local/sovereignd)
#   --etc DIR                configuration, keys, baselines (default /usr/local/etc/sovereignd)
#   --logs DIR               logs (default /usr/local/var/log/sovereignd)
#   --home DIR               the account's home: caches, state (default /usr/local/var/sovereignd)
#   --label LABEL            launchd label (default org.sovereignd)
#   --python PY              Python >= 3.11 for the daemon's venv (default python3)
#   --no-baseline            do not write the frozen baselines (`sovereignd baseline`)
#   --no-load                install the plist without loading it
#   --no-pf                  do not install or load the pf anchor
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The vllm-metal server venv replaces running vllm-metal's install.sh (commit
# 211a1e4bc976cd6c0c961cad8da59d649ea9bd65), which pins nothing by hash: it sources
# scripts/lib.sh from main, may pipe uv's installer into sh (lib.sh ensure_uv), makes the venv
# with `uv venv --python 3.12 --seed` (lib.sh ensure_venv), installs VLLM_WHEEL_URL (vLLM
# 0.27.1's macOS arm64 wheel from GitHub) letting it pull torch and the rest from PyPI
# (install_vllm), then the wheel of the "latest" vllm-metal release from the GitHub API
# (fetch_latest_release, download_and_install_wheel), whose own dependencies (pyproject.toml,
# including mlx-lm at a git commit) uv resolves as it likes. Here the same set is installed
# from locks: the PyPI part by pip's hash-checking mode, then the GitHub part by the SHA-256s
# of vllm-metal-macos-github.txt (see its comments for where each comes from).
metal_lock="$repo/ops/locks/vllm-metal-macos.txt"
metal_github="$repo/ops/locks/vllm-metal-macos-github.txt"
metal_commit=211a1e4bc976  # vllm-metal's commit the locks follow: names the venv's folder
server_python=python3.12
dry_run=0
user=_sovereignd
uid=""
prefix=/usr/local/sovereignd
etc=/usr/local/etc/sovereignd
logs=/usr/local/var/log/sovereignd
home=/usr/local/var/sovereignd
label=org.sovereignd
python=python3
model=""
server_venv=""
server_requirements=""
allow_unhashed=0
skip_venvs=0
baseline=1
load=1
pf=1
daemons=/Library/LaunchDaemons
newsyslog_dir=/etc/newsyslog.d
pf_conf=/etc/pf.conf
pf_anchors=/etc/pf.anchors

me=install
# shellcheck source-path=SCRIPTDIR/.. source=lib.sh
. "$repo/ops/lib.sh"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --model) model="$2"; shift 2 ;;
    --server-python) server_python="$2"; shift 2 ;;
    --github-pins) metal_github="$2"; shift 2 ;;
    --server-venv) server_venv="$2"; shift 2 ;;
    --server-requirements) server_requirements="$2"; shift 2 ;;
    --allow-unhashed) allow_unhashed=1; shift ;;
    --skip-venvs) skip_venvs=1; shift ;;
    --user) user="$2"; shift 2 ;;
    --uid) uid="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --etc) etc="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --home) home="$2"; shift 2 ;;
    --label) label="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --no-baseline) baseline=0; shift ;;
    --no-load) load=0; shift ;;
    --no-pf) pf=0; shift ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

[ -n "$model" ] || die "--model DIR is required (the model directory the server loads)"
need_root "run as root (sudo): it creates an account and root-owned folders; or pass --dry-run"
if [ "$dry_run" = 0 ] && [ "$(uname -s)" != Darwin ]; then
  die "this installs a macOS LaunchDaemon; on Linux use ops/linux/install.sh"
fi
if [ "$skip_venvs" = 0 ] && [ -z "$server_venv" ] && [ -z "$server_requirements" ] &&
   [ "$allow_unhashed" = 0 ] && grep -qE '^[a-z][a-z0-9-]*[[:space:]]+-[[:space:]]' "$metal_github"; then
  die "refusing to install vllm-metal's GitHub artifacts unchecked: $metal_github pins no" \
      "SHA-256 for $(awk '/^[a-z]/ && $2 == "-" {printf "%s ", $1}' "$metal_github")(download," \
      "review, write \`shasum -a 256\` of each there), or pass --server-venv DIR," \
      "--server-requirements FILE, or --allow-unhashed"
fi

# pick_uid: role accounts live below 500 (hidden from the login window, no /Users folder);
# the highest id free as both a uid and a gid, so the group can share the number.
pick_uid() {
  if ! command -v dscl >/dev/null 2>&1; then
    echo 499  # a dry run off macOS: nothing to look up
    return
  fi
  local used id
  used="$( (dscl . -list /Users UniqueID; dscl . -list /Groups PrimaryGroupID) | awk '{print $2}')"
  for id in $(seq 499 -1 400); do
    if ! grep -qx "$id" <<<"$used"; then
      echo "$id"
      return
    fi
  done
  die "no id between 400 and 499 is free; pass --uid"
}

# install_github_pins VENV FILE: each line of FILE (name, SHA-256, https URL or git+URL@commit)
# becomes `name @ URL --hash=sha256:HEX` in a requirements file pip installs with
# --require-hashes --no-deps, so pip checks every fetched byte before installing it. A git pin
# is cloned and turned into `git archive --format=tar` of the commit (the bytes its SHA-256 is
# of) and built without build isolation, with the setuptools the lock already installed. Lines
# without a SHA-256 ("-") install unchecked in a second pip run, only under --allow-unhashed.
install_github_pins() {
  local pip=("$1/bin/pip" install --quiet --disable-pip-version-check --no-deps
             --no-build-isolation)
  local work name sha src url commit
  work="$(mktemp -d -t sovereignd-pins.XXXXXX)"
  : > "$work/hashed.txt"
  : > "$work/unhashed.txt"
  while read -r name sha src; do
    case "$name" in ''|'#'*) continue ;; esac
    url="$src"
    if [[ "$src" == git+*@* ]]; then
      commit="${src##*@}"
      url="${src#git+}"
      run git clone --quiet --no-checkout "${url%@*}" "$work/$name"
      run git -C "$work/$name" archive --format=tar --prefix="$name/" \
        --output="$work/$name.tar" "$commit"
      url="file://$work/$name.tar"
    fi
    if [[ "$sha" =~ ^[0-9a-f]{64}$ ]]; then
      printf '%s @ %s --hash=sha256:%s\n' "$name" "$url" "$sha" >> "$work/hashed.txt"
    elif [ "$allow_unhashed" = 1 ]; then
      printf '%s @ %s\n' "$name" "$url" >> "$work/unhashed.txt"
    else
      die "$2: no SHA-256 for $name ($sha); pin it, or pass --allow-unhashed"
    fi
  done < "$2"
  if [ "$dry_run" = 1 ]; then
    sed 's/^/+ # /' "$work/hashed.txt" "$work/unhashed.txt"
  fi
  if [ -s "$work/hashed.txt" ]; then
    run "${pip[@]}" --require-hashes -r "$work/hashed.txt"
  fi
  if [ -s "$work/unhashed.txt" ]; then
    run "${pip[@]}" -r "$work/unhashed.txt"
  fi
  rm -rf "$work"
}

sovereignd="$prefix/venv/bin/sovereignd"
cfg="$etc/sovereignd.yaml"
plist="$daemons/$label.plist"

# --- the role account: hidden, no login shell, a real home -----------------------------------
# Metal wants an account with a proper home and user context, and vLLM, torch and mlx keep
# caches under ~/.cache: /usr/local/var/sovereignd, not /var/empty.
if dscl . -read "/Users/$user" >/dev/null 2>&1; then
  note "account $user exists"
else
  uid="${uid:-$(pick_uid)}"
  run dscl . -create "/Groups/$user"
  run dscl . -create "/Groups/$user" PrimaryGroupID "$uid"
  run dscl . -create "/Groups/$user" RealName "sovereignd service"
  run dscl . -create "/Groups/$user" Password '*'
  run dscl . -create "/Users/$user"
  run dscl . -create "/Users/$user" UniqueID "$uid"
  run dscl . -create "/Users/$user" PrimaryGroupID "$uid"
  run dscl . -create "/Users/$user" UserShell /usr/bin/false
  run dscl . -create "/Users/$user" NFSHomeDirectory "$home"
  run dscl . -create "/Users/$user" RealName "sovereignd service"
  run dscl . -create "/Users/$user" Password '*'
  run dscl . -create "/Users/$user" IsHidden 1
  run dscl . -append "/Users/$user" RecordName "${user#_}"
fi

# --- folders: what decides what is served is root's; logs and state are the account's ------
make_folders wheel
warn_unless_model_readable sudo -u "$user"

# --- venvs: root-owned, so the account cannot change the code it runs -----------------------
install_daemon_venv "$prefix/venv"
if [ -n "$server_venv" ]; then
  target="$server_venv"
elif [ -n "$server_requirements" ]; then
  target="$prefix/server-venvs/$(basename "$server_requirements" .txt)"
  if [ "$skip_venvs" = 0 ] && [ ! -f "$target/.sovereignd-complete" ]; then
    run install -d -o root -g wheel -m 0755 "$prefix/server-venvs"
    run "$python" -m venv "$target"
    pip_install_lock "$target" "$server_requirements"
    run touch "$target/.sovereignd-complete"
  fi
else
  target="$prefix/server-venvs/vllm-metal-$metal_commit"
  if [ "$skip_venvs" = 0 ] && [ ! -f "$target/.sovereignd-complete" ]; then
    run install -d -o root -g wheel -m 0755 "$prefix/server-venvs"
    run "$server_python" -m venv "$target"
    pip_install_lock "$target" "$metal_lock"
    install_github_pins "$target" "$metal_github"
    run chown -R root:wheel "$target"
    run chmod -R go-w "$target"
    run touch "$target/.sovereignd-complete"
  fi
fi
# The configuration names the symlink; `sovereignd upgrade` switches it atomically.
run ln -sfn "$target" "$prefix/server-venv"

# --- configuration: written once, never overwritten ---------------------------------------
write_config "$repo/ops/macos/sovereignd.yaml.in"

# --- baselines: the approved weights and software, root-owned ------------------------------
write_baselines

# --- the LaunchDaemon and the rotation of its stdout/stderr files -----------------------------
spec=(--config "$cfg" --program "$sovereignd" --user "$user" --group "$user" --home "$home")
run "$sovereignd" launchd render "${spec[@]}" --label "$label" --output "$plist"
run chown root:wheel "$plist"
run chmod 0644 "$plist"
run plutil -lint "$plist"
run "$sovereignd" launchd newsyslog "${spec[@]}" --output "$newsyslog_dir/sovereignd.conf"
run chown root:wheel "$newsyslog_dir/sovereignd.conf"
run chmod 0644 "$newsyslog_dir/sovereignd.conf"

# --- egress: the account may reach loopback only -------------------------------------------
if [ "$pf" = 1 ]; then
  anchor="$pf_anchors/$label"
  # Rendered from the configuration: the server's TCP port (server.port) where it has one.
  run "$sovereignd" firewall render --config "$cfg" --format pf --user "$user" \
    --output "$anchor"
  run chown root:wheel "$anchor"
  run chmod 0644 "$anchor"
  if grep -qF "anchor \"$label\"" "$pf_conf" 2>/dev/null; then
    note "$pf_conf already loads the $label anchor"
  elif [ "$dry_run" = 1 ]; then
    printf '+ printf %q >> %q\n' "anchor \"$label\"\nload anchor \"$label\" from \"$anchor\"\n" \
      "$pf_conf"
  else
    printf 'anchor "%s"\nload anchor "%s" from "%s"\n' "$label" "$label" "$anchor" >> "$pf_conf"
  fi
  run pfctl -f "$pf_conf"
  # macOS leaves pf disabled at boot: a small job takes a pf reference (-E) at each boot.
  run install -o root -g wheel -m 0644 "$repo/ops/macos/org.sovereignd.pf.plist" \
    "$daemons/org.sovereignd.pf.plist"
  if [ "$load" = 1 ]; then
    if launchctl print system/org.sovereignd.pf >/dev/null 2>&1; then
      run launchctl bootout system/org.sovereignd.pf
    fi
    run launchctl bootstrap system "$daemons/org.sovereignd.pf.plist"
  fi
fi

# --- load: replace a running job with the new definition ------------------------------------
if [ "$load" = 1 ]; then
  if launchctl print "system/$label" >/dev/null 2>&1; then
    run launchctl bootout "system/$label"
  fi
  run launchctl enable "system/$label"
  run launchctl bootstrap system "$plist"
fi

cat >&2 <<TEXT
install: done. Check:
  sudo launchctl print system/$label | grep -E 'state|last exit'
  $sovereignd check --config $cfg
  curl -s http://127.0.0.1:8000/readyz
  sudo pfctl -a $label -s rules
  sudo -u $user curl -m 5 https://example.org     # must fail: no route out
TEXT
