"""Pixel sizes nuclei cannot be resolved at (outside 0.1-2 um/px) are refused, naming the value and where
it came from: given with --mpp it applies to every slide, so the run stops before any slide is read
(exit 2); read from a slide's metadata it fails that slide only and the cohort goes on."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from wsi_grunet.cli import EXIT_FAILED, EXIT_USAGE, main
from wsi_grunet.errors import PixelSizeError
from wsi_grunet.slide.reader import SlideReader, describe, inspect_slide

from synthetic import NULL_MODEL_RUN_OPTIONS, write_synthetic_slide


@pytest.fixture
def slides(tmp_path) -> Path:
    """A folder with one slide whose metadata gives a usable 0.5 um/px."""
    folder = tmp_path / "slides"
    folder.mkdir()
    write_synthetic_slide(folder / "good.svs", 256, 192, mpp=0.5, levels=1, seed=1)
    return folder


def run(slides: Path, out: Path, *args: str) -> int:
    return main(["run", str(slides), "--out", str(out), *NULL_MODEL_RUN_OPTIONS, *args])


def summary_by_file(out: Path) -> dict[str, dict]:
    summary = json.loads((out / "run_summary.json").read_text())
    return {Path(s["slide"]).name: s for s in summary["slides"]}


@pytest.mark.parametrize(
    ("args", "value", "source"),
    [
        (["--mpp", "50"], "50.0", "(set on the command line)"),
        (["--mpp", "0.01"], "0.01", "(set on the command line)"),
        (["--set", "slide.mpp=50"], "50.0", "(set by --set slide.mpp=50)"),
    ],
)
def test_an_mpp_option_out_of_range_stops_the_run_before_any_slide(slides, tmp_path, caplog, args, value, source):
    out = tmp_path / "results"
    assert run(slides, out, *args) == EXIT_USAGE
    message = f"slide.mpp: {value} is outside 0.1-2 um/px, where nuclei can be resolved"
    assert message in caplog.text and "(--mpp)" in caplog.text and source in caplog.text, caplog.text
    assert not out.exists()  # nothing read, nothing written: earlier results and cohort.csv stay as they were


def test_an_mpp_option_in_range_is_used(slides, tmp_path):
    out = tmp_path / "results"
    assert run(slides, out, "--mpp", "2") == 0
    report = json.loads((out / "good" / "report.json").read_text())
    assert report["slide"]["mpp_used"] == 2.0 and report["slide"]["mpp_source"] == "--mpp override"


def test_a_slide_whose_metadata_is_out_of_range_fails_alone(slides, tmp_path, capsys):
    write_synthetic_slide(slides / "coarse.svs", 256, 192, mpp=5.0, levels=1, seed=2)
    write_synthetic_slide(slides / "fine.svs", 256, 192, mpp=0.05, levels=1, seed=3)
    out = tmp_path / "results"
    assert run(slides, out) == EXIT_FAILED
    status = summary_by_file(out)
    assert status["good.svs"]["status"] == "ok"
    for name, value in (("coarse.svs", "5"), ("fine.svs", "0.05")):
        error = status[name]["error"]
        assert status[name]["status"] == "failed"
        assert f"{name}: pixel size {value} um/px (from the slide's metadata, openslide.mpp-x/y)" in error
        assert "is outside 0.1-2 um/px, where nuclei can be resolved" in error
        assert not (out / Path(name).stem).exists()
    ledger = {row["name"]: row for row in csv.DictReader(io.StringIO((out / "cohort.csv").read_text()))}
    assert ledger["good"]["status"] == "ok" and ledger["coarse"]["status"] == "failed"
    assert "pixel size 5 um/px" in ledger["coarse"]["error"]
    assert "pixel size 5 um/px" in capsys.readouterr().out
    # --mpp states the pixel size for the slide whose metadata is wrong
    assert main(["run", str(slides / "coarse.svs"), "--out", str(out), "--mpp", "0.5", *NULL_MODEL_RUN_OPTIONS]) == 0


def test_the_reader_and_info_apply_the_same_rule(slides):
    path = slides / "good.svs"
    with pytest.raises(PixelSizeError, match=r"good\.svs: pixel size 50 um/px \(from --mpp\) is outside 0\.1-2"):
        SlideReader(path, 0.5, mpp_override=50)
    text = describe(inspect_slide(path), model_mpp=0.5, mpp_override=0.05)
    assert "At 0.5 um/px: not read:" in text and "pixel size 0.05 um/px (from --mpp)" in text


@pytest.mark.shared
def test_absurd_resolution_tags_fail_that_slide_only(shared_dir, slides, tmp_path):
    """boxes.tiff records 72 dpi (352.8 um/px), a generic TIFF default and not its optics: it counts as
    no pixel size at all, so the slide fails asking for --mpp while the good slide completes."""
    shutil.copy(shared_dir / "slides" / "fixtures" / "boxes.tiff", slides / "boxes.tiff")
    out = tmp_path / "results"
    assert run(slides, out) == EXIT_FAILED
    status = summary_by_file(out)
    assert status["good.svs"]["status"] == "ok"
    assert status["boxes.tiff"]["status"] == "failed"
    assert "boxes.tiff: the slide records no microns-per-pixel" in status["boxes.tiff"]["error"]
    assert "352.8 um/px" in status["boxes.tiff"]["error"] and "pass --mpp" in status["boxes.tiff"]["error"]
