"""``index.html`` of a run: one static page (no server, no scripts, relative links) listing every slide.

Each row: the slide's preview, its status, nucleus and tile counts, seconds, and links to the files it
wrote (as listed under ``outputs`` in its ``report.json``, only those present); a failed slide shows its
error. Open the page straight from disk (``file://``); the links work wherever the output folder is moved.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from ..display import display_text
from ..errors import OutputError

INDEX_NAME = "index.html"
# Link text of each output, in display order (keys of report.json "outputs").
OUTPUT_LABELS = (("geojson", "GeoJSON"), ("parquet", "Parquet"), ("zarr", "OME-Zarr"), ("preview", "preview"))

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1a1a1a; }
h1 { font-size: 1.4em; margin-bottom: 4px; }
p.model { margin-top: 0; color: #555; }
p.model.untrained { color: #b00020; font-weight: bold; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 8px 12px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.preview img { max-width: 260px; max-height: 200px; border: 1px solid #ccc; }
.status-ok { color: #116611; font-weight: bold; }
.status-skipped { color: #555; font-weight: bold; }
.status-failed, .status-busy { color: #b00020; font-weight: bold; }
.error { color: #b00020; white-space: pre-wrap; max-width: 640px; }
td.files a { display: block; }
"""


class SlideResultLike(Protocol):
    slide: str
    status: str
    name: str | None
    out_dir: str | None
    error: str | None
    nuclei: int
    tiles: int
    seconds: float


def relative_href(path: str) -> str:
    """A relative URL for a path under the output folder (each segment percent-encoded, '/' kept; a
    byte of the name that is not UTF-8 is encoded as itself, so the link reaches the file)."""
    return "/".join(quote(part, errors="surrogateescape") for part in Path(path).as_posix().split("/"))


def _read_report(folder: Path) -> dict[str, Any]:
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def slide_row(out_root: Path, result: SlideResultLike | dict[str, Any]) -> dict[str, Any]:
    """What one row shows, from a SlideResult (or its dict in run_summary.json) and its report.json."""
    get = result.get if isinstance(result, dict) else (lambda key, default=None: getattr(result, key, default))
    name = get("name")
    folder = out_root / name if name else None
    report = _read_report(folder) if folder is not None else {}
    counts = report.get("counts", {})
    files: list[tuple[str, str]] = []
    if folder is not None:
        outputs = report.get("outputs", {}) if isinstance(report.get("outputs"), dict) else {}
        for key, label in OUTPUT_LABELS:
            if key in outputs and (folder / outputs[key]).exists():
                files.append((label, f"{name}/{outputs[key]}"))
        if (folder / "report.json").exists():
            files.append(("report.json", f"{name}/report.json"))
    status = get("status") or "unknown"
    preview = f"{name}/preview.png" if folder is not None and (folder / "preview.png").exists() else None
    seconds = get("seconds") or 0.0
    if status == "skipped":  # finished earlier: the counts are in its report
        seconds = float(report.get("timings", {}).get("total_s", 0.0))
    return {
        "name": display_text(name or Path(str(get("slide"))).name),
        "slide": display_text(str(get("slide"))),
        "status": status,
        "error": None if get("error") is None else display_text(str(get("error"))),
        "nuclei": int(counts.get("nuclei", get("nuclei") or 0)),
        "tiles": int(counts.get("tiles_with_tissue", get("tiles") or 0)),
        "seconds": float(seconds),
        "preview": preview,
        "files": files,
    }


def _row_html(row: dict[str, Any]) -> str:
    esc = html.escape
    if row["preview"]:
        href = esc(relative_href(row["preview"]))
        preview = f'<a href="{href}"><img src="{href}" alt="preview of {esc(row["name"])}" loading="lazy"></a>'
    else:
        preview = "&mdash;"
    links = "".join(f'<a href="{esc(relative_href(path))}">{esc(label)}</a>' for label, path in row["files"])
    status = f'<span class="status-{esc(row["status"])}">{esc(row["status"])}</span>'
    if row["error"]:
        status += f'<div class="error">{esc(row["error"])}</div>'
    done = row["status"] in ("ok", "skipped")
    nuclei = f"{row['nuclei']:,}" if done else "&mdash;"
    tiles = f"{row['tiles']:,}" if done else "&mdash;"
    return (
        f'<tr class="slide" data-status="{esc(row["status"])}">'
        f'<td class="name"><b>{esc(row["name"])}</b><br><small>{esc(row["slide"])}</small></td>'
        f'<td class="preview">{preview}</td><td class="status">{status}</td>'
        f'<td class="num nuclei">{nuclei}</td><td class="num tiles">{tiles}</td>'
        f'<td class="num seconds">{row["seconds"]:.1f}</td><td class="files">{links or "&mdash;"}</td></tr>'
    )


def render_index(rows: list[dict[str, Any]], title: str, model: str | None = None) -> str:
    esc = html.escape
    failed = sum(row["status"] == "failed" for row in rows)
    summary = f"{len(rows)} slide(s), {failed} failed, {sum(r['nuclei'] for r in rows):,} nuclei in all"
    model_line = ""
    if model:
        untrained = " untrained" if "untrained" in model.lower() else ""
        model_line = f'<p class="model{untrained}">model: {esc(model)}</p>'
    body = "\n".join(_row_html(row) for row in rows)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f'<h1>{esc(title)}</h1>\n{model_line}\n<p class="summary">{esc(summary)}</p>\n'
        "<table>\n<thead><tr><th>slide</th><th>preview</th><th>status</th><th>nuclei</th><th>tiles</th>"
        "<th>seconds</th><th>files</th></tr></thead>\n"
        f"<tbody>\n{body}\n</tbody>\n</table>\n</body>\n</html>\n"
    )


def write_index_html(
    out_root: str | os.PathLike,
    results: Iterable[SlideResultLike | dict[str, Any]],
    model: str | None = None,
    title: str = "wsi-grunet results",
) -> Path:
    """Write ``out_root/index.html`` (complete before it appears under its name) and return its path."""
    root = Path(out_root)
    rows = [slide_row(root, result) for result in results]
    target = root / INDEX_NAME
    tmp = root / f".{INDEX_NAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text(render_index(rows, title, model), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{target}: cannot write the run's index page ({exc.strerror or exc})") from None
    return target
