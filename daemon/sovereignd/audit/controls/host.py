"""Controls of the host and the service: host facts, service account, launch."""

from __future__ import annotations

from typing import Any

from sovereignd import __version__
from sovereignd.audit.evidence import account_label, account_of_uid
from sovereignd.audit.inputs import Inputs
from sovereignd.audit.model import FAIL, INFO, PASS, SECTIONS, WARN, Control
from sovereignd.units import human_size


def host_control(i: Inputs, host: dict[str, Any]) -> Control:
    c = Control("host", SECTIONS[0], "Host", INFO,
                f"{host['hostname']}: {host['os']}, {host['cpu_model'] or 'CPU model unknown'}, "
                f"{human_size(host['memory_bytes']) if host['memory_bytes'] else '?'} memory")
    c.fact("hostname", "Hostname", host["hostname"])
    c.fact("os", "Operating system", host["os"])
    c.fact("kernel", "Kernel", host["kernel"])
    c.fact("cpu_model", "Chip / CPU", host["cpu_model"])
    c.fact("cpu_count", "CPU cores", host["cpu_count"])
    c.fact("memory_bytes", "Memory", host["memory_bytes"],
           human_size(host["memory_bytes"]) if host["memory_bytes"] else None)
    c.fact("machine", "Architecture", host["machine"])
    c.fact("python", "Python (of this command)", host["python"])
    c.fact("sovereignd_version", "sovereignd version (of this command)", __version__)
    ran = sorted({str(e.get("version")) for e in i.history.in_period(i.period, "daemon_start")})
    c.fact("daemon_versions", "sovereignd versions that ran in the period", ran)
    if ran and ran != [__version__]:
        c.finding += f"; the daemon ran as version(s) {', '.join(ran)} in the period"
    return c


def account_control(i: Inputs) -> Control:
    c = Control("service_account", SECTIONS[0], "Service account", PASS, "")
    expected = i.cfg.daemon.user
    c.fact("configured_user", "daemon.user", expected,
           None if expected else "not set (the account is not checked at start)")
    ran = [account_of_uid(u) for u in i.uids]
    c.fact("daemon_uids", "The daemon ran as (daemon_start events)", [a.uid for a in ran],
           ", ".join(account_label(a) for a in ran) or "no daemon start recorded")
    if not ran:
        c.verdict = WARN
        c.finding = "no daemon start is recorded in the period or before it: the account it " \
                    "ran as cannot be told"
    elif any(a.uid == 0 for a in ran):
        c.verdict = FAIL
        c.finding = ("the daemon ran as root (uid 0); a production daemon runs as its own "
                     "unprivileged account (set daemon.user and start it as that account)")
    elif expected is not None and any(a.name != expected for a in ran):
        c.verdict = FAIL
        c.finding = (f"the daemon ran as {', '.join(account_label(a) for a in ran)}, not as the "
                     f"configured account {expected}")
    elif expected is None:
        c.verdict = WARN
        c.finding = (f"ran as {', '.join(account_label(a) for a in ran)}; daemon.user is not "
                     "set, so the account is not checked at start")
    else:
        c.finding = f"ran as {expected}, the configured service account"
    return c


def launch_control(i: Inputs) -> Control:
    launch = i.launch
    c = Control("launch", SECTIONS[0], "How it is launched", WARN, launch.detail)
    c.fact("manager", "Service manager", launch.manager)
    c.fact("definition", "Definition", str(launch.definition) if launch.definition else None)
    c.fact("loaded", "Loaded / active", launch.loaded,
           {True: "yes", False: "no", None: "cannot be asked here"}[launch.loaded])
    c.fact("state", "State", launch.state)
    c.fact("definition_user", "Account in the definition", launch.user)
    if launch.manager == "unknown":
        c.finding = launch.detail
        return c
    what = f"{launch.manager} ({launch.definition})"
    if launch.loaded:
        c.verdict = PASS
        c.finding = f"started by {what}, {launch.state}"
    elif launch.loaded is False:
        c.finding = f"{what} is installed but not active ({launch.state})"
    else:
        c.finding = f"{what} is installed; {launch.detail}"
    expected = i.cfg.daemon.user
    if launch.user is not None and expected is not None and launch.user != expected:
        c.verdict = FAIL
        c.finding += f"; the definition runs it as {launch.user}, not {expected}"
    elif launch.user is None and c.verdict == PASS:
        c.verdict = WARN
        c.finding += "; the definition names no account, so it runs as root"
    return c


