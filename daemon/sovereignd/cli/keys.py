"""`keys add|set|list|revoke`: the gateway's client keys, their models and quotas."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from sovereignd import config as config_mod
from sovereignd.cli.common import EX_OK, config_arg, load_config
from sovereignd.gateway import keys as keys_mod
from sovereignd.gateway import keyscope
from sovereignd.gateway.quotas import Quota


def _usage_path(cfg: config_mod.Config) -> Path:
    return cfg.state_dir / keys_mod.USAGE_FILE_NAME


def _cmd_keys_add(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    role = "admin" if args.admin else "client"
    limits = {k: v for k, v in keyscope.limits_of(args).items() if v is not None}
    key, entry = keys_mod.add_key(cfg.gateway.keys_file, args.name, role, models=args.models,
                                  quota=Quota(**limits))
    # The key goes to stdout alone, so `sovereignd keys add x > file` captures just the key.
    print(key)
    print(f"sovereignd: key {entry.name!r} ({entry.role}, fingerprint {entry.fingerprint}) "
          f"added to {cfg.gateway.keys_file}. The key is shown only this once: give it to its "
          "user now; only its hash is stored.", file=sys.stderr)
    return EX_OK


def _cmd_keys_list(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    rows = keys_mod.list_keys(cfg.gateway.keys_file, _usage_path(cfg))
    fingerprint = keys_mod.set_fingerprint(keys_mod.read_keys(cfg.gateway.keys_file))
    if args.fingerprint:
        print(fingerprint)
        return EX_OK
    used = keyscope.used_from_records(cfg.logs.dir, [r.name for r in rows if r.state == "active"])
    if args.json:
        sys.stdout.write(orjson.dumps([{**r.to_json(), "used": used.get(r.name)} for r in rows],
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return EX_OK
    if not rows:
        print(f"no keys in {cfg.gateway.keys_file} (add one with `sovereignd keys add NAME`)")
        return EX_OK
    table = [("NAME", "ROLE", "STATE", "FINGERPRINT", "CREATED", "LAST USED", "REVOKED",
              "MODELS", "QUOTA (USED/LIMIT)")]
    table += [(r.name, r.role, r.state, r.fingerprint, r.created, r.last_used or "-",
               r.revoked or "-", ",".join(r.models) if r.models is not None else "all",
               keyscope.describe_quota(r.quota, used.get(r.name))) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"\nkeys file fingerprint {fingerprint} ({len(rows)} keys; equal on every host that "
          "accepts the same keys; a running daemon shows the set it loaded in /status)")
    return EX_OK


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    entry = keys_mod.revoke_key(cfg.gateway.keys_file, args.name)
    print(f"revoked key {entry.name!r} (fingerprint {entry.fingerprint}) at {entry.revoked}; "
          "a running daemon refuses it within a second")
    return EX_OK


def _cmd_keys_set(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    changes = keyscope.limits_of(args)
    models = keys_mod.UNCHANGED if args.models is None else (
        None if args.models == () else args.models)
    if models is keys_mod.UNCHANGED and not changes:
        raise keys_mod.KeyNameError("nothing to change: give --models, --all-models or a "
                                    "quota option (see `sovereignd keys set --help`)")
    entry = keys_mod.set_key(cfg.gateway.keys_file, args.name, models=models, quota=changes)
    scope = ",".join(entry.models) if entry.models is not None else "all"
    print(f"key {entry.name!r}: models {scope}; quota {entry.quota.describe()}; a running "
          "daemon applies this within a second")
    return EX_OK


def add_keys(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keys", help="add, list, change and revoke client keys")
    ksub = p.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    a = ksub.add_parser("add", help="make a new key and print it once")
    a.add_argument("name", help="who the key is for (letters, digits, . _ @ -)")
    a.add_argument("--admin", action="store_true",
                   help="an admin key, which may also read /status and /metrics remotely")
    keyscope.add_scope_options(a, setting=False)
    config_arg(a)
    a.set_defaults(handler=_cmd_keys_add)
    st = ksub.add_parser("set", help="change a key's models and quotas (live)")
    st.add_argument("name")
    keyscope.add_scope_options(st, setting=True)
    config_arg(st)
    st.set_defaults(handler=_cmd_keys_set)
    lst = ksub.add_parser("list", help="list keys (names, fingerprints, use; never the keys)")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.add_argument("--fingerprint", action="store_true",
                     help="print only the fingerprint of the whole keys file, to compare hosts")
    config_arg(lst)
    lst.set_defaults(handler=_cmd_keys_list)
    r = ksub.add_parser("revoke", help="revoke a key (kept in the file for the audit trail)")
    r.add_argument("name")
    config_arg(r)
    r.set_defaults(handler=_cmd_keys_revoke)
