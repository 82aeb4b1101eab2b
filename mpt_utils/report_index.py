"""The index.html of a reports folder: per notebook its status, time, key numbers and figures.

Key numbers are the notebook's computed conclusion, read from the executed notebook: the text output
of the last code cell in the section under its last conclusion-like heading ("## Conclusion",
"## Summary", "## Reading the results", ...), or of a code cell tagged `conclusion`. A notebook
without one shows none (nothing is guessed). Figures are thumbnails linking to the full image. Every link is relative,
so the folder can be moved or zipped and still opens.

A footer counts the page's images and how many failed to load (an inline script, after load): a
reader sees a broken figure at once, and the browser test reads the same line.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mpt_utils.store import atomic_write_text

CONCLUSION_HEADING = re.compile(r"^#+\s.*\b(conclusions?|summary|reading the results|what (agrees|holds))\b",
                                re.IGNORECASE | re.MULTILINE)
CONCLUSION_TAG = "conclusion"
KEY_LINES = 24  # longer conclusions are cut; the notebook itself has the rest
TIMING_LINE = re.compile(r"^notebook (time|done)\b", re.IGNORECASE)  # bookkeeping, not a result
FIGURE_CHECK_ID = "figure-check"
# Counts <img> elements that did not decode (naturalWidth 0) once the page has loaded.
FIGURE_CHECK_SCRIPT = (
    "<script>window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);"
    "var bad=imgs.filter(function(i){return !i.complete||i.naturalWidth===0;});"
    "bad.forEach(function(i){i.classList.add('broken');});"
    f"document.getElementById('{FIGURE_CHECK_ID}').textContent=imgs.length+' figures, '+bad.length"
    "+' failed to load';});</script>")
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}"
         "td,th{padding:4px 10px;vertical-align:top;text-align:left}"
         "table{border-collapse:collapse}tr{border-bottom:1px solid #ddd}"
         "pre.key{white-space:pre-wrap;margin:0;font-size:0.85em;max-width:60em}"
         "figure{display:inline-block;margin:4px 8px 4px 0}figcaption{font-size:0.8em}"
         "img.thumb{width:240px;border:1px solid #ccc}img.broken{outline:3px solid #c00}"
         f"#{FIGURE_CHECK_ID}{{margin-top:2em;color:#555}}")


def _source(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value or "")


def output_text(cell: Mapping[str, Any]) -> str:
    """What a code cell printed or displayed as text. Printed lines and markdown are the author's
    sentences; a plain repr (a DataFrame's) is used only when the cell has neither."""
    written, plain = [], []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream" and out.get("name") == "stdout":
            written.append(_text(out.get("text")))
        elif out.get("output_type") in ("execute_result", "display_data") and "image/png" not in out.get("data", {}):
            data = out.get("data", {})
            if "text/markdown" in data:
                written.append(_text(data["text/markdown"]))
            elif "text/plain" in data:
                plain.append(_text(data["text/plain"]))
    lines = [line.rstrip() for part in (written or plain) for line in part.splitlines()]
    return "\n".join(line for line in lines if not TIMING_LINE.match(line.strip())).strip()


def _heading_level(cell: Mapping[str, Any]) -> int | None:
    """The level of a markdown cell's first heading (None: no heading)."""
    if cell.get("cell_type") != "markdown":
        return None
    found = re.search(r"^(#+)\s", _source(cell), re.MULTILINE)
    return len(found.group(1)) if found else None


def conclusion_cells(cells: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The code cells holding the conclusion: those tagged `conclusion`, else the code cells of the
    section under the last conclusion-like heading (up to the next heading of its level or above)."""
    code = [c for c in cells if c.get("cell_type") == "code"]
    tagged = [c for c in code if CONCLUSION_TAG in c.get("metadata", {}).get("tags", [])]
    if tagged:
        return tagged
    heads = [i for i, c in enumerate(cells)
             if c.get("cell_type") == "markdown" and CONCLUSION_HEADING.search(_source(c))]
    if not heads:
        return []
    level = _heading_level(cells[heads[-1]]) or 1
    section = []
    for cell in cells[heads[-1] + 1:]:
        next_level = _heading_level(cell)
        if next_level is not None and next_level <= level:
            break
        section.append(cell)
    return [c for c in section if c.get("cell_type") == "code"]


def key_numbers(notebook: Path, max_lines: int = KEY_LINES) -> str:
    """The computed conclusion of an executed notebook: the text output of the last of its
    `conclusion_cells` that printed something ('' when none did or the notebook cannot be read)."""
    import nbformat

    try:
        cells = nbformat.read(notebook, as_version=4).cells
    except Exception:  # missing, truncated or not a notebook: the index still lists the row
        return ""
    text = next((t for t in (output_text(c) for c in reversed(conclusion_cells(cells))) if t), "")
    lines = text.splitlines()
    return "\n".join(lines[:max_lines] + (["…"] if len(lines) > max_lines else []))


def _stem_prefix(notebook: str) -> str:
    """'04_structured_pruning' -> '04_': the suite names its figures after the notebook's number."""
    head, sep, _ = notebook.partition("_")
    return head + sep if sep and head.isdigit() else f"{notebook}_"


def assign_figures(runs: Iterable[Mapping[str, Any]], figures: Iterable[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Figures (paths relative to the reports folder) per notebook, and those of no notebook. A row's
    `figures` (what the notebook wrote while it ran) wins; rows without one take the figures named
    after the notebook's number."""
    available = sorted(figures)
    by_nb: dict[str, list[str]] = {}
    for row in runs:
        if "figures" in row:
            by_nb[row["notebook"]] = list(row["figures"])
        else:
            prefix = _stem_prefix(row["notebook"])
            by_nb[row["notebook"]] = [f for f in available if Path(f).name.startswith(prefix)]
    taken = {f for names in by_nb.values() for f in names}
    return by_nb, [f for f in available if f not in taken]


def _link(href: str, text: str) -> str:
    return f"<a href='{html.escape(href)}'>{html.escape(text)}</a>" if href else html.escape(text)


def _thumbs(names: Iterable[str]) -> str:
    out = []
    for name in names:
        ref, stem = html.escape(name), html.escape(Path(name).stem)
        out.append(f"<figure><a href='{ref}'><img class='thumb' src='{ref}' alt='{stem}'></a>"
                   f"<figcaption>{stem}</figcaption></figure>")
    return "".join(out)


def _row(run: Mapping[str, Any], key: str, figures: list[str]) -> str:
    executed = _link(run.get("ipynb", ""), "ipynb" if run.get("ipynb") else "")
    result = html.escape(run.get("error", "")) + (f"<pre class='key'>{html.escape(key)}</pre>" if key else "")
    return (f"<tr><td>{_link(run.get('html', ''), run['notebook'])}<br>{executed}</td>"
            f"<td>{html.escape(run['status'])}</td><td>{run['seconds']}</td><td>{result}</td>"
            f"<td>{_thumbs(figures)}</td></tr>")


def index_page(out_dir: Path, profile: str, runs: list[dict[str, Any]], note: str = "") -> str:
    """The index page's HTML; every href and src is relative to `out_dir`."""
    figures = [f"figures/{p.name}" for p in sorted((out_dir / "figures").glob("*.png"))]
    by_nb, other = assign_figures(runs, figures)
    rows = [_row(r, key_numbers(out_dir / r["ipynb"]) if r.get("ipynb") else "", by_nb.get(r["notebook"], []))
            for r in runs]
    statuses = [r["status"] for r in runs]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    rest = f"<h2>Other figures</h2>{_thumbs(other)}" if other else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>MPT reports ({html.escape(profile)})</title>"
            f"<style>{STYLE}</style></head><body>"
            f"<h1>MPT suite reports: profile <code>{html.escape(profile)}</code></h1>"
            f"<p>{html.escape(counts)}{'. ' + html.escape(note) if note else ''}</p>"
            "<table><tr><th>notebook</th><th>status</th><th>seconds</th><th>key numbers (or error)</th>"
            "<th>figures</th></tr>"
            f"{''.join(rows)}</table><p>Tidy results: <a href='results.csv'>results.csv</a></p>{rest}"
            f"<footer id='{FIGURE_CHECK_ID}'>figure check needs JavaScript</footer>{FIGURE_CHECK_SCRIPT}</body></html>")


def write_index(out_dir: Path, profile: str, runs: list[dict[str, Any]], note: str = "") -> Path:
    index = out_dir / "index.html"
    atomic_write_text(index, index_page(out_dir, profile, runs, note))
    return index


__all__ = ["assign_figures", "conclusion_cells", "index_page", "key_numbers", "output_text", "write_index"]
