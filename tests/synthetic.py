"""Synthetic whole-slide images for tests: pyramidal tiled TIFFs that OpenSlide opens.

``write_rgb_image`` stores any RGB array as an Aperio-style SVS (OpenSlide then reports
``openslide.mpp-x``) or, with ``mpp=None``, as a generic tiled TIFF without a pixel size.
``write_synthetic_slide`` paints an H&E-like slide (glass, pink tissue, dark purple nuclei as
well-separated discs) and returns the ground truth: disc centres and radii in level-0 pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

GLASS = (242, 241, 244)
STROMA = (232, 168, 204)
NUCLEUS = (92, 52, 140)


def _reduce(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Block-average by ``factor`` (level k+1 of the pyramid); a ragged last row/column is dropped."""
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    if h == 0 or w == 0:
        raise ValueError("the image is too small for another pyramid level")
    blocks = rgb[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).astype(np.uint32)
    return ((blocks.sum(axis=(1, 3)) + factor * factor // 2) // (factor * factor)).astype(np.uint8)


def write_rgb_image(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float | None = 0.25,
    levels: int = 1,
    tile: int = 256,
    level_factor: int = 2,
    compression: str | None = None,
    objective: float = 40.0,
) -> list[tuple[int, int]]:
    """Write ``rgb`` (uint8, H x W x 3) as a tiled pyramidal TIFF and return each level's (H, W).

    With ``mpp`` the file is an Aperio-style SVS whose ImageDescription carries ``MPP`` and
    ``AppMag``; with ``mpp=None`` it is a generic tiled TIFF that records no pixel size.
    Level k is level 0 block-averaged by ``level_factor**k`` (ragged edges dropped, so odd sizes
    give OpenSlide non-integral downsamples, as in real slides). ``compression``: None or "zlib".
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 array, got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    pyramid = [rgb]
    for _ in range(1, levels):
        pyramid.append(_reduce(pyramid[-1], level_factor))
    if mpp is not None:
        description = (
            f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
            f"RAW|AppMag = {objective:g}|MPP = {mpp:.6g}"
        )
    else:
        description = None
    with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2**31) as writer:
        for index, level in enumerate(pyramid):
            writer.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                description=description if index == 0 else None,
                subfiletype=0 if (index == 0 or mpp is not None) else 1,
                metadata=None,
            )
    return [level.shape[:2] for level in pyramid]


def _paint_discs(rgb: np.ndarray, centres: np.ndarray, radii: np.ndarray, colour) -> None:
    """Paint filled discs in place; a pixel belongs to a disc when its centre lies within the radius."""
    colour = np.asarray(colour, dtype=np.uint8)
    for (cy, cx), r in zip(centres, radii):
        y0, y1 = int(np.floor(cy - r)), int(np.ceil(cy + r)) + 1
        x0, x1 = int(np.floor(cx - r)), int(np.ceil(cx + r)) + 1
        y0c, x0c = max(y0, 0), max(x0, 0)
        y1c, x1c = min(y1, rgb.shape[0]), min(x1, rgb.shape[1])
        if y1c <= y0c or x1c <= x0c:
            continue
        yy = np.arange(y0c, y1c)[:, None] + 0.5
        xx = np.arange(x0c, x1c)[None, :] + 0.5
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        rgb[y0c:y1c, x0c:x1c][inside] = colour


def synthetic_rgb(
    width: int,
    height: int,
    mpp: float = 0.25,
    nuclei: bool = True,
    seed: int = 0,
    blank: bool = False,
) -> tuple[np.ndarray, dict]:
    """An H&E-like image and its ground truth (level-0 pixels, (y, x) order).

    Tissue is one ellipse covering the middle of the image (absent when ``blank``); nuclei are
    discs of radius 3-5 um on a jittered grid inside the tissue, at least 4 um apart edge to edge.
    """
    rng = np.random.default_rng(seed)
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    rgb[:] = GLASS
    truth = {
        "mpp": mpp,
        "shape": (height, width),
        "centres": np.zeros((0, 2)),
        "radii": np.zeros(0),
        "tissue_box": None,
    }
    if blank:
        return rgb, truth
    # Tissue: an axis-aligned ellipse inset from the borders (so the slide has glass around it).
    cy, cx = height / 2.0, width / 2.0
    ry, rx = 0.38 * height, 0.40 * width
    yy = (np.arange(height, dtype=np.float32)[:, None] + 0.5 - cy) / ry
    xx = (np.arange(width, dtype=np.float32)[None, :] + 0.5 - cx) / rx
    tissue = yy**2 + xx**2 <= 1.0
    rgb[tissue] = STROMA
    truth["tissue_box"] = (int(cy - ry), int(cx - rx), int(np.ceil(cy + ry)), int(np.ceil(cx + rx)))
    if nuclei:
        r_min, r_max, gap = 3.0 / mpp, 5.0 / mpp, 4.0 / mpp
        jitter = 2.0 / mpp
        step = 2 * r_max + gap + 2 * jitter  # worst case: two max-radius discs jittered towards each other
        gy = np.arange(step / 2, height - step / 2 + 1e-9, step)
        gx = np.arange(step / 2, width - step / 2 + 1e-9, step)
        if gy.size and gx.size:
            grid = np.stack(np.meshgrid(gy, gx, indexing="ij"), axis=-1).reshape(-1, 2)
            grid = grid + rng.uniform(-jitter, jitter, size=grid.shape)
            radii = rng.uniform(r_min, r_max, size=len(grid))
            # keep discs wholly inside the tissue ellipse (shrunk by the radius, approximately)
            ny = (grid[:, 0] - cy) / np.maximum(ry - radii, 1.0)
            nx = (grid[:, 1] - cx) / np.maximum(rx - radii, 1.0)
            keep = (ny**2 + nx**2 <= 1.0) & (rng.uniform(size=len(grid)) < 0.7)
            centres, radii = grid[keep], radii[keep]
            _paint_discs(rgb, centres, radii, NUCLEUS)
            truth["centres"], truth["radii"] = centres, radii
    # Mild texture so resampling and JPEG-free storage see realistic, non-flat pixels.
    noise = rng.integers(-4, 5, size=(height, 1, 1), dtype=np.int16) + rng.integers(
        -4, 5, size=(1, width, 1), dtype=np.int16
    )
    rgb[:] = np.clip(rgb.astype(np.int16) + noise * tissue[..., None], 0, 255).astype(np.uint8)
    return rgb, truth


def write_synthetic_slide(
    path: str | Path,
    width: int,
    height: int,
    mpp: float = 0.25,
    levels: int = 3,
    nuclei: bool = True,
    seed: int = 0,
    tile: int = 256,
    blank: bool = False,
    level_factor: int = 2,
    compression: str | None = None,
) -> dict:
    """Write an H&E-like Aperio-style SVS and return its ground truth.

    Returns a dict: ``path``, ``mpp``, ``shape`` (level-0 H, W), ``level_shapes``, ``centres``
    (N x 2 float array of disc centres, (y, x), level-0 pixels, continuous coordinates where
    pixel (i, j) covers [i, i+1) x [j, j+1)), ``radii`` (N, level-0 pixels) and ``tissue_box``
    ((y0, x0, y1, x1) bounding the tissue, or None for a blank slide).
    """
    rgb, truth = synthetic_rgb(width, height, mpp=mpp, nuclei=nuclei, seed=seed, blank=blank)
    truth["level_shapes"] = write_rgb_image(
        path, rgb, mpp=mpp, levels=levels, tile=tile, level_factor=level_factor, compression=compression
    )
    truth["path"] = Path(path)
    return truth


# `wsi-grunet run` options for small, quick runs with the null model (no weights): small tiles and one
# single-threaded worker, so a synthetic slide is a few tiles even on a loaded CPU.
NULL_MODEL_RUN_OPTIONS = [
    "--weights",
    "null-model",
    "--workers",
    "1",
    "--tile-size",
    "256",
    "--halo",
    "64",
    "--quiet",
    "--set",
    "output.chunk=64",
    "cluster.threads_per_worker=1",
]
