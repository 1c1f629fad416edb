"""Reads slide regions resampled exactly to the model's pixel size, through a backend.

``SlideReader`` turns boxes in model pixels into RGB arrays: it follows a ``ReadPlan`` (level,
scale, model shape, pixel size and its source; see ``resample.py`` for the frames and the filter)
and asks its backend (OpenSlide or tifffile, ``backends.py``) for level pixels. Backends' (x, y)
order never leaves the backends and ``_read_level``: everything else is (y, x).

When the chosen level's pixel size equals the target, pixels are copied without resampling.
Shrinking by four or more first averages whole blocks of source pixels (exact area averaging,
short filter). Reads from a level whose reported downsample is not an integer are placed exactly
(the backend says where a read lands) but agree between overlapping boxes only to within
OpenSlide's sub-pixel interpolation; level 0 and levels with an integral downsample are bit-exact.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ..display import display_text
from ..errors import ConfigError, PixelSizeError
from ..geometry import Box
from .backends import SlideBackend, open_backend
from .metadata import PLAUSIBLE_MPP, SlideInfo
from .resample import (
    ReadPlan,
    block_mean,
    choose_level,
    composite_on_white,
    geometric_downsamples,
    plan_at,
    plan_read,
    positive_number,
    resample,
    source_span,
)

__all__ = [
    "PLAUSIBLE_MPP",
    "ReadPlan",
    "SlideInfo",
    "SlideReader",
    "choose_level",
    "describe",
    "geometric_downsamples",
    "inspect_slide",
    "open_reader_cached",
]

# Source pixels read per axis in one backend call when building thumbnails (bounds memory).
_THUMBNAIL_BLOCK = 2048


def inspect_slide(path: str | os.PathLike) -> SlideInfo:
    """Open ``path`` and describe it. Raises SlideOpenError naming the file."""
    backend = open_backend(path)
    try:
        return backend.info
    finally:
        backend.close()


class SlideReader:
    """Reads regions of a slide resampled exactly to ``model_mpp`` (model pixels).

    ``plan`` is the read plan at ``model_mpp``; ``level0_per_model`` (level-0 pixels per model pixel, snapped
    to a pyramid downsample when equal within 1e-6 so that level is copied pixel for pixel),
    ``level``, ``model_shape`` (H, W) and ``slide_mpp`` repeat its fields. ``backend`` names the
    library reading the pixels ("openslide" or "tifffile"). Both backends may be shared by threads
    and the reader holds no other mutable state. Readers pickle by path (the file is reopened), so
    they can travel to dask workers.
    """

    def __init__(self, path: str | os.PathLike, model_mpp: float, mpp_override: float | None = None):
        if not positive_number(model_mpp):
            raise ConfigError(f"model microns-per-pixel must be a positive number, got {model_mpp!r}")
        if mpp_override is not None and not positive_number(mpp_override):
            raise ConfigError(f"--mpp must be a positive number of microns per pixel, got {mpp_override!r}")
        self.path = str(path)
        self.model_mpp = float(model_mpp)
        self.mpp_override = None if mpp_override is None else float(mpp_override)
        self._backend: SlideBackend = open_backend(path)
        try:
            self.info = self._backend.info
            self.plan: ReadPlan = plan_read(self.info, self.model_mpp, self.mpp_override)
        except Exception:
            self._backend.close()
            raise
        self.backend: str = self._backend.name
        self.slide_mpp = self.plan.slide_mpp
        self.downsamples = self.plan.downsamples
        self.level0_per_model = self.plan.scale
        self.model_shape = self.plan.shape
        self.level = self.plan.level

    # -- plumbing ---------------------------------------------------------------------------

    def __reduce__(self):
        return (SlideReader, (self.path, self.model_mpp, self.mpp_override))

    def __enter__(self) -> SlideReader:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close()

    def __repr__(self) -> str:
        return (
            f"SlideReader({self.path!r}, model_mpp={self.model_mpp}, slide_mpp={self.slide_mpp}, "
            f"model_shape={self.model_shape}, level={self.level}, backend={self.backend!r})"
        )

    # -- pixels -----------------------------------------------------------------------------

    def _read_level(self, level: int, y0: int, x0: int, y1: int, x1: int) -> tuple[np.ndarray, float, float]:
        """RGB of level-``level`` pixels [y0, y1) x [x0, x1) and the strip's true origin (level px).

        Pixels outside the level are white; only the part inside is asked of the backend (OpenSlide
        handles negative locations inexactly for non-integral downsamples).
        """
        level_w, level_h = self.info.level_dimensions[level]
        cy0, cx0 = max(y0, 0), max(x0, 0)
        cy1, cx1 = min(y1, level_h), min(x1, level_w)
        if cy1 <= cy0 or cx1 <= cx0:
            return np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8), float(y0), float(x0)
        region = composite_on_white(self._backend.read_region(level, cx0, cy0, cx1 - cx0, cy1 - cy0))
        origin_x, origin_y = self._backend.region_origin(level, cx0, cy0)
        if (cy0, cx0, cy1, cx1) == (y0, x0, y1, x1):
            return region, origin_y, origin_x  # wholly inside the level: no white border to add
        strip = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        strip[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = region
        return strip, origin_y - (cy0 - y0), origin_x - (cx0 - x0)

    def _read_scaled(self, box: Box, plan: ReadPlan) -> np.ndarray:
        """Pixels of ``box`` in the output grid of ``plan``."""
        if box.is_empty():
            return np.zeros((max(box.height, 0), max(box.width, 0), 3), dtype=np.uint8)
        level = plan.level
        if plan.copies_level:
            rgb, _, _ = self._read_level(level, box.y0, box.x0, box.y1, box.x1)
            return rgb
        s = plan.level_pixels_per_output
        # Shrinking 4x or more: area-average integer blocks first. Block boundaries lie on multiples
        # of the factor in the level grid, so the reduced grid is a virtual level of its own.
        factor = int(s // 2) if s >= 4.0 else 1
        s_eff = s / factor
        sy0, sy1 = source_span(box.y0, box.y1, s_eff)
        sx0, sx1 = source_span(box.x0, box.x1, s_eff)
        strip, origin_y, origin_x = self._read_level(level, sy0 * factor, sx0 * factor, sy1 * factor, sx1 * factor)
        if factor > 1:
            strip = block_mean(strip, factor)
            origin_y, origin_x = origin_y / factor, origin_x / factor
        out = resample(strip, box, s_eff, origin_y, origin_x)
        self._whiten_outside(out, box, plan.scale)
        return out

    def _whiten_outside(self, out: np.ndarray, box: Box, scale: float) -> None:
        """Set pixels whose footprint lies wholly outside the slide to white, in place.

        The filter reaches a little past a pixel's footprint; without this, pixels just outside the
        slide would pick up a trace of its edge.
        """
        ys = np.arange(box.y0, box.y1)
        xs = np.arange(box.x0, box.x1)
        out[((ys + 1) * scale <= 0) | (ys * scale >= self.info.height)] = 255
        out[:, ((xs + 1) * scale <= 0) | (xs * scale >= self.info.width)] = 255

    def read(self, box: Box) -> np.ndarray:
        """uint8 RGB array (box.height, box.width, 3) of ``box`` in model pixels.

        The box may extend beyond the slide: those pixels are white (255), as are transparent
        areas of the slide. Raises SlideReadError (naming file and region) on undecodable pixels.
        """
        return self._read_scaled(box, self.plan)

    def thumbnail(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide at ``mpp`` um/px and that pixel size (exact: pixel (i, j) covers level-0
        ``[i*f, (i+1)*f) x [j*f, (j+1)*f)`` with ``f = pixel_um / slide_mpp``; the last row/column
        may reach past the slide and be partly white).

        Reads the coarsest pyramid level at least as fine as ``mpp``, in blocks of bounded size, so a
        large slide is never decoded whole at level 0.
        """
        if not positive_number(mpp):
            raise ConfigError(f"thumbnail microns-per-pixel must be positive, got {mpp!r}")
        plan = plan_at(self.info, self.slide_mpp, self.plan.mpp_source, mpp)
        height, width = plan.shape
        block = max(16, int(_THUMBNAIL_BLOCK // max(plan.level_pixels_per_output, 1.0)))
        out = np.empty((height, width, 3), dtype=np.uint8)
        for y0 in range(0, height, block):
            for x0 in range(0, width, block):
                part = Box(y0, x0, min(y0 + block, height), min(x0 + block, width))
                out[part.slices()] = self._read_scaled(part, plan)
        exact_mpp = float(mpp) if plan.scale == mpp / self.slide_mpp else plan.scale * self.slide_mpp
        return out, exact_mpp

    # -- frames -----------------------------------------------------------------------------

    def model_to_level0(self, y: float, x: float) -> tuple[float, float]:
        """Continuous model-pixel coordinates to level-0 pixel coordinates."""
        return y * self.level0_per_model, x * self.level0_per_model


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, model_mpp: float, mpp_override: float | None) -> SlideReader:
    return SlideReader(path, model_mpp, mpp_override)


def open_reader_cached(path: str | os.PathLike, model_mpp: float, mpp_override: float | None = None) -> SlideReader:
    """A per-process shared reader (small LRU cache), so workers reuse one handle per slide.

    Do not close the returned reader: other tasks in the process may be using it.
    """
    return _cached_reader(str(path), float(model_mpp), None if mpp_override is None else float(mpp_override))


# --------------------------------------------------------------------------------------------
# Human-readable description
# --------------------------------------------------------------------------------------------


def describe(info: SlideInfo, model_mpp: float | None = None, mpp_override: float | None = None) -> str:
    """Multi-line text for ``wsi-grunet info SLIDE``; with ``model_mpp``, what a run would read
    (the same ``ReadPlan`` a ``SlideReader`` follows)."""
    lines = [
        f"Slide:       {display_text(info.path)}",
        f"Format:      {info.vendor or 'unknown'}",
        f"Backend:     {info.backend}",
    ]
    lines.append(f"Size:        {info.width} x {info.height} px (width x height, level 0)")
    slide_mpp = mpp_override if mpp_override is not None else info.mpp
    if info.mpp is not None:
        source = f" (from {info.mpp_source})" if info.mpp_source else ""
        lines.append(f"Pixel size:  {info.mpp_x:.4g} x {info.mpp_y:.4g} um/px{source}")
    elif info.mpp_rejected is not None:
        lines.append(
            f"Pixel size:  missing (the file says {info.mpp_rejected:.4g} um/px, outside the plausible "
            f"{PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} um/px)"
        )
    else:
        lines.append("Pixel size:  missing")
    if mpp_override is not None:
        lines.append(f"             overridden with --mpp {mpp_override:g} um/px")
    lines.append(f"Objective:   {f'{info.objective_power:g}x' if info.objective_power else 'unknown'}")
    lines.append(f"Levels:      {info.level_count}")
    downsamples = geometric_downsamples(info)
    for level, ((w, h), reported) in enumerate(zip(info.level_dimensions, info.level_downsamples)):
        geometric = downsamples[level]
        text = f"downsample {reported:.6g}"
        if geometric != reported:
            text += f" (read as {geometric:g})"
        if slide_mpp is not None:
            text += f", {slide_mpp * geometric:.4g} um/px"
        lines.append(f"  level {level}: {w} x {h} px, {text}")
    lines.append(f"Associated:  {', '.join(info.associated_images) if info.associated_images else 'none'}")
    if model_mpp is not None:
        if slide_mpp is None:
            lines.append(f"At {model_mpp:g} um/px: unknown until the pixel size is given (pass --mpp)")
        else:
            try:
                plan = plan_read(info, model_mpp, mpp_override)
            except PixelSizeError as exc:  # a run would fail this slide: say why instead of describing a read
                lines.append(f"At {model_mpp:g} um/px: not read: {exc}")
                return "\n".join(lines)
            height, width = plan.shape
            lines.append(
                f"At {model_mpp:g} um/px: reads level {plan.level} "
                f"({plan.slide_mpp * plan.downsamples[plan.level]:.4g} um/px), {plan.how()}; "
                f"model image {height} x {width} px (height x width)"
            )
    return "\n".join(lines)
