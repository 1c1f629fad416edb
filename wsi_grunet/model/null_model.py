"""A cheap stand-in for the network: nucleus probability from colour deconvolution.

The haematoxylin optical density of each pixel (the ``H`` channel of
``skimage.color.rgb2hed``, computed with per-channel lookup tables, which gives the same values),
lightly smoothed, minus its local mean, goes through a fixed logistic map. There are no image-wide statistics: a pixel's
output depends only on the input within ``NullModel.radius_px`` pixels of it, so tiles give the same
probabilities as one pass over the slide (except within that radius of a tile's edge, far inside the
halo). It is for benchmarking everything around the model and for pipeline tests; it is not a
nucleus segmentation model: it finds the dark cores of nuclei (pixel Dice about 0.26 on the MoNuSeg
2018 training images at 0.5 um/px), not their full extent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.color import hed_from_rgb

# Haematoxylin optical density above its local mean at which the probability is 0.5, and the logistic
# scale. Subtracting the local mean (Gaussian, BACKGROUND_SIGMA_PX) keeps dense, dark tissue from merging
# into slide-sized blobs: on CMU-1-Small-Region no component is wider than 64 px (the default halo).
H_MIDPOINT = 0.04
H_SCALE = 0.008
SMOOTHING_SIGMA_PX = 1.0
BACKGROUND_SIGMA_PX = 6.0
_TRUNCATE = 2.0
_LOG_ADJUST = np.log(1e-6)


def _haematoxylin_tables() -> np.ndarray:
    """(3, 256) float32: channel c of value v contributes ``table[c, v]`` to the H optical density.

    rgb2hed computes ``log(max(v / 255, 1e-6)) / log(1e-6) @ hed_from_rgb``; its H column is a sum of
    one term per channel, so three 256-entry tables reproduce it exactly."""
    levels = np.maximum(np.arange(256, dtype=np.float64) / 255.0, 1e-6)
    density = np.log(levels) / _LOG_ADJUST
    return (density[None, :] * hed_from_rgb[:, 0][:, None]).astype(np.float32)


_TABLES = _haematoxylin_tables()


def haematoxylin(tiles: np.ndarray) -> np.ndarray:
    """H optical density (rgb2hed's first channel, clipped at 0) of uint8 RGB (..., 3) -> float32 (...)."""
    if tiles.dtype != np.uint8 or tiles.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB with a last axis of 3, got {tiles.dtype} {tiles.shape}")
    h = _TABLES[0][tiles[..., 0]]
    h += _TABLES[1][tiles[..., 1]]
    h += _TABLES[2][tiles[..., 2]]
    return np.maximum(h, 0.0, out=h)


class NullModel:
    """Predictor-like object: ``predict(uint8 (N, H, W, 3)) -> {"prob": float32 (N, H, W)}``."""

    sha256 = "null-model"
    # Locality radius of one output pixel: the smoothing, then the local mean of the smoothed values.
    radius_px = int(np.ceil(_TRUNCATE * SMOOTHING_SIGMA_PX)) + int(np.ceil(_TRUNCATE * BACKGROUND_SIGMA_PX))

    def __init__(self, mpp: float = 0.5) -> None:
        self.device = torch.device("cpu")
        self.mpp = float(mpp)

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        tiles = np.asarray(tiles)
        if tiles.ndim != 4:
            raise ValueError(f"tiles must be (N, H, W, 3) uint8, got shape {tiles.shape}")
        prob = np.empty(tiles.shape[:3], dtype=np.float32)
        for k, tile in enumerate(tiles):
            h = ndi.gaussian_filter(haematoxylin(tile), SMOOTHING_SIGMA_PX, mode="nearest", truncate=_TRUNCATE)
            h -= ndi.gaussian_filter(h, BACKGROUND_SIGMA_PX, mode="nearest", truncate=_TRUNCATE)
            # Logistic map in float32; exp of large arguments saturates to inf -> probability 0, as it should.
            with np.errstate(over="ignore"):
                np.multiply(h - H_MIDPOINT, -1.0 / H_SCALE, out=h)
                np.exp(h, out=h)
            h += 1.0
            np.reciprocal(h, out=prob[k])
        return {"prob": prob}

    def describe(self) -> dict[str, Any]:
        return {
            "device": "cpu",
            "dtype": "float32",
            "layout": "NHWC",
            "tta": "none",
            "threads": 1,
            "model": "null-model (haematoxylin colour deconvolution, not GRU-Net)",
            "h_midpoint": H_MIDPOINT,
            "h_scale": H_SCALE,
            "smoothing_sigma_px": SMOOTHING_SIGMA_PX,
        }
