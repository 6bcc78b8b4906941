"""Request-record controls: the chain, every answered request recorded, activity."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sovereignd.audit.evidence import UNAUTHENTICATED
from sovereignd.audit.inputs import Inputs
from sovereignd.audit.model import (
    FAIL,
    INFO,
    PASS,
    SECTIONS,
    WARN,
    Control,
    display_value,
    short_ts,
)
from sovereignd.logs import verify


def chain_control(i: Inputs, result: verify.VerifyResult) -> Control:
    c = Control("request_chain", SECTIONS[5], "Request records complete and unaltered", PASS,
                "")
    c.fact("result", "Verification", "OK" if result.ok else "BROKEN")
    c.fact("seals_checked", "Seals checked with the auditor's key", result.seals_checked)
    c.fact("files", "Files", result.files)
    c.fact("records", "Records (requests)", result.records,
           f"{result.records:,} ({result.requests:,} requests)")
    c.fact("seq_range", "Sequence numbers", [result.first_seq, result.last_seq],
           f"{result.first_seq}..{result.last_seq}" if result.records else "none")
    c.fact("time_range", "Time range", [result.first_ts, result.last_ts],
           f"{short_ts(result.first_ts or '')} .. {short_ts(result.last_ts or '')}"
           if result.records else "none")
    c.fact("key_ids", "Sealing key id(s)", result.key_ids)
    c.fact("epoch_changes", "Key evolutions", result.epoch_changes)
    c.fact("checkpoints_checked", "Event-log checkpoints matched", result.checkpoints_checked)
    c.fact("writer_starts", "Writer starts (unclean)", [result.restarts,
                                                        len(result.unclean_restarts)],
           f"{result.restarts} ({len(result.unclean_restarts)} unclean)")
    c.fact("removed_files", "Files removed by retention (ledger)", result.removed_files)
    c.fact("closed", "Ends with a clean close", result.closed)
    if result.notes:
        c.fact("notes", "Notes", result.notes)
    if result.broken is not None:
        b = result.broken
        c.fact("break", "First break", b.to_json(), str(b))
        c.verdict = FAIL
        where = f"{b.file}, seq {b.seq}" if b.seq is not None else b.file
        c.finding = f"BROKEN — {b.kind} at {where}: {b.message}"
    elif not result.seals_checked:
        c.verdict = WARN
        c.finding = (f"the hash chain of {result.records:,} records in {result.files} file(s) "
                     "is intact, but the seals were NOT checked (no --key-file with the "
                     "auditor's verification key): whoever can write the files could have "
                     "rebuilt the chain")
    else:
        c.finding = (f"{result.records:,} records in {result.files} file(s), seq "
                     f"{result.first_seq}..{result.last_seq}: chain and seals verified with "
                     "the auditor's key")
    return c


# What each requests.sync setting means for a power loss (or a kernel crash).
SYNC_MEANING = {
    "always": "every record is on disk before its answer ends: a power loss loses no record "
              "of an answered request",
    "interval": "records reach the disk every {ms} ms: a power loss can lose the records of "
                "answers given in the last {ms} ms (a daemon crash loses none)",
    "never": "the operating system decides when records reach the disk (Linux: within ~30 s): "
             "a power loss can lose the records of answers given in that time (a daemon crash "
             "loses none)",
}


def records_control(i: Inputs, result: verify.VerifyResult) -> Control:
    """Every accepted request accounted for; FAIL if an answered request could lack a record."""
    c = Control("request_records", SECTIONS[5], "Every answered request has a record", PASS, "")
    period = i.period
    # The runs in force during the period: those that started in it and the one before it.
    runs = [r for r in result.runs if isinstance(r.get("ts"), str) and r["ts"] < period.hi]
    in_period = [r for r in runs if period.lo is None or r["ts"] >= period.lo]
    before = [r for r in runs if r not in in_period][-1:]
    settings: dict[str, str] = {}
    for r in before + in_period:
        sync = r.get("sync")
        if isinstance(sync, str):
            key = sync if sync != "interval" else f"interval {r.get('sync_interval_ms')} ms"
            settings[key] = SYNC_MEANING[sync].format(ms=r.get("sync_interval_ms"))
    configured = i.cfg.requests.sync
    c.fact("sync", "requests.sync in force (per daemon start)", list(settings) or None,
           "; ".join(f"{k}: {v}" for k, v in settings.items()) or "not recorded (older logs)")
    c.fact("sync_configured", "requests.sync configured now", configured,
           f"{configured}: " + SYNC_MEANING[configured].format(
               ms=round(i.cfg.requests.sync_interval * 1000, 3)))
    c.fact("started", "Requests started (accepted for the server)", result.starts)
    c.fact("completed", "Completed (record of the answer)", result.completed)
    causes = Counter(str(x.get("reason")) for x in result.incomplete)
    c.fact("incomplete", "Incomplete (no end recorded)", len(result.incomplete),
           f"{len(result.incomplete)}" + (f" ({', '.join(f'{n} {k}' for k, n in causes.items())})"
                                         if causes else ""))
    c.fact("open", "Still open", result.open_starts)
    t = c.table("incomplete_requests", "Incomplete requests",
                ["seq", "started at seq", "client", "model", "cause", "stopped after"])
    for x in result.incomplete[:100]:
        t.rows.append([x.get("seq"), x.get("start_seq"), x.get("client"), x.get("model"),
                       x.get("reason"), short_ts(str(x.get("stopped_after") or ""))])
    e = c.table("exposures", "Stops after which records may be missing",
                ["before seq", "cause", "what it means"])
    e.rows.extend([x["seq"], x["cause"], x["message"]] for x in result.exposures)
    c.fact("exposures", "Stops after which answered requests may lack a record",
           len(result.exposures))
    if result.broken is not None:
        c.verdict = FAIL
        c.finding = ("the request log is broken (see the chain control): completeness cannot "
                     "be established")
    elif result.exposures:
        c.verdict = FAIL
        c.finding = (f"{len(result.exposures)} stop(s) after which an answered request could "
                     f"be missing its record: {result.exposures[0]['message']}")
    else:
        c.finding = (f"{result.starts:,} request(s) started: {result.completed:,} completed, "
                     f"{len(result.incomplete):,} incomplete"
                     + (f" ({', '.join(f'{n} {k}' for k, n in causes.items())})"
                        if causes else "")
                     + f", {result.open_starts:,} open; no stop could have lost the record of "
                       "an answered request")
        if result.open_starts and not result.closed:
            c.finding += (" (open ones are in flight, or the daemon stopped and has not "
                          "started since: its next start closes them as incomplete)")
    return c


def activity_control(i: Inputs, stats: dict[str, Any]) -> Control:
    total = stats["total"]
    c = Control("request_activity", SECTIONS[5], "Requests in the period", INFO, "")
    n = total["requests"]
    c.fact("requests", "Requests", n)
    clients = len([k for k in stats["by_client"] if k != UNAUTHENTICATED])
    c.fact("clients", "Clients", clients)
    c.fact("prompt_tokens", "Prompt tokens", total["prompt_tokens"])
    c.fact("completion_tokens", "Completion tokens", total["completion_tokens"])
    c.fact("errors", "Errors (status ≥ 400)", total["errors"],
           f"{total['errors']:,} ({total['error_rate']:.1%})")
    c.fact("latency_ms_p50", "Latency p50 (ms)", total["latency_ms_p50"])
    c.fact("latency_ms_p99", "Latency p99 (ms)", total["latency_ms_p99"])
    auth = i.history.in_period(i.period, "auth_failed")
    # auth_failed events are summarised: each carries the count it stands for.
    c.fact("auth_failures", "Failed authentications (event log)",
           sum(int(e.get("count", 1)) for e in auth))
    columns = ["requests", "errors", "error rate", "prompt tokens", "completion tokens",
               "p50 ms", "p99 ms"]

    def rows(key: str, title: str, label: str, data: dict[str, dict[str, Any]]) -> None:
        t = c.table(key, title, [label, *columns])
        for name, v in data.items():
            t.rows.append([name, v["requests"], v["errors"], f"{v['error_rate']:.1%}",
                           v["prompt_tokens"], v["completion_tokens"], v["latency_ms_p50"],
                           v["latency_ms_p99"]])

    rows("by_client", "By client", "client", stats["by_client"])
    rows("by_model", "By model", "model", stats["by_model"])
    rows("by_day", "By day (UTC)", "day", stats["by_day"])
    st = c.table("by_status", "By status", ["status", "requests"])
    st.rows.extend([k, v] for k, v in stats["by_status"].items())
    et = c.table("error_classes", "Error classes", ["error", "requests"])
    et.rows.extend([k, v] for k, v in stats["error_classes"].items())
    c.finding = (f"{n:,} requests from {clients} client(s), "
                 f"{total['prompt_tokens']:,} + {total['completion_tokens']:,} tokens, "
                 f"{total['error_rate']:.1%} errors, latency p50 "
                 f"{display_value(total['latency_ms_p50'])} ms / p99 "
                 f"{display_value(total['latency_ms_p99'])} ms")
    unrecordable = i.history.in_period(i.period, "requests_unrecordable")
    if unrecordable:
        c.verdict = WARN
        c.finding += (f"; {len(unrecordable)} time(s) the records could not be written and "
                      "the gateway refused requests")
    return c


