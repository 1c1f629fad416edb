"""Tissue detection on a low-resolution image of the slide (pure numpy/scipy/scikit-image).

Glass is bright and grey; haematoxylin and eosin both colour what they stain. The mask therefore
thresholds the chroma (max - min of R, G, B) with Otsu's method, clamped to a fixed range: the
floor keeps blank or almost-white glass empty (Otsu always splits an image in two, even pure
noise), and the ceiling keeps pale eosin when an image is all tissue (Otsu would then split pink
from purple). Grey or black objects (dust, scratches, black ink, slide edges) have no chroma and
are not tissue. Green and blue inks are recognised because both stains absorb green light most:
stained tissue has red above green, ink does not. Red ink is kept, since its hue overlaps that of
erythrocytes. The thresholded image is then closed, its holes filled, specks smaller than
``min_region_um2`` dropped and the result dilated by ``dilation_um``, all sizes in microns.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from ..config import TissueOptions
from ..geometry import Box

CHROMA_FLOOR = 12.0  # 8-bit chroma: glass of common scanners stays below, even with dust
CHROMA_CEILING = 24.0  # 8-bit chroma: pale eosin-stained tissue stays above
INK_RED_MARGIN = 8.0  # stained pixels have R - G above this; green/blue inks do not
SMOOTH_UM = 4.0  # Gaussian sigma (um) that averages away JPEG and sensor colour noise
CLOSE_UM = 16.0  # gaps between stained fragments closed before hole filling


def _disk_dilate(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Dilation by a Euclidean disk of ``radius_px`` pixels (via the distance transform, O(N) for any radius)."""
    if radius_px <= 0 or not mask.any() or mask.all():
        return mask.copy()
    return ndi.distance_transform_edt(~mask) <= radius_px


def _disk_erode(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Erosion by a Euclidean disk; outside the image counts as foreground (no erosion from borders)."""
    if radius_px <= 0 or not mask.any() or mask.all():
        return mask.copy()
    return ndi.distance_transform_edt(mask) > radius_px


def stained_threshold(chroma: np.ndarray) -> float:
    """Otsu's threshold on the chroma, clamped to [CHROMA_FLOOR, CHROMA_CEILING]."""
    if chroma.size == 0 or float(chroma.max() - chroma.min()) < 1e-3:
        return CHROMA_FLOOR
    return float(np.clip(threshold_otsu(chroma), CHROMA_FLOOR, CHROMA_CEILING))


def tissue_mask(rgb: np.ndarray, pixel_um: float, options: TissueOptions | None = None) -> np.ndarray:
    """Boolean (H, W) mask of tissue in ``rgb`` (uint8, H x W x 3 or 4; alpha is ignored).

    ``pixel_um`` is the image's pixel size in microns; every size in ``options`` is in microns, so
    the result does not depend on the resolution chosen for the thumbnail (beyond sampling).
    """
    options = options or TissueOptions()
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {rgb.shape}")
    if not (math.isfinite(pixel_um) and pixel_um > 0):
        raise ValueError(f"pixel size must be a positive number of microns, got {pixel_um!r}")
    image = rgb[..., :3].astype(np.float32)
    if image.shape[0] == 0 or image.shape[1] == 0:
        return np.zeros(image.shape[:2], dtype=bool)
    sigma = SMOOTH_UM / pixel_um
    if sigma >= 0.3:
        image = ndi.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="nearest")
    chroma = image.max(axis=2) - image.min(axis=2)
    stained = chroma > stained_threshold(chroma)
    ink = image[..., 0] - image[..., 1] <= INK_RED_MARGIN
    mask = stained & ~ink

    close_px = CLOSE_UM / pixel_um
    mask = _disk_erode(_disk_dilate(mask, close_px), close_px)
    mask = ndi.binary_fill_holes(mask)

    min_px = options.min_region_um2 / (pixel_um * pixel_um)
    if min_px > 1 and mask.any():
        labels, count = ndi.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        keep = sizes >= min_px
        keep[0] = False
        mask = keep[labels]
    return _disk_dilate(mask, options.dilation_um / pixel_um)


def mask_box(mask_shape: tuple[int, int], mask_um: float, box: Box, model_mpp: float) -> Box:
    """The mask pixels (clipped to the mask) under ``box`` (model pixels). Mask pixel (i, j) covers
    model pixels ``[i*r, (i+1)*r)`` with ``r = mask_um / model_mpp``, both grids anchored at the
    slide's top-left corner; partly covered mask pixels are included."""
    f = model_mpp / mask_um  # mask pixels per model pixel
    y0 = max(0, math.floor(box.y0 * f))
    x0 = max(0, math.floor(box.x0 * f))
    y1 = min(mask_shape[0], math.ceil(box.y1 * f))
    x1 = min(mask_shape[1], math.ceil(box.x1 * f))
    return Box(y0, x0, max(y0, y1), max(x0, x1))


def tile_has_tissue(mask: np.ndarray, mask_um: float, read_box: Box, model_mpp: float) -> bool:
    """True when any tissue pixel of ``mask`` (pixel size ``mask_um``) lies under ``read_box``
    (model pixels of size ``model_mpp``)."""
    region = mask_box(mask.shape, mask_um, read_box, model_mpp)
    if region.is_empty():
        return False
    return bool(mask[region.slices()].any())
