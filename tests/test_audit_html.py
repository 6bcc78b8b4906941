"""The audit's HTML shows outside text as text: markup, quotes, ampersands and control
characters from model names, paths, clients, events, server messages and host facts."""

from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path

import pytest

from sovereignd.audit import render
from sovereignd.logs.requestlog import RequestLog
from sovereignd.service import hostfacts
from sovereignd.textsafe import escape
from tests.reqlog_support import T0, Clock, Events, request
from tests.test_audit_controls import UNIT, FakeHost, Site


def hostile(label: str, *, nul: bool = True) -> str:
    """Text that breaks a page if written raw: a script, both quotes, an ampersand and an
    entity, a terminal escape, a bell, a right-to-left override (and NUL where it can be)."""
    return (f'<script>alert("{label}")</script> & &amp; "q" \'s\' <b>'
            f"\x1b[2K\x07\u202e{chr(0) if nul else ''} {label}")


# Every element the report may contain; anything else came from the data.
TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "h4", "p", "b",
        "br", "code", "div", "span", "a", "table", "thead", "tbody", "tr", "th", "td", "svg",
        "line", "rect", "text", "footer"}
VOID = {"meta", "br", "line"}


class Page(HTMLParser):
    """The elements, attributes and text runs of a page, as a browser's tokenizer sees them."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self.texts: list[str] = []
        self.cells: list[tuple[str, str]] = []  # (the element holding a text run, the text)
        self._open: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += attrs
        if tag not in VOID:
            self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._open:
            del self._open[len(self._open) - 1 - self._open[::-1].index(tag):]

    def handle_data(self, data: str) -> None:
        self.texts.append(data)
        self.cells.append((self._open[-1] if self._open else "", data))


@pytest.fixture
def hostile_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Site, FakeHost]:
    # Paths: every file of the site sits below a folder named with hostile text.
    site = Site(tmp_path / hostile("path", nul=False))
    log = RequestLog(site.logs, site.logs, clock=Clock(T0 + 5), emit=Events(), compress=False)
    log.open()
    log.record(request(0))
    # A client named like a verdict is a client, not a verdict badge.
    log.record(request(2, client="WARN"))
    log.record(request(1, client=hostile("client"), model=hostile("model"), status=500,
                       error=hostile("error class")))
    log.close()
    site.clean_run()
    site.event(5, "failure", level="error", kind=hostile("failure kind"),
               message=hostile("server message"), exit=hostile("exit"))
    site.event(6, "state", **{"from": "READY", "to": "STARTING",
                              "reason": hostile("restart reason")})
    site.event(6.5, "spawn", pid=201, argv=["vllm", hostile("argv")], start=2,
               env=["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
    site.event(7, "integrity_drift", level="error", policy="quarantine",
               files=[{"path": hostile("drifted file"), "status": "CHANGED"}])
    site.event(7.1, "state", **{"from": "STARTING", "to": "QUARANTINED",
                                "reason": hostile("quarantine reason")})
    site.event(8, "baseline_accepted", reason=hostile("baseline reason"),
               manifest_sha256=hostile("digest"))
    site.event(8.5, "state", **{"from": "QUARANTINED", "to": "FATAL",
                                "reason": hostile("fatal reason")})
    site.event(9, "operator", action=hostile("operator action"),
               reason=hostile("operator reason"))
    site.event(9.5, "state", **{"from": "FATAL", "to": "STARTING",
                                "reason": "restarting: operator " + hostile("restart")})
    site.event(10, "integrity_verified", scope="full", files=2, bytes=4136, seconds=0.01)
    site.stop(30)
    site.overrides = {"server": {"served_model_name": hostile("served name", nul=False),
                                 "env": {"EXTRA": hostile("env value", nul=False)}}}
    # Host facts: the hostname, the OS release, the CPU model and the unit's account.
    monkeypatch.setattr(hostfacts.socket, "gethostname", lambda: hostile("hostname"))
    host = FakeHost(tmp_path / "host", UNIT.replace("User=nobody",
                                                    "User=" + hostile("unit user", nul=False)),
                    commands={"systemctl": (0, "active\n")})
    (host.root / "etc/os-release").write_text(
        'PRETTY_NAME="' + hostile("os", nul=False).replace('"', "") + '"\n')
    (host.root / "proc").mkdir()
    (host.root / "proc/cpuinfo").write_text(
        "model name\t: " + hostile("cpu model", nul=False) + "\n")
    return site, host


LABELS = ["path", "client", "model", "error class", "server message", "exit", "restart reason",
          "drifted file", "quarantine reason", "baseline reason", "fatal reason",
          "operator action", "operator reason", "served name", "env value", "hostname",
          "cpu model", "unit user"]


def _unsafe(text: str) -> bool:
    """Holds a control or format (bidi) character other than a line end."""
    return any(unicodedata.category(ch) in ("Cc", "Cf") and ch != "\n" for ch in text)


def test_hostile_text_in_every_field_shows_as_escaped_text(
        hostile_site: tuple[Site, FakeHost]) -> None:
    """Every outside string reaches the page as text: no element or attribute comes from it,
    no raw control or bidi character is written, and it reads as `textsafe.escape` shows it."""
    site, host = hostile_site
    report = site.report(host.probe())
    page = render.render(report, "html")
    parsed = Page(page)
    assert set(parsed.tags) <= TAGS, set(parsed.tags) - TAGS
    assert not [name for name, _ in parsed.attributes if name.startswith("on")]
    # Where raw control characters got through: (element, the fields whose text it holds).
    raw = sorted({(element, ", ".join(re.findall(r'alert\("?([^")]+)"?\)', text)))
                  for element, text in parsed.cells if _unsafe(text)})
    raw += [("attribute " + name, value or "") for name, value in parsed.attributes
            if _unsafe(value or "")]
    assert not raw, f"raw control or format characters in {len(raw)} place(s): {raw}"
    assert not _unsafe(page)
    text = "\n".join(parsed.texts)
    missing = [label for label in LABELS if escape(hostile(label)) not in text
               and escape(hostile(label, nul=False)) not in text]
    assert not missing, f"not shown as escaped text: {missing}"
    # The OS release cannot hold a double quote; it is shown all the same.
    assert escape(hostile("os", nul=False).replace('"', "")) in text


def test_a_client_named_like_a_verdict_is_shown_as_a_name(
        hostile_site: tuple[Site, FakeHost]) -> None:
    """Only a verdict column shows verdict badges: a client named WARN is a plain cell."""
    site, host = hostile_site
    parsed = Page(render.render(site.report(host.probe()), "html"))
    assert ("td", "WARN") in parsed.cells
    assert ("span", "WARN") in parsed.cells  # the badges themselves are still there


def test_markdown_and_json_keep_hostile_text_inert(hostile_site: tuple[Site, FakeHost]) -> None:
    """The other renderings of the same report: Markdown escapes its markup characters and
    shows controls as escapes; JSON holds the text exactly, for tools."""
    site, host = hostile_site
    report = site.report(host.probe())
    md = render.render(report, "md")
    assert "<script>" not in md and "\x1b" not in md and "\u202e" not in md
    js = render.render(report, "json")
    assert "\\u001b[2K" in js and hostile("client").replace('"', '\\"')[:30] in js


def test_the_fleet_page_shows_hostile_host_client_model_and_finding_text_as_text() -> None:
    """`audit fleet --format html`: what comes from the hosts' exports (host names, export
    names, clients, models, control titles, findings and verdicts, what is not proven) reaches
    the page as escaped text, with the single-host report's macros and style."""
    from sovereignd.audit.fleet import FleetReport, HostAudit, render

    def host(n: int) -> HostAudit:
        return HostAudit(
            name=hostile(f"host{n}"), source=f"/exports/{_file_name(f'export{n}')}",
            exported_at=hostile(f"exported{n}"), period={}, config_sha256=hostile(f"digest{n}"),
            verdict="FAIL" if n == 2 else "PASS",
            controls=[{"id": "request_chain", "title": hostile(f"title{n}"),
                       "verdict": hostile(f"verdict{n}"), "finding": hostile(f"finding{n}")},
                      {"id": "x", "title": "Model", "verdict": "PASS", "finding": "ok"}],
            chain={}, requests={"total": {"requests": 7, "errors": 1},
                                "by_model": {hostile(f"model{n}"): {}},
                                "by_client": {hostile(f"client{n}") if n < 3 else "WARN": {}}},
            incidents={"backoff": 1, "fatal": 0, "quarantined": 2},
            unproven=[hostile(f"unproven{n}")] if n == 2 else [])

    report = FleetReport("2026-11-30T00:00:00Z", None, None, [host(1), host(2), host(3)])
    page = render(report, "html")
    parsed = Page(page)
    assert set(parsed.tags) <= TAGS | {"ul", "li"}, set(parsed.tags) - TAGS
    assert not [name for name, _ in parsed.attributes if name.startswith("on")]
    assert not _unsafe(page) and "<script>" not in page
    text = "\n".join(parsed.texts)
    labels = [f"{kind}{n}" for n in (1, 2) for kind in (
        "host", "exported", "digest", "title", "verdict", "finding", "model", "client")]
    missing = [label for label in [*labels, "unproven2"] if escape(hostile(label)) not in text]
    missing += [f"export{n}" for n in (1, 2) if escape(_file_name(f"export{n}")) not in text]
    assert not missing, f"not shown as escaped text: {missing}"
    assert ("td", "WARN") in parsed.cells  # host3's client, named like a verdict, is a name
    assert ("span", "FAIL") in parsed.cells  # the fleet's result
    assert ("href", "#host-2") in parsed.attributes and ("id", "host-2") in parsed.attributes
    # The same style as the single-host report, and one page: no script, no outside request.
    css = (files("sovereignd.audit") / "templates" / "report.css").read_text()
    assert css.strip() in page and "<link" not in page and "src=" not in page


def _file_name(label: str) -> str:
    """Hostile text a file name can hold (no slash, no NUL)."""
    return hostile(label, nul=False).replace("/", "")
