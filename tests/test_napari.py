"""The OME-Zarr of a real pipeline run, with the RGB slide, opened as a person would: in napari with its
OME-Zarr reader plugin (one open of the folder), under a virtual X display. Also the RGB content itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

from wsi_grunet.cli import main
from wsi_grunet.geometry import Box
from wsi_grunet.slide.reader import SlideReader
from wsi_grunet.tiling import plan_tiles

from synthetic import write_synthetic_slide

MPP = 0.5
LEVELS = 3

# Runs in a child process (Qt must own its main thread and must not leak into the other tests).
# argv: zarr path, screenshot path; prints one JSON line with what napari made of the store.
VIEWER_SCRIPT = r"""
import json, sys
path, shot = sys.argv[1], sys.argv[2]
try:
    import napari
    viewer = napari.Viewer(show=True, title="wsi-grunet")
except Exception as exc:
    print("NAPARI_CANNOT_START", repr(exc))
    sys.exit(3)
viewer.window.resize(1100, 800)
layers = viewer.open(path, plugin="napari-ome-zarr")
out = []
for layer in viewer.layers:
    out.append({
        "type": type(layer).__name__, "name": layer.name, "scale": [float(s) for s in layer.scale],
        "units": [str(u) for u in layer.units], "multiscale": bool(layer.multiscale),
        "levels": len(layer.data) if layer.multiscale else 1,
        "level_shapes": [list(level.shape) for level in layer.data] if layer.multiscale else [list(layer.data.shape)],
        "downsample": layer.downsample_factors.tolist() if layer.multiscale else [[1.0, 1.0]],
        "extent": layer.extent.world.tolist(), "blending": layer.blending, "visible": bool(layer.visible),
    })
for layer in viewer.layers:
    if type(layer).__name__ == "Labels":
        layer.visible = True  # the plugin opens labels hidden; the screenshot shows them
        layer.opacity = 0.35
