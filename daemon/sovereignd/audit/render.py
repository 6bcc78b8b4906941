"""The audit report as Markdown (for a ticket), HTML (one self-contained file) or JSON (tools).

The HTML needs no network: its style is inline and its two charts (requests per day,
restarts per day) are inline SVG bars, so the file can be mailed, archived and opened
offline years later.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from typing import Any

import orjson

from sovereignd.audit.report import (
    FAIL,
    INFO,
    PASS,
    SECTIONS,
    WARN,
    AuditReport,
    Control,
    Table,
    display_value,
    short_ts,
)
from sovereignd.textsafe import escape

FORMATS = ("md", "html", "json")
_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


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
# HTML

_CSS = """
:root { --pass:#1a7f37; --fail:#cf222e; --warn:#9a6700; --info:#57606a; --line:#d0d7de; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color:#1f2328;
       max-width: 1180px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 24px; margin: 0 0 8px; } h2 { font-size: 19px; margin: 28px 0 8px;
  border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.meta { color:#3d444d; margin: 0 0 12px; } .meta b { color:#1f2328; }
.v { display:inline-block; min-width: 44px; text-align:center; font-weight:600; font-size:12px;
     border-radius: 4px; padding: 1px 6px; color:#fff; }
.v.PASS { background: var(--pass); } .v.FAIL { background: var(--fail); }
.v.WARN { background: var(--warn); } .v.INFO { background: var(--info); }
.result { font-size: 16px; padding: 8px 12px; border-radius: 6px; margin: 10px 0 16px;
          border: 1px solid var(--line); }
.result.FAIL { background:#ffebe9; border-color:#ff818266; }
.result.PASS { background:#dafbe1; border-color:#4ac26b66; }
table { border-collapse: collapse; margin: 6px 0 10px; width: 100%; }
th, td { border: 1px solid var(--line); padding: 3px 7px; text-align: left;
         vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.facts td:first-child { width: 32%; color:#3d444d; }
.finding { margin: 2px 0 6px; }
.empty { color: var(--info); font-style: italic; margin: 2px 0 8px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.chart { border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
.chart h3 { margin: 0 0 4px; }
svg text { font: 11px sans-serif; fill: #3d444d; }
svg .bar { fill: #0969da; } svg .bar.restart { fill: #bc4c00; }
svg .axis { stroke: #8c959f; stroke-width: 1; }
footer { color: var(--info); margin: 28px 0; font-size: 12px; }
code { font-size: 12px; }
"""


def _h(value: Any) -> str:
    text = display_value(value) if not isinstance(value, str) else short_ts(value)
    return html.escape(escape(text))


def _html_table(columns: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for v in row:
            if isinstance(v, str) and v in (PASS, FAIL, WARN, INFO):
                cells.append(f'<td><span class="v {v}">{v}</span></td>')
            elif isinstance(v, int | float) and not isinstance(v, bool):
                cells.append(f'<td class="num">{_h(v)}</td>')
            else:
                cells.append(f"<td>{_h(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def bar_chart(title: str, data: list[tuple[str, int]], unit: str, *, cls: str = "",
              width: int = 540, height: int = 200) -> str:
    """An inline SVG bar chart, one bar per day, each with a tooltip; no script, no fonts."""
    left, right, top, bottom = 40, 10, 14, 38
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((n for _, n in data), default=0)
    scale_max = max(1, peak)
    n = max(1, len(data))
    # A short period must not turn into a few slabs: bars stay narrow, from the left.
    slot = min(plot_w / n, 44.0)
    bar_w = max(1.0, slot * 0.72)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
             f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" '
             f'y2="{top + plot_h}"/>',
             f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{scale_max}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>']
    label_every = max(1, round(n / 8))
    for idx, (day, count) in enumerate(data):
        x = left + idx * slot + (slot - bar_w) / 2
        h = plot_h * count / scale_max
        y = top + plot_h - h
        klass = f"bar {cls}".strip()
        parts.append(f'<rect class="{klass}" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                     f'height="{h:.1f}"><title>{day}: {count} {html.escape(unit)}</title>'
                     "</rect>")
        if count and n <= 31:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{y - 3:.1f}" '
                         f'text-anchor="middle">{count}</text>')
        if idx % label_every == 0 or idx == n - 1:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 14}" '
                         f'text-anchor="middle">{day[5:]}</text>')
    if not peak:
        parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" '
                     f'text-anchor="middle">none in the period</text>')
    first, last = (data[0][0], data[-1][0]) if data else ("", "")
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">'
                 f"{first} … {last} (UTC), total {sum(c for _, c in data)}</text>")
    parts.append("</svg>")
    return (f'<div class="chart"><h3>{html.escape(title)}</h3>' + "".join(parts) + "</div>")


def render_html(report: AuditReport) -> str:
    n = report.counts()
    host = report.host
    summary_rows = [[f'<a href="#{c.id}">{html.escape(c.title)}</a>', c.verdict, c.finding]
                    for c in report.controls]
    summary = ("<table><thead><tr><th>Control</th><th>Result</th><th>Finding</th></tr></thead>"
               "<tbody>" + "".join(
                   f'<tr><td>{r[0]}</td><td><span class="v {r[1]}">{r[1]}</span></td>'
                   f"<td>{html.escape(r[2])}</td></tr>" for r in summary_rows)
               + "</tbody></table>")
    charts = ('<div class="charts">'
              + bar_chart("Requests per day", report.charts["requests_per_day"], "requests")
              + bar_chart("Restarts per day", report.charts["restarts_per_day"], "restarts",
                          cls="restart")
              + "</div>")
    sections = []
    for section in SECTIONS:
        controls = [c for c in report.controls if c.section == section]
        if controls:
            sections.append(f"<h2>{html.escape(section)}</h2>"
                            + "".join(_html_control(c) for c in controls))
    title = f"sovereignd audit — {host['hostname']} — {_period(report)}"
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        "<h1>sovereignd audit report</h1>",
        '<p class="meta">',
        f"<b>Period</b> {html.escape(_period(report))}<br>",
        f"<b>Produced</b> {_h(report.produced_at)} by sovereignd {html.escape(report.version)}"
        f" on {html.escape(str(host['hostname']))}<br>",
        f"<b>Configuration</b> <code>{html.escape(report.config_path)}</code> (sha256 "
        f"<code>{report.config_sha256[:16]}…</code>)</p>",
        f'<div class="result {report.result}"><span class="v {report.result}">'
        f"{report.result}</span> {n['fail']} failed, {n['warn']} warning(s), {n['pass']} "
        f"passed, {n['info']} for information</div>",
        charts, "<h2>Summary</h2>", summary, *sections,
        f"<footer>Produced by <code>sovereignd audit</code> {html.escape(report.version)} at "
        f"{_h(report.produced_at)}. Verdicts: PASS the control holds; FAIL it does not; WARN it "
        "could not be fully judged or needs a look; INFO facts only.</footer>",
        "</body></html>\n"])


def _html_control(c: Control) -> str:
    parts = [f'<h3 id="{c.id}"><span class="v {c.verdict}">{c.verdict}</span> '
             f"{html.escape(c.title)}</h3>",
             f'<p class="finding">{html.escape(c.finding)}</p>']
    if c.facts:
        parts.append(_html_table(["Evidence", ""], [[f.label, f.display()] for f in c.facts],
                                 "facts"))
    parts.extend(_html_evidence_table(t) for t in c.tables)
    return "".join(parts)


def _html_evidence_table(t: Table) -> str:
    if not t.rows:
        return f'<p class="empty">{html.escape(t.title)}: none</p>'
    return f"<h4>{html.escape(t.title)}</h4>" + _html_table(t.columns, t.rows)
