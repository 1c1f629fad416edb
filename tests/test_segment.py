"""``segment`` on ordinary images: nuclei found at the input's own resolution, in the right places and
at the right physical sizes whatever the input's pixel size (packaged weights on synthetic discs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_grunet.cli import main
from wsi_grunet.config import DEFAULT_HALO
from wsi_grunet.model.checkpoint import (
    load_checkpoint,
    packaged_weights,
    untrained_bundle,
)
from wsi_grunet.model.grunet import GRUNetConfig
from wsi_grunet.model.predictor import Predictor, predict_image
from wsi_grunet.postprocess import PostprocessParams
from wsi_grunet.segment import (
    label_maps,
    predict_tiled,
    resize_map,
    segment_folder,
    segment_image,
)
from wsi_grunet.tiling import plan_tiles

from synthetic import synthetic_rgb

# The same physical field (192 x 128 um) at two pixel sizes; synthetic_rgb places its discs in
# micrometres, so both images hold the same nuclei.
FIELD_UM = (192.0, 128.0)


@pytest.fixture(scope="module")
def weights() -> Path:
    path = packaged_weights()
    assert path is not None, "the packaged weights are missing"
    return path


def _field(mpp: float, seed: int = 4) -> tuple[np.ndarray, dict]:
    return synthetic_rgb(round(FIELD_UM[0] / mpp), round(FIELD_UM[1] / mpp), mpp=mpp, seed=seed)


def _match(labels: np.ndarray, truth: dict) -> list[tuple[float, float, float]]:
    """For each true disc: (centroid error px, found area um^2, true area um^2); the found nucleus
    is the label under the disc's centre."""
    mpp = truth["mpp"]
    rows = []
    for (cy, cx), radius in zip(truth["centres"], truth["radii"]):
        k = labels[int(cy), int(cx)]
        assert k > 0, f"no nucleus at the disc centred at ({cy:.1f}, {cx:.1f}) px"
        ys, xs = np.nonzero(labels == k)
        error = float(np.hypot(ys.mean() + 0.5 - cy, xs.mean() + 0.5 - cx))
        rows.append((error, len(ys) * mpp**2, np.pi * (radius * mpp) ** 2))
    return rows


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_segment_places_and_sizes_nuclei_at_either_pixel_size(weights, tmp_path, mpp):
    rgb, truth = _field(mpp)
    assert len(truth["radii"]) >= 12
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(rgb).save(images / "field.png")
    out = tmp_path / "labels"
    # tiles smaller than the image at 0.25 um/px (384 x 256 model pixels): the tiled path runs
    code = main(
        [
            "segment",
            str(images),
            "--out",
            str(out),
            "--mpp",
            str(mpp),
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--quiet",
            "--set",
            "tiling.tile_size=256",
            "tiling.halo=64",
            "output.chunk=64",
        ]
    )
    assert code == 0
    labels = np.asarray(Image.open(out / "field.png"))
    assert labels.shape == rgb.shape[:2] and labels.dtype == np.uint16
    assert labels.max() == len(truth["radii"]), "one nucleus per disc, no extras"
    rows = _match(labels.astype(np.int32), truth)
    errors = np.array([r[0] for r in rows])
    ratio = np.array([r[1] / r[2] for r in rows])
    assert errors.max() < 1.5, f"centroids off by up to {errors.max():.2f} px"
    assert np.all(np.abs(ratio - 1) < 0.10), f"area ratios {np.round(ratio, 3)}"


def test_same_nuclei_at_both_pixel_sizes(weights):
    """Centroids (um) and areas (um^2) agree between the 0.25 and the 0.5 um/px copies."""
    bundle = load_checkpoint(weights)
    predictor = Predictor(bundle, device="cpu", threads=1)
    params = PostprocessParams.from_dict({**bundle.metadata["postprocess"], "threshold": bundle.threshold})
    found = {}
    for mpp in (0.25, 0.5):
        rgb, truth = _field(mpp)
        labels, prob = segment_image(predictor, rgb, mpp, params, tile_size=256, halo=64)
        assert labels.shape == prob.shape == rgb.shape[:2]
        found[mpp] = np.array([r[1] for r in _match(labels, truth)])
    np.testing.assert_allclose(found[0.25], found[0.5], rtol=0.10)


