"""TIAToolbox interoperability, checked in TIAToolbox's own environment (``.venv-tiatoolbox``).

The core environment cannot hold TIAToolbox (it declares torch<2.13 and needs torchvision), so these tests
run scripts from tests/tiatoolbox_scripts/ with ``.venv-tiatoolbox/bin/python`` and compare their JSON
reports with what wsi-grunet computes here. They skip when that environment is absent
(``bash benchmarks/setup_tiatoolbox_env.sh`` creates it).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shapely.geometry import shape

from wsi_grunet.cli import main

from synthetic import write_synthetic_slide

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "tiatoolbox_scripts"
TIA_PYTHON = ROOT / ".venv-tiatoolbox" / "bin" / "python"
TIA_CLI = ROOT / ".venv-tiatoolbox" / "bin" / "wsi-grunet"


def _tiatoolbox_env() -> str | None:
    """Why the TIAToolbox environment cannot be used, or None when it can."""
    if not TIA_PYTHON.exists():
        return f"{TIA_PYTHON} absent (run `bash benchmarks/setup_tiatoolbox_env.sh`)"
    probe = subprocess.run(
        [str(TIA_PYTHON), "-c", "import tiatoolbox, wsi_grunet.interop"], capture_output=True, text=True
    )
    if probe.returncode:
        return f"tiatoolbox or wsi_grunet not importable in {TIA_PYTHON}: {probe.stderr.strip()[-300:]}"
    return None


REASON = _tiatoolbox_env()
needs_tiatoolbox = pytest.mark.skipif(REASON is not None, reason=str(REASON))


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.mark.skipif(importlib.util.find_spec("tiatoolbox") is not None, reason="tiatoolbox is installed here")
def test_export_in_core_env_fails_with_install_message(tmp_path, capsys, caplog):
    assert main(["export", str(tmp_path), "--to", "tiatoolbox-store"]) == 1
    err = capsys.readouterr().err + caplog.text
    assert "setup_tiatoolbox_env.sh" in err and "Traceback" not in err
    with pytest.raises(ImportError, match=r"wsi-grunet\[tiatoolbox\]"):
        import wsi_grunet.interop  # noqa: F401


@needs_tiatoolbox
@pytest.mark.slow
@pytest.mark.shared
def test_tiatoolbox_engine_runs_grunet_like_our_predictor(tiny_checkpoint, shared_dir, tmp_path):
    """SemanticSegmentor with the adapter, patch mode and WSI mode on CMU-1-Small-Region, fp32 on CPU: its
    nucleus probability equals wsi-grunet's Predictor on the same pixels, and the WSI output covers the
    slide at 0.5 um/px as wsi-grunet's reader sees it."""
    slide = shared_dir / "slides" / "CMU-1-Small-Region.svs"
    if not slide.exists():
        pytest.skip(f"{slide} absent")
    out = tmp_path / "parity.json"
    _run(
        [
            str(TIA_PYTHON),
            str(SCRIPTS / "engine_parity.py"),
            "--weights",
            str(tiny_checkpoint.with_suffix(".safetensors")),
            "--slide",
            str(slide),
            "--out",
            str(out),
            "--patch",
            "512",
            "--halo",
            "64",
        ]
    )
    report = json.loads(out.read_text())
    patch = report["patch_mode"]
    assert patch["shape"] == [384, 384]
    assert patch["prob_std"] > 1e-4  # not a constant map: the comparison means something
    assert patch["max_abs_diff"] < 1e-4
    wsi = report["wsi_mode"]
    assert wsi["tiatoolbox_model_shape"] == wsi["wsi_grunet_model_shape"]
    assert wsi["shape"] == wsi["wsi_grunet_model_shape"]
    assert wsi["patches_compared"] == 6
    assert wsi["max_abs_diff"] < 1e-4


@needs_tiatoolbox
@pytest.mark.slow
def test_exported_store_reads_back_in_tiatoolbox(tmp_path):
    """A real run (null model on a synthetic slide) exported with `wsi-grunet export` in the TIAToolbox env:
    TIAToolbox's SQLiteStore holds every nucleus, same ids, keys and areas, polygons inside the slide."""
    width, height = 700, 500
    slide = tmp_path / "discs.svs"
    write_synthetic_slide(slide, width, height, mpp=0.5, levels=1, seed=4)
    results = tmp_path / "results"
    args = [
        "run",
        str(slide),
        "--out",
        str(results),
        "--weights",
        "null-model",
        "--workers",
        "1",
        "--tile-size",
        "384",
        "--halo",
        "64",
        "--outputs",
        "geojson,parquet",
        "--quiet",
    ]
    assert main(args) == 0
    slide_dir = results / "discs"
    with gzip.open(slide_dir / "nuclei.geojson.gz", "rt") as handle:
        features = json.load(handle)["features"]
    assert len(features) > 10
    table = pq.read_table(slide_dir / "nuclei.parquet").to_pydict()

    done = _run([str(TIA_CLI), "export", str(results), "--to", "tiatoolbox-store"])
    store = slide_dir / "nuclei.db"
    assert f"{len(features)} nuclei" in done.stdout and store.exists()
    assert not list(slide_dir.glob("*.partial-*"))
    back = json.loads(
        _run([str(TIA_PYTHON), str(SCRIPTS / "read_store.py"), str(store), str(width), str(height)]).stdout
    )

    assert back["count"] == len(features) == len(table["id"])
    assert back["in_slide_query"] == len(features)
    rows = {row["key"]: row for row in back["rows"]}
    assert set(rows) == {f["id"] for f in features}
    for feature in features:
        row = rows[feature["id"]]
        measurements = feature["properties"]["measurements"]
        assert row["nucleus_id"] == measurements["Nucleus id"]
        assert row["area_px"] == pytest.approx(shape(feature["geometry"]).area, rel=1e-9)
        assert row["properties"]["area_um2"] == measurements["Area um^2"]
        assert row["valid"] and row["type"] in ("Polygon", "MultiPolygon")
        x0, y0, x1, y1 = row["bounds"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert sorted(r["nucleus_id"] for r in rows.values()) == sorted(table["id"])
    # area in um^2 against the store's pixel area at 0.5 um/px (level 0 is the model resolution here)
    for row in list(rows.values())[:20]:
        assert row["properties"]["area_um2"] == pytest.approx(row["area_px"] * 0.25, rel=0.02)


@needs_tiatoolbox
def test_export_of_a_folder_without_results_fails_clearly(tmp_path):
    done = subprocess.run(
        [str(TIA_CLI), "export", str(tmp_path), "--to", "tiatoolbox-store"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode != 0 and "no slide results" in done.stderr and "Traceback" not in done.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