viewer.reset_view()
image = viewer.screenshot(path=shot, canvas_only=True, flash=False)
print("LAYERS " + json.dumps({"layers": out, "screenshot": list(image.shape)}))
viewer.close()
"""


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory, tiny_checkpoint) -> dict:
    """A narrow untrained GRU-Net (fast on CPU: this checks the plumbing, not the segmentation) on a
    synthetic slide with glass around the tissue, so some tiles are not run and their RGB is written on
    its own; RGB slide on."""
    root = tmp_path_factory.mktemp("napari")
    weights = tiny_checkpoint
    slide = root / "tissue.svs"
    write_synthetic_slide(slide, 1400, 1000, mpp=MPP, levels=2, seed=3)
    out = root / "results"
    code = main(
        [
            "run",
            str(slide),
            "--out",
            str(out),
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--workers",
            "1",
            "--tile-size",
            "384",
            "--halo",
            "64",
            "--quiet",
            "--set",
            "output.chunk=64",
            f"output.pyramid_levels={LEVELS}",
            "output.slide_rgb=true",
            "tissue.thumbnail_mpp=2",
            "tissue.min_region_um2=500",
            "tissue.dilation_um=0",
        ]
    )
    assert code == 0
    folder = out / "tissue"
    return {
        "slide": slide,
        "folder": folder,
        "zarr": folder / "tissue.ome.zarr",
        "report": json.loads((folder / "report.json").read_text()),
    }


def test_run_writes_the_rgb_slide_into_the_ome_zarr(rgb_run):
    report = rgb_run["report"]
    root = zarr.open_group(str(rgb_run["zarr"]), mode="r")
    level0 = root["0"]
    reader = SlideReader(rgb_run["slide"], MPP)
    assert level0.shape == (4, *reader.model_shape)
    expected = reader.read(Box(0, 0, *reader.model_shape))
    rgb = np.moveaxis(level0[1:], 0, -1)
    # The slide at model resolution everywhere, tiles without tissue included (none left at the fill value).
    assert np.abs(rgb.astype(int) - expected.astype(int)).max() <= 1
    assert (rgb.sum(axis=2) > 0).all()
    # The probability stays channel 0: where labels are, it is above the model's threshold (0.5).
    labels = root["labels/nuclei/0"][:]
    assert len(np.unique(labels[labels > 0])) == report["counts"]["nuclei"]
    if report["counts"]["nuclei"]:
        assert np.median(level0[0][labels > 0]) >= 127
    plan = json.loads((rgb_run["folder"] / "plan.json").read_text())
    glass = [
        t
        for t in plan_tiles(tuple(plan["model_shape"]), plan["tile_size"], plan["halo"])
        if t.index not in plan["tissue_tiles"]
    ]
    assert glass, "want tiles without tissue"
    for tile in glass:  # not run: probability 0, but the slide's pixels are there
        assert not level0[0][tile.core.slices()].any()
        assert (rgb[tile.core.slices()].min(axis=2) > 200).mean() > 0.5  # mostly glass
    for level in range(1, LEVELS):
        assert root[str(level)].shape[0] == 4
        assert root[str(level)].shape[1:] == root[f"labels/nuclei/{level}"].shape
    assert report["outputs"]["zarr"] == "tissue.ome.zarr"


def _display_command() -> list[str]:
    if shutil.which("xvfb-run"):
        return ["xvfb-run", "-a", "-s", "-screen 0 1400x1000x24"]
    if os.environ.get("DISPLAY"):
        return []
    pytest.skip("napari needs a display: neither xvfb-run (Debian xvfb) nor DISPLAY is available")


def _open_in_napari(zarr_path, tmp_path) -> tuple[list[dict], np.ndarray]:
    """napari's layers for one open of ``zarr_path`` (what the plugin made of it) and a screenshot."""
    pytest.importorskip("napari", reason="napari is not installed (it is in the test extra)")
    pytest.importorskip("napari_ome_zarr", reason="the napari-ome-zarr reader plugin is not installed")
    shot = tmp_path / "napari.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb", "NAPARI_CONFIG": str(tmp_path / "napari-settings.yaml")}
    done = subprocess.run(
        [*_display_command(), sys.executable, "-c", VIEWER_SCRIPT, str(zarr_path), str(shot)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    if done.returncode == 3 and "NAPARI_CANNOT_START" in done.stdout:
        pytest.skip(f"napari cannot start here: {done.stdout.strip()[-500:]}")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    line = next(line for line in done.stdout.splitlines() if line.startswith("LAYERS "))
    from PIL import Image

    return json.loads(line[len("LAYERS ") :])["layers"], np.asarray(Image.open(shot).convert("RGB")).astype(int)


def _check_micrometre_pyramids(layers: list[dict], zarr_path, levels: int) -> None:
    """Every layer: all levels, MPP um per level-0 pixel, MPP * 2**i at level i, one common extent."""
    root = zarr.open_group(str(zarr_path), mode="r")
    shapes = [root[f"labels/nuclei/{i}"].shape for i in range(levels)]
    for layer in layers:
        assert layer["multiscale"] and layer["levels"] == levels, layer["name"]
        assert [tuple(s[-2:]) for s in layer["level_shapes"]] == shapes
        assert layer["scale"] == [MPP, MPP]  # micrometres per level-0 pixel
        assert layer["units"] == ["micrometer", "micrometer"]
        # Level i is shown at MPP * 2**i micrometres per pixel (up to the rounding of odd level sizes).
        for i, factors in enumerate(layer["downsample"]):
            for axis, factor in enumerate(factors):
                assert factor == pytest.approx(2**i, rel=1.0 / shapes[i][axis] + 1e-9)
        assert layer["extent"] == layers[0]["extent"]  # every layer covers the same micrometres
    height, width = shapes[0]
    assert layers[0]["extent"] == [[0.0, 0.0], [(height - 1) * MPP, (width - 1) * MPP]]


def test_napari_shows_probability_rgb_and_labels_in_micrometres(rgb_run, tmp_path):
    layers, pixels = _open_in_napari(rgb_run["zarr"], tmp_path)
    images = [layer for layer in layers if layer["type"] == "Image"]
    labels = [layer for layer in layers if layer["type"] == "Labels"]
    # One open of the folder: the probability and the three colour channels, and the nuclei labels.
    assert [layer["name"] for layer in images] == [
        f"tissue: {c}" for c in ("nucleus probability", "red", "green", "blue")
    ]
    assert len(labels) == 1 and labels[0]["name"].endswith("nuclei")
    # The colours add up to the slide: the first channel is opaque, the others are added.
    assert [layer["blending"] for layer in images] == ["translucent_no_depth", "additive", "additive", "additive"]
    _check_micrometre_pyramids(images + labels, rgb_run["zarr"], LEVELS)
    # The screenshot shows the slide (pink tissue, pale glass), not an empty canvas.
    assert min(pixels.shape[:2]) > 200
    assert pixels.std() > 20 and (pixels.sum(axis=2) > 500).mean() > 0.05


def test_napari_shows_probability_and_labels_of_a_default_run(tmp_path):
    """Without the RGB slide (the default): one probability image and the labels, same frames. The null
    model (haematoxylin stand-in, no network) finds the synthetic nuclei, so the labels hold real ids."""
    slide = tmp_path / "discs.svs"
    write_synthetic_slide(slide, 700, 500, mpp=MPP, levels=1, seed=4)
    out = tmp_path / "results"
    args = ["run", str(slide), "--out", str(out), "--weights", "null-model", "--workers", "1", "--tile-size", "256"]
    args += ["--halo", "64", "--outputs", "zarr", "--quiet", "--set", "output.chunk=64", "output.pyramid_levels=3"]
    assert main(args) == 0
    zarr_path = out / "discs" / "discs.ome.zarr"
    report = json.loads((out / "discs" / "report.json").read_text())
    assert report["outputs"] == {"zarr": "discs.ome.zarr"} and report["counts"]["nuclei"] > 10
    layers, pixels = _open_in_napari(zarr_path, tmp_path)
    assert [(layer["type"], layer["name"]) for layer in layers] == [
        ("Image", "discs.ome"),  # napari names a store without channel names after its folder
        ("Labels", "labels/labels/nuclei"),
    ]
    _check_micrometre_pyramids(layers, zarr_path, 3)
    assert pixels.std() > 10  # nuclei bright on a dark background
