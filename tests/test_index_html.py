"""The run's index.html (wsi_grunet.outputs.index_html): checked as written, then in real headless
Chromium (rows, links resolving to files, previews decoded, a screenshot)."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from wsi_grunet.outputs.index_html import write_index_html
from wsi_grunet.outputs.preview import render_preview
from wsi_grunet.pipeline import SlideResult

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Injected into a copy of the page: waits for every image to decode and writes what it found into the DOM.
CHECK_SCRIPT = """<script>
window.addEventListener('load', async () => {
  const images = [...document.images];
  const decoded = await Promise.all(images.map(i => i.decode().then(() => true, () => false)));
  const out = document.createElement('pre');
  out.id = 'checks';
  out.textContent = JSON.stringify({
    rows: document.querySelectorAll('tr.slide').length,
    images: images.map((i, k) => ({src: i.getAttribute('src'), width: i.naturalWidth, decoded: decoded[k]})),
    links: [...document.querySelectorAll('td.files a')].map(a => a.href),
  });
  document.body.appendChild(out);
});
</script>"""


def make_slide_folder(root: Path, name: str, nuclei: int, formats: list[str]) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    outputs = {}
    if "preview" in formats:
        thumb = np.full((60, 90, 3), (230, 190, 215), np.uint8)
        render_preview(thumb, 4.0, 0.5, lambda: iter([(100.0, 100.0, None)] * 0), folder / "preview.png")
        outputs["preview"] = "preview.png"
    if "geojson" in formats:
        (folder / "nuclei.geojson.gz").write_bytes(b"\x1f\x8b")
        outputs["geojson"] = "nuclei.geojson.gz"
    if "parquet" in formats:
        (folder / "nuclei.parquet").write_bytes(b"PAR1")
        outputs["parquet"] = "nuclei.parquet"
    if "zarr" in formats:
        zarr_name = f"{Path(name).name}.ome.zarr"
        (folder / zarr_name).mkdir()
        (folder / zarr_name / "zarr.json").write_text("{}")
        outputs["zarr"] = zarr_name
    report = {
        "status": "ok",
        "counts": {"nuclei": nuclei, "tiles_with_tissue": 3},
        "outputs": outputs,
        "timings": {"total_s": 12.5},
    }
    (folder / "report.json").write_text(json.dumps(report))


@pytest.fixture
def run_folder(tmp_path) -> tuple[Path, list[SlideResult]]:
    """Four slides: two finished (one in a subfolder, with characters that need escaping and quoting),
    one skipped (finished earlier), one failed."""
    root = tmp_path / "results"
    all_formats = ["zarr", "geojson", "parquet", "preview"]
    make_slide_folder(root, "alpha", 1234, all_formats)
    make_slide_folder(root, "site 2/b&w #1", 56, ["geojson", "preview"])
    make_slide_folder(root, "gamma", 7, all_formats)
    results = [
        SlideResult("/data/alpha.svs", "ok", "alpha", str(root / "alpha"), nuclei=1234, tiles=3, seconds=20.25),
        SlideResult(
            "/data/site 2/b&w #1.svs",
            "ok",
            "site 2/b&w #1",
            str(root / "site 2/b&w #1"),
            nuclei=56,
            tiles=3,
            seconds=4.0,
        ),
        SlideResult("/data/gamma.svs", "skipped", "gamma", str(root / "gamma")),
        SlideResult("/data/broken.svs", "failed", "broken", error="/data/broken.svs: not a slide <TIFF> & co"),
    ]
    return root, results


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.cell: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-status" in attrs:
            self.rows.append({"status": attrs["data-status"], "links": [], "images": [], "text": {}})
        elif self.rows and tag == "td":
            self.cell = attrs.get("class", "").split()[-1]
        elif self.rows and tag == "a" and self.cell == "files":
            self.rows[-1]["links"].append(attrs["href"])
        elif self.rows and tag == "img":
            self.rows[-1]["images"].append(attrs["src"])

    def handle_data(self, data):
        if self.rows and self.cell:
            self.rows[-1]["text"][self.cell] = self.rows[-1]["text"].get(self.cell, "") + data


def test_page_lists_every_slide_with_its_files(run_folder):
    root, results = run_folder
    page = write_index_html(root, results, model="GRU-Net (packaged weights)")
    assert page == root / "index.html"
    parser = PageParser()
    parser.feed(page.read_text())
    rows = parser.rows
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "failed"]
    alpha, second, gamma, broken = rows
    assert alpha["links"] == [
        "alpha/nuclei.geojson.gz",
        "alpha/nuclei.parquet",
        "alpha/alpha.ome.zarr",
        "alpha/preview.png",
        "alpha/report.json",
    ]
    assert alpha["images"] == ["alpha/preview.png"]
    assert alpha["text"]["nuclei"] == "1,234" and alpha["text"]["tiles"] == "3" and alpha["text"]["seconds"] == "20.2"
    # Names are percent-encoded per path segment and resolve to the files on disk.
    assert second["links"] == [
        "site%202/b%26w%20%231/nuclei.geojson.gz",
        "site%202/b%26w%20%231/preview.png",
        "site%202/b%26w%20%231/report.json",
    ]
    for row in rows:
        for href in row["links"] + row["images"]:
            assert (root / unquote(href)).exists(), href
    assert gamma["text"]["nuclei"] == "7" and gamma["text"]["seconds"] == "12.5"  # counts from its report
    assert broken["links"] == [] and broken["images"] == []
    assert "/data/broken.svs: not a slide <TIFF> & co" in broken["text"]["status"]  # escaped, shown as text


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed (.ci/setup.d/30-browser.sh installs Debian's chromium)")


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_page_in_headless_chromium(run_folder, tmp_path):
    binary = _chromium()
    root, results = run_folder
    page = write_index_html(root, results)
    check_page = root / "check.html"  # same folder, so the relative links are the page's own
    check_page.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    done = _run_chromium(
        binary,
        tmp_path / "profile-dom",
        "--window-size=1400,3000",
        "--virtual-time-budget=10000",
        "--dump-dom",
        check_page.as_uri(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    start = dom.index('<pre id="checks">') + len('<pre id="checks">')
    checks = json.loads(dom[start : dom.index("</pre>", start)].replace("&amp;", "&").replace("&quot;", '"'))
    assert checks["rows"] == 4
    assert [i["src"] for i in checks["images"]] == [
        "alpha/preview.png",
        "site%202/b%26w%20%231/preview.png",
        "gamma/preview.png",
    ]
    for image in checks["images"]:
        assert image["decoded"] and image["width"] > 0, image
    assert len(checks["links"]) == 5 + 3 + 5
    for href in checks["links"]:  # as the browser resolved them
        url = urlparse(href)
        assert url.scheme == "file" and Path(unquote(url.path)).exists(), href
    # A screenshot of the page as a person sees it.
    shot = tmp_path / "index.png"
    done = _run_chromium(
        binary,
        tmp_path / "profile-shot",
        "--window-size=1280,900",
        "--hide-scrollbars",
        "--virtual-time-budget=10000",
        f"--screenshot={shot}",
        page.as_uri(),
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1280)
    # The page is not blank: dark text, and the previews' pink thumbnails are on it.
    assert (pixels.sum(axis=2) < 150).sum() > 500
    assert (np.abs(pixels.astype(int) - (230, 190, 215)).sum(axis=2) < 12).sum() > 1000


def test_cohort_run_writes_only_the_chosen_outputs_and_the_index(tmp_path):
    """A real run (null model, real OpenSlide and Dask) with --outputs geojson,preview and one broken file."""
    from wsi_grunet.cli import main

    from synthetic import write_synthetic_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    write_synthetic_slide(slides / "discs.svs", 600, 400, mpp=0.5, levels=1, seed=2)
    (slides / "broken.svs").write_bytes(b"this is not a TIFF file")
    out = tmp_path / "results"
    code = main(
        [
            "run",
            str(slides),
            "--out",
            str(out),
            "--weights",
            "null-model",
            "--workers",
            "1",
            "--tile-size",
            "256",
            "--halo",
            "64",
            "--outputs",
            "geojson,preview",
            "--quiet",
            "--set",
            "output.chunk=64",
        ]
    )
    assert code == 1  # one slide failed
    folder = out / "discs"
    report = json.loads((folder / "report.json").read_text())
    assert report["outputs"] == {"geojson": "nuclei.geojson.gz", "preview": "preview.png"}
    assert sorted(p.name for p in folder.iterdir()) == ["nuclei.geojson.gz", "plan.json", "preview.png", "report.json"]
    assert not list(out.rglob("*.ome.zarr")) and not list(out.rglob("*.parquet"))
    parser = PageParser()
    parser.feed((out / "index.html").read_text())
    by_status = {row["status"]: row for row in parser.rows}
    assert sorted(by_status) == ["failed", "ok"]
    assert by_status["ok"]["links"] == ["discs/nuclei.geojson.gz", "discs/preview.png", "discs/report.json"]
    assert by_status["ok"]["text"]["nuclei"].replace(",", "") == str(report["counts"]["nuclei"])
    assert "broken.svs" in by_status["failed"]["text"]["status"]
    for href in by_status["ok"]["links"] + by_status["ok"]["images"]:
        assert (out / unquote(href)).exists(), href
