"""The audit report as Markdown (for a ticket), HTML (one self-contained file) or JSON (tools).

The HTML needs no network: its style is inline and its two charts (requests per day,
restarts per day) are inline SVG bars, so the file can be mailed, archived and opened
offline years later. It comes from jinja2 templates (templates/, package data) with
autoescaping on, so text from logs, configuration and host reaches the page only as text.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import orjson
from markupsafe import Markup

from sovereignd.audit.report import SECTIONS, AuditReport, Control, display_value, short_ts
from sovereignd.textsafe import escape

FORMATS = ("md", "html", "json")
_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def format_for(output: Path | None) -> str:
    """The format an output file's suffix asks for (.json, .html/.htm), else Markdown."""
    suffix = output.suffix.lower() if output is not None else ""
    return {".html": "html", ".htm": "html", ".json": "json"}.get(suffix, "md")


def render(report: AuditReport, fmt: str) -> str:
    """The report in one of FORMATS."""
    renderers: dict[str, Callable[[AuditReport], str]] = {
        "md": render_markdown, "html": render_html, "json": render_json}
    return renderers[fmt](report)


def render_json(report: AuditReport) -> str:
    return orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2,
                        default=str).decode() + "\n"


def _period(report: AuditReport) -> str:
    start = (short_ts(report.period.lo) if report.period.lo is not None
             else report.period_start_text)
    return f"{start} → {short_ts(report.period.hi)} (UTC)"


# ---------------------------------------------------------------------------------------------
# Markdown


def _md(text: Any) -> str:
    """A value as Markdown table-cell text: escaped so paths and names render as written."""
    out = escape(display_value(text) if not isinstance(text, str) else short_ts(text))
    for ch in ("\\", "|", "*", "`", "<", ">", "["):
        out = out.replace(ch, "\\" + ch)
    # Inside a word (HF_HUB_OFFLINE) an underscore is literal; only word edges need escaping.
    out = _EDGE_UNDERSCORE.sub(r"\\_", out)
    return " ".join(out.split())


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |",
             "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_md(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(report: AuditReport) -> str:
    n = report.counts()
    host = report.host
    out = [f"# sovereignd audit report: {report.result}", "",
           f"- **Period:** {_md(_period(report))}",
           f"- **Produced:** {short_ts(report.produced_at)} by sovereignd {report.version} on "
           f"{_md(host['hostname'])}",
           f"- **Configuration:** {_md(report.config_path)} (sha256 "
           f"{report.config_sha256[:16]}…)",
           f"- **Result:** **{report.result}** — {n['fail']} failed, {n['warn']} warning(s), "
           f"{n['pass']} passed, {n['info']} for information",
           ""]
    out += _md_table(["Control", "Result", "Finding"],
                     [[c.title, c.verdict, c.finding] for c in report.controls])
    for section in SECTIONS:
        controls = [c for c in report.controls if c.section == section]
        if not controls:
            continue
        out += ["", f"## {section}"]
        for c in controls:
            out += _md_control(c)
    out += ["", "---", f"Produced by `sovereignd audit` {report.version} at "
            f"{short_ts(report.produced_at)}. Verdicts: PASS the control holds; FAIL it does "
            "not; WARN it could not be fully judged or needs a look; INFO facts only.", ""]
    return "\n".join(out)


def _md_control(c: Control) -> list[str]:
    out = ["", f"### {c.verdict} · {c.title}", "", _md(c.finding), ""]
    if c.facts:
        out += _md_table(["Evidence", ""], [[f.label, f.display()] for f in c.facts])
    for t in c.tables:
        out += ["", f"**{_md(t.title)}**", ""]
        out += _md_table(t.columns, t.rows) if t.rows else ["_none_"]
    return out


# ---------------------------------------------------------------------------------------------
# HTML: templates/report.html.j2 and chart.svg.j2, autoescaped


@dataclass(frozen=True)
class Bar:
    """One day's bar: its place (SVG user units) and whether it carries its count or day."""

    day: str
    count: int
    x: float
    y: float
    height: float
    mid: float
    count_label: bool
    day_label: bool


@dataclass(frozen=True)
class Chart:
    """An inline SVG bar chart's geometry, in SVG user units (px at 100%), for chart.svg.j2."""

    title: str
    unit: str
    bar_class: str
    width: int
    height: int
    left: int
    top: int
    right: int   # x of the plot's right edge
    base: int    # y of the x axis
    bar_width: float
    scale_max: int
    peak: int
    total: int
    first: str
    last: str
    bars: list[Bar]

    @property
    def center(self) -> float:
        return (self.left + self.right) / 2

    @property
    def middle(self) -> float:
        return (self.top + self.base) / 2


def bar_chart(title: str, data: list[tuple[str, int]], unit: str, *, cls: str = "",
              width: int = 540, height: int = 200) -> Chart:
    """One bar per day (`data`: ISO day, count), scaled to the period's peak; a short period
    keeps narrow bars from the left instead of a few slabs."""
    left, right, top, bottom = 40, 10, 14, 38
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((n for _, n in data), default=0)
    scale_max = max(1, peak)
    n = max(1, len(data))
    slot = min(plot_w / n, 44.0)
    bar_w = max(1.0, slot * 0.72)
    label_every = max(1, round(n / 8))
    bars = []
    for idx, (day, count) in enumerate(data):
        x = left + idx * slot + (slot - bar_w) / 2
        h = plot_h * count / scale_max
        bars.append(Bar(day, count, x, top + plot_h - h, h, x + bar_w / 2,
                        count_label=bool(count) and n <= 31,
                        day_label=idx % label_every == 0 or idx == n - 1))
    first, last = (data[0][0], data[-1][0]) if data else ("", "")
    return Chart(title, unit, f"bar {cls}".strip(), width, height, left, top, left + plot_w,
                 top + plot_h, bar_w, scale_max, peak, sum(c for _, c in data), first, last,
                 bars)


def _cell(value: Any) -> str:
    """An evidence value as people read it (timestamps to the second, None as a dash)."""
    return display_value(value) if not isinstance(value, str) else short_ts(value)


def _visible(value: Any) -> Any:
    """jinja2's finalize: every string printed shows its control and bidi characters as
    escapes (`textsafe.escape`) before autoescaping makes it HTML text."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return escape(value)
    return value


@functools.cache
def _templates() -> jinja2.Environment:
    """The package's templates, autoescaped whatever their name (jinja2 "Autoescaping")."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("sovereignd.audit", "templates"), autoescape=True,
        finalize=_visible, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["cell"] = _cell
    return env


def render_html(report: AuditReport) -> str:
    """The report as one HTML page (templates/report.html.j2), sections in SECTIONS order."""
    sections = [(s, [c for c in report.controls if c.section == s]) for s in SECTIONS]
    charts = {
        "requests": bar_chart("Requests per day", report.charts["requests_per_day"],
                              "requests"),
        "restarts": bar_chart("Restarts per day", report.charts["restarts_per_day"],
                              "restarts", cls="restart"),
    }
    return page("report.html.j2",
                report=report, period=_period(report), counts=report.counts(), charts=charts,
                sections=[(s, controls) for s, controls in sections if controls],
                fact_rows=lambda c: [[f.label, f.display()] for f in c.facts])


def page(template: str, **context: Any) -> str:
    """One of the package's HTML templates rendered with `context`, autoescaped (also
    `audit fleet`'s page, templates/fleet.html.j2, with the same macros and style)."""
    return _templates().get_template(template).render(**context)
