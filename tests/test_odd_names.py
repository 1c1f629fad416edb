"""Slide file names are bytes: names that are not UTF-8 (shares mounted from other systems), with spaces,
accents or a leading dash run like any other, with valid UTF-8 in every text output; a slide whose
result cannot be recorded fails alone, and no temporary file is left behind."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from wsi_grunet.cli import EXIT_FAILED, EXIT_OK
from wsi_grunet.display import display_text
from wsi_grunet.slide.discovery import find_slides, utf8_name

from synthetic import NULL_MODEL_RUN_OPTIONS, write_synthetic_slide

REPO_ROOT = Path(__file__).resolve().parent.parent
NOT_UTF8 = b"odd_\xff\xfe.svs"  # Latin-1 bytes, as a share from another system shows them
NOT_UTF8_FOLDER = b"caf\xe9"
ACCENTED = "-lésion 2 µm.svs"  # spaces, non-ASCII letters and a leading dash that must not read as an option


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wsi_grunet.cli", "run", *map(str, args)],
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=600,
        cwd=REPO_ROOT,
    )


def copy_as(folder: Path, name: bytes, source: Path) -> None:
    """Copy ``source`` to ``folder/name`` with ``name`` used as the raw bytes of the file name."""
    target = os.path.join(os.fsencode(folder), name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as handle:
        handle.write(source.read_bytes())


def leftovers(root: Path) -> list[bytes]:
    """Temporary files and folders anywhere under ``root`` (walked as bytes, whatever the names)."""
    found = []
    for folder, folders, files in os.walk(os.fsencode(root)):
        for name in folders + files:
            if name.endswith(b".tmp") or b".partial" in name or b".old-" in name:
                found.append(os.path.join(folder, name))
    return found


def test_display_text_escapes_only_bytes_that_are_not_utf8():
    odd = os.fsdecode(NOT_UTF8)
    assert display_text(odd) == "odd_\\xff\\xfe.svs"
    assert display_text(NOT_UTF8) == "odd_\\xff\\xfe.svs"
    assert display_text(Path("/slides") / odd) == "/slides/odd_\\xff\\xfe.svs"
    assert display_text(display_text(odd)) == display_text(odd)
    assert display_text(ACCENTED) == ACCENTED
    assert display_text("\ud800 stray") == "\\ud800 stray"  # a surrogate that stands for no byte


def test_output_names_are_utf8_and_unique(tmp_path):
    for name in (NOT_UTF8, b"odd_\xff\xfd.svs", b"odd_%FF%FE.svs", NOT_UTF8_FOLDER + b"/x.svs", ACCENTED.encode()):
        path = os.path.join(os.fsencode(tmp_path), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()  # discovery looks at names only
    names = [entry.name for entry in find_slides([tmp_path])]
    assert len(set(names)) == len(names) == 5
    for name in names:
        name.encode("utf-8")  # strict: never a surrogate
    assert "caf%E9/x" in names and "odd_%FF%FD" in names and "-lésion 2 µm" in names
    # a file really named odd_%FF%FE clashes with the escaped name: both get a hash of their path
    clashing = [name for name in names if name.startswith("odd_%FF%FE")]
    assert len(clashing) == 2 and all(name.startswith("odd_%FF%FE-") for name in clashing)
    assert utf8_name(os.fsdecode(NOT_UTF8_FOLDER)) == "caf%E9"


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """One real run over a normal slide and byte-identical copies under odd names."""
    root = tmp_path_factory.mktemp("odd-names")
    slides = root / "slides"
    slides.mkdir()
    normal = slides / "normal.svs"
    write_synthetic_slide(normal, 600, 400, mpp=0.5, levels=1, seed=2)
    copy_as(slides, NOT_UTF8, normal)
    copy_as(slides, NOT_UTF8_FOLDER + b"/x.svs", normal)
    copy_as(slides, ACCENTED.encode(), normal)
    out = root / "results"
    done = run_cli(slides, "--out", out, *NULL_MODEL_RUN_OPTIONS)
    return slides, out, done


def test_odd_names_run_like_any_other(odd_run):
    slides, out, done = odd_run
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    summary = json.loads((out / "run_summary.json").read_bytes().decode("utf-8"))
    by_name = {s["name"]: s for s in summary["slides"]}
    assert sorted(by_name) == sorted(["normal", "odd_%FF%FE", "caf%E9/x", "-lésion 2 µm"])
    assert all(s["status"] == "ok" for s in summary["slides"]), summary["slides"]
    assert by_name["odd_%FF%FE"]["slide"] == display_text(slides) + "/odd_\\xff\\xfe.svs"
    assert by_name["caf%E9/x"]["slide"] == display_text(slides) + "/caf\\xe9/x.svs"

    rows = list(csv.DictReader(io.StringIO((out / "cohort.csv").read_bytes().decode("utf-8"))))
    assert sorted(row["name"] for row in rows) == sorted(by_name)
    assert {row["status"] for row in rows} == {"ok"}
    assert display_text(slides) + "/odd_\\xff\\xfe.svs" in {row["slide"] for row in rows}

    page = (out / "index.html").read_bytes().decode("utf-8")  # strict: the page is valid UTF-8
    assert "odd_\\xff\\xfe.svs" in page and 'href="odd_%25FF%25FE/report.json"' in page
    assert "caf%25E9/x/report.json" in page and "-l%C3%A9sion%202%20%C2%B5m/report.json" in page

    # the same pixels under four names: the same nuclei, each slide with its own outputs and ids
    reference = pq.read_table(out / "normal" / "nuclei.parquet")
    assert reference.num_rows > 0
    ids = set()
    for name in by_name:
        folder = out / name
        report = json.loads((folder / "report.json").read_bytes().decode("utf-8"))
        assert report["name"] == name and report["slide"]["path"] == by_name[name]["slide"]
        assert pq.read_table(folder / "nuclei.parquet").equals(reference)
        assert (folder / f"{Path(name).name}.ome.zarr" / "zarr.json").exists()
        features = json.loads(gzip.decompress((folder / "nuclei.geojson.gz").read_bytes()).decode("utf-8"))
        assert len(features["features"]) == reference.num_rows
        ids.add(frozenset(feature["id"] for feature in features["features"]))
    assert len(ids) == len(by_name)  # nucleus ids are seeded by the slide's output name
    assert leftovers(out) == []


def test_odd_names_are_skipped_when_run_again(odd_run):
    slides, out, _ = odd_run
    again = run_cli(slides, "--out", out, *NULL_MODEL_RUN_OPTIONS)
    assert again.returncode == EXIT_OK, again.stdout + again.stderr
    summary = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))
    assert [s["status"] for s in summary["slides"]] == ["skipped"] * 4, summary["slides"]
    assert leftovers(out) == []


def test_a_result_that_cannot_be_recorded_fails_that_slide_only(tmp_path):
    """cohort.csv cannot be written (a folder stands in its place): each slide is failed with the reason
    on one line, the run still writes its summary and index, and nothing temporary stays."""
    slides = tmp_path / "slides"
    slides.mkdir()
    write_synthetic_slide(slides / "a.svs", 256, 192, mpp=0.5, levels=1, seed=1)
    copy_as(slides, NOT_UTF8, slides / "a.svs")
    out = tmp_path / "results"
    (out / "cohort.csv").mkdir(parents=True)
    done = run_cli(slides, "--out", out, *NULL_MODEL_RUN_OPTIONS)
    assert done.returncode == EXIT_FAILED, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    summary = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))
    assert len(summary["slides"]) == 2 and summary["failed"] == 2
    for slide in summary["slides"]:
        assert slide["status"] == "failed"
        assert "could not be recorded in cohort.csv" in slide["error"] and "\n" not in slide["error"]
    page = (out / "index.html").read_bytes().decode("utf-8")
    assert page.count('data-status="failed"') == 2 and "could not be recorded in cohort.csv" in page
    assert leftovers(out) == []


def test_an_output_folder_whose_name_is_not_utf8(tmp_path):
    """The output root itself on such a share: every file is written there, the text outputs stay UTF-8."""
    slides = tmp_path / "slides"
    slides.mkdir()
    write_synthetic_slide(slides / "s.svs", 600, 400, mpp=0.5, levels=1, seed=2)
    out = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), NOT_UTF8_FOLDER, b"results")))
    done = run_cli(slides, "--out", out, *NULL_MODEL_RUN_OPTIONS)
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    summary = json.loads((out / "run_summary.json").read_bytes().decode("utf-8"))
    assert summary["slides"][0]["out_dir"] == display_text(out / "s")
    with open(out / "s" / "nuclei.parquet", "rb") as handle:
        assert pq.read_table(handle).num_rows > 0
    (out / "index.html").read_bytes().decode("utf-8")
    (out / "cohort.csv").read_bytes().decode("utf-8")
    assert leftovers(out) == []
