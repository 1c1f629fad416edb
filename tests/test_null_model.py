"""The null model: colour-deconvolution probabilities standing in for the network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2hed

from wsi_grunet.model.null_model import NullModel, haematoxylin

HAEMATOXYLIN_RGB = (60, 40, 140)  # dark purple nucleus
GLASS_RGB = (242, 240, 244)
EOSIN_RGB = (235, 150, 190)  # pink stroma/cytoplasm


def synthetic_tile(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Pink background with glass on the right and a few purple discs; returns (rgb, nucleus mask)."""
    yy, xx = np.mgrid[:size, :size]
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[:] = EOSIN_RGB
    rgb[:, size * 3 // 4 :] = GLASS_RGB
    mask = np.zeros((size, size), bool)
    for cy, cx in [(20, 20), (50, 30), (70, 60), (25, 55)]:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < 7**2
    rgb[mask] = HAEMATOXYLIN_RGB
    return rgb, mask


def test_haematoxylin_equals_rgb2hed():
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    expected = np.maximum(rgb2hed(rgb)[..., 0], 0.0)
    np.testing.assert_allclose(haematoxylin(rgb), expected, rtol=1e-5, atol=1e-6)


def test_predictor_interface():
    model = NullModel()
    assert model.device == torch.device("cpu")
    assert model.mpp == 0.5 and model.sha256 == "null-model"
    info = model.describe()
    assert info["device"] == "cpu" and "null-model" in info["model"]
    rgb, _ = synthetic_tile()
    out = model.predict(np.stack([rgb, rgb[::-1]]))
    assert set(out) == {"prob"}
    assert out["prob"].dtype == np.float32 and out["prob"].shape == (2, 96, 96)
    assert np.all((out["prob"] >= 0) & (out["prob"] <= 1))
    np.testing.assert_array_equal(out["prob"][1], out["prob"][0][::-1])
    with pytest.raises(ValueError, match="uint8"):
        model.predict(rgb[None].astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        model.predict(rgb)


def test_synthetic_nuclei_high_glass_and_stroma_low():
    rgb, mask = synthetic_tile()
    prob = NullModel().predict(rgb[None])["prob"][0]
    inner = ndi.binary_erosion(mask, iterations=2)
    outer = ~ndi.binary_dilation(mask, iterations=3)
    assert prob[inner].min() > 0.9
    assert prob[outer].max() < 0.1
    assert prob[:, 80:].max() < 0.05  # glass


def test_output_is_local():
    """Changing pixels far away never changes a pixel's probability (tile invariance)."""
    rgb, _ = synthetic_tile()
    model = NullModel()
    base = model.predict(rgb[None])["prob"][0]
    changed = rgb.copy()
    changed[:, 60:] = HAEMATOXYLIN_RGB
    other = model.predict(changed[None])["prob"][0]
    r = NullModel.radius_px
    np.testing.assert_array_equal(base[:, : 60 - r], other[:, : 60 - r])
    # A crop gives the same values away from the crop's edge.
    crop = model.predict(rgb[None, 10:70, 5:90])["prob"][0]
    np.testing.assert_array_equal(crop[r:-r, r:-r], base[10 + r : 70 - r, 5 + r : 90 - r])


@pytest.mark.shared
def test_real_tile_nuclei_high_background_low(shared_dir):
    """A MoNuSeg image at 0.5 um/px: annotated nuclei mostly high, non-nucleus pixels mostly low."""
    name = "TCGA-21-5784-01Z-00-DX1"
    root = shared_dir / "data" / "monuseg2018-train"
    image = Image.open(root / "images" / f"{name}.tif").convert("RGB").resize((500, 500), Image.BILINEAR)
    truth = Image.open(root / "masks_binary" / f"{name}.png").resize((500, 500), Image.NEAREST)
    nuclei = np.asarray(truth) > 0
    prob = NullModel().predict(np.asarray(image)[None])["prob"][0]
    inner = ndi.binary_erosion(nuclei, iterations=2)
    far = ~ndi.binary_dilation(nuclei, iterations=4)
    assert np.quantile(prob[inner], 0.75) > 0.5
    assert np.quantile(prob[far], 0.95) < 0.2
    predicted = prob > 0.5
    precision = (predicted & nuclei).sum() / predicted.sum()
    assert precision > 0.7  # what it finds are nuclei (their dark cores)


@pytest.mark.shared
def test_real_glass_is_low(shared_dir):
    image = Image.open(shared_dir / "data" / "he_tiles" / "tiles" / "almost-white-1.png").convert("RGB")
    prob = NullModel().predict(np.asarray(image)[None, :256, :256])["prob"][0]
    assert np.quantile(prob, 0.99) < 0.05
