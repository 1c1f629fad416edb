"""Quick-look PNG: nucleus outlines drawn over a slide thumbnail.

Polygons arrive in level-0 pixels (pixel-corner convention) and are mapped to thumbnail pixels with
``x_thumb = x_l0 * slide_mpp / thumb_um``, then by the extra downscale that keeps the longest side at or
below ``max_px``. Polygons are consumed one at a time, so a generator over millions of nuclei is fine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from shapely.geometry import MultiPolygon, Polygon

from ..errors import OutputError

OUTLINE_RGB = (0, 255, 0)  # bright green: stands out on both haematoxylin and eosin


def _rings(geom) -> Iterable[np.ndarray]:
    polys = geom.geoms if isinstance(geom, MultiPolygon) else [geom]
    for poly in polys:
        if isinstance(poly, Polygon) and not poly.is_empty:
            yield np.asarray(poly.exterior.coords)
            for interior in poly.interiors:
                yield np.asarray(interior.coords)


def _as_rgb(thumbnail: np.ndarray) -> Image.Image:
    array = np.asarray(thumbnail)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"thumbnail must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array[:, :, :3]).astype(np.uint8, copy=False))


def render_preview(
    thumbnail: np.ndarray,
    thumb_um: float,
    slide_mpp: float,
    polygons_l0: Iterable[Polygon | MultiPolygon],
    path: str | os.PathLike,
    max_px: int = 2048,
    color: tuple[int, int, int] = OUTLINE_RGB,
) -> tuple[int, int]:
    """Draw 1-px outlines of ``polygons_l0`` on ``thumbnail`` and write a PNG to ``path``.

    ``thumbnail``: uint8 image at ``thumb_um`` micrometres per pixel; ``slide_mpp``: micrometres per
    level-0 pixel. The image is only ever shrunk (longest side <= ``max_px``). Returns the PNG's (H, W).
    """
    if thumb_um <= 0 or slide_mpp <= 0 or max_px < 1:
        raise ValueError(f"thumb_um ({thumb_um}), slide_mpp ({slide_mpp}) and max_px ({max_px}) must be positive")
    image = _as_rgb(thumbnail)
    width, height = image.size
    shrink = min(1.0, max_px / max(width, height))
    if shrink < 1.0:
        size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    # Per-axis factors absorb the rounding of the resized size.
    fx = slide_mpp / thumb_um * image.size[0] / width
    fy = slide_mpp / thumb_um * image.size[1] / height
    draw = ImageDraw.Draw(image)
    for geom in polygons_l0:
        for ring in _rings(geom):
            # A pixel corner (x, y) is drawn on the pixel whose top-left it is: outlines hug the object's
            # top/left edge from inside and its bottom/right edge from outside, never shifting it by a pixel.
            xy = np.column_stack([ring[:, 0] * fx, ring[:, 1] * fy])
            draw.line([tuple(p) for p in xy.tolist()], fill=tuple(color), width=1)
    out = Path(path)
    try:
        image.save(out, format="PNG")
    except OSError as exc:
        raise OutputError(f"{out}: cannot write preview PNG ({exc.strerror or exc})") from None
    return image.size[1], image.size[0]