def test_input_resolution_labels_come_from_the_upsampled_probability(weights):
    bundle = load_checkpoint(weights)
    predictor = Predictor(bundle, device="cpu", threads=1)
    params = PostprocessParams.from_dict({**bundle.metadata["postprocess"], "threshold": bundle.threshold})
    rgb, truth = _field(0.25)
    maps = {"prob": predict_image(predictor, np.asarray(Image.fromarray(rgb).reduce(2)))["prob"]}
    labels, prob = label_maps(maps, rgb.shape[:2], 0.25, bundle.mpp, params, at="input")
    assert prob.shape == rgb.shape[:2]
    # foreground is exactly the thresholded upsampled probability (no holes at this size)
    np.testing.assert_array_equal(labels > 0, prob > params.threshold)
    # labels resampled from model resolution instead follow the 2x2 pixel blocks of the model grid
    coarse, _ = label_maps(maps, rgb.shape[:2], 0.25, bundle.mpp, params, at="model")
    assert np.array_equal(coarse[::2, ::2], coarse[1::2, 1::2])
    assert not np.array_equal(labels[::2, ::2], labels[1::2, 1::2])
    assert coarse.max() == labels.max() == len(truth["radii"])


def test_resize_map_aligns_pixel_centres():
    ramp = np.tile(np.arange(8, dtype=np.float32) / 8, (4, 1))
    up = resize_map(ramp, (8, 16))
    assert up.shape == (8, 16) and up.dtype == np.float32
    # pixel centres: input column j sits at output column 2j + 0.5, so the mean of outputs 2j and 2j+1 is j/8
    np.testing.assert_allclose((up[:, 2:-2:2] + up[:, 3:-2:2]) / 2, ramp[:, 1:-1].repeat(2, 0), atol=1e-6)
    down = resize_map(up, (4, 8))
    np.testing.assert_allclose(down[:, 1:-1], ramp[:, 1:-1], atol=1e-6)
    np.testing.assert_array_equal(resize_map(ramp, (4, 8)), ramp)


def test_distance_head_maps_are_resampled_too(one_torch_thread):
    bundle = untrained_bundle(GRUNetConfig(base_filters=4, attention_width=8, aux_distance_head=True))
    predictor = Predictor(bundle, device="cpu", amp="fp32", threads=1)
    rgb = np.random.default_rng(0).integers(0, 256, size=(90, 70, 3), dtype=np.uint8)
    labels, prob = segment_image(predictor, rgb, 0.25, PostprocessParams(threshold=0.45))
    assert labels.shape == prob.shape == (90, 70) and labels.dtype == np.int32


class _RecordingPredictor:
    """The real predictor, with the tile shapes it was given recorded."""

    def __init__(self, predictor: Predictor) -> None:
        self.inner, self.bundle, self.device, self.shapes = predictor, predictor.bundle, predictor.device, []

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        self.shapes.append(tiles.shape)
        return self.inner.predict(tiles)


def test_segment_folder_uses_the_given_tiles_and_matches_one_pass(weights, tmp_path):
    """The tiles given are the tiles used, and with the default 128-px halo stitching them is one pass.

    The halo holds the network's whole context, so a tile's core sees exactly what one pass over the
    image sees, provided that pass has the same white margin beyond the image that the edge tiles
    read. What is left is float rounding: at fp32 the summation order of the convolutions depends on
    the CPU's vector width (AVX2, AVX-512, AMX pick other kernel blockings), so equality holds to
    about 1e-6 and the test allows 1e-4. bf16 is not used here: its rounding depends on the tile's
    shape and the CPU, differences of up to 1e-2 between tile shapes on the same CPU."""
    bundle = load_checkpoint(weights)
    recording = _RecordingPredictor(Predictor(bundle, device="cpu", amp="fp32", threads=1))
    rgb, _ = _field(0.5, seed=9)  # 384 x 256 model pixels
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb).save(tmp_path / "in" / "a.png")
    params = PostprocessParams.from_dict({**bundle.metadata["postprocess"], "threshold": bundle.threshold})
    tile, halo = 352, DEFAULT_HALO  # cores of 96 px: 4 x 3 tiles
    results = segment_folder(
        tmp_path / "in",
        tmp_path / "out",
        0.5,
        bundle,
        params,
        recording,  # type: ignore[arg-type]
        progress=False,
        tile_size=tile,
        halo=halo,
        batch_size=2,
    )
    assert results[0]["status"] == "ok"
    used = sorted(shape[1:3] for shape in recording.shapes for _ in range(shape[0]))
    # the bottom row's cores are 64 px high, so those tiles read only their clipped core and halo
    assert used == sorted([(tile, tile)] * 8 + [(320, tile)] * 4)
    assert used == sorted(t.read.shape for t in plan_tiles(rgb.shape[:2], tile, halo))
    assert max(shape[0] for shape in recording.shapes) == 2
    tiled = predict_tiled(recording.inner, rgb, tile, halo)["prob"]
    margin = ((halo, halo), (halo, halo), (0, 0))
    single = predict_image(recording.inner, np.pad(rgb, margin, constant_values=255))["prob"][halo:-halo, halo:-halo]
    assert np.abs(tiled - single).max() <= 1e-4
