"""Slide pixels through OpenSlide (Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura, Ventana, DICOM,
generic tiled TIFF).

OpenSlide's ``read_region`` takes its location in level-0 pixels and maps it to level L by dividing
by its reported downsample. When that figure is not an integer, a read starts at the nearest level-0
pixel and OpenSlide shifts the strip by the remaining fraction of a level pixel (interpolating);
``region_origin`` says where such a read lands, so placement stays exact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openslide

from ..errors import SlideOpenError, SlideReadError
from .direct_tiles import DirectTiles
from .metadata import (
    PROPERTY_OBJECTIVE_POWER,
    PROPERTY_VENDOR,
    SlideInfo,
    float_or_none,
    openslide_pixel_size,
)
from .resample import is_integral, round_half_up


class OpenSlideDeclined(SlideOpenError):
    """OpenSlide cannot open the file (another backend may still read it)."""


def open_openslide(path: Path) -> openslide.OpenSlide:
    """An OpenSlide handle. Raises OpenSlideDeclined with OpenSlide's reason, naming the file."""
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise OpenSlideDeclined(f"{path}: not a slide file (OpenSlide does not recognise its format)") from None
    except openslide.OpenSlideError as exc:
        raise OpenSlideDeclined(f"{path}: unsupported format/compression: {exc}") from None
    except OSError as exc:
        raise SlideOpenError(f"{path}: cannot open ({exc.strerror or exc})") from None


def info_from_openslide(slide: openslide.OpenSlide, path: str | os.PathLike) -> SlideInfo:
    properties = slide.properties
    size = openslide_pixel_size(properties)
    objective = float_or_none(properties.get(PROPERTY_OBJECTIVE_POWER))
    width, height = slide.dimensions
    return SlideInfo(
        path=str(path),
        vendor=properties.get(PROPERTY_VENDOR),
        width=int(width),
        height=int(height),
        mpp_x=size.mpp_x,
        mpp_y=size.mpp_y,
        objective_power=objective if objective and objective > 0 else None,
        level_count=int(slide.level_count),
        level_dimensions=tuple((int(w), int(h)) for w, h in slide.level_dimensions),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        associated_images=tuple(sorted(slide.associated_images)),
        mpp_rejected=size.rejected,
        mpp_source=size.source,
        backend="openslide",
    )


class OpenSlideBackend:
    """One OpenSlide handle (thread-safe, as OpenSlide handles are)."""

    name = "openslide"

    def __init__(self, path: str | os.PathLike, handle: openslide.OpenSlide | None = None):
        self.path = str(path)
        self._slide = handle if handle is not None else open_openslide(Path(path))
        try:
            self.info = info_from_openslide(self._slide, path)
        except Exception:
            self._slide.close()
            raise
        # Where tifffile gives the same pixels faster (checked per level at its first read).
        self._direct = DirectTiles(self.path, self.info, self._read_openslide)

    @property
    def properties(self) -> Mapping[str, str]:
        return self._slide.properties

    def _location(self, level: int, x: int, y: int) -> tuple[int, int]:
        downsample = self.info.level_downsamples[level]
        if is_integral(downsample):
            step = round(downsample)
            return x * step, y * step
        return round_half_up(x * downsample), round_half_up(y * downsample)

    def region_origin(self, level: int, x: int, y: int) -> tuple[float, float]:
        """Where a read asked for at level pixel (x, y) starts, in level pixels (x, y)."""
        downsample = self.info.level_downsamples[level]
        if is_integral(downsample):
            return float(x), float(y)
        loc_x, loc_y = self._location(level, x, y)
        return loc_x / downsample, loc_y / downsample

    @property
    def direct_levels(self) -> list[int]:
        """Levels read so far whose pixels tifffile decoded (equal to OpenSlide's, checked)."""
        return self._direct.levels

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB or RGBA uint8 (height, width, 3|4) starting at level pixel (x, y), inside the level."""
        pixels = self._direct.read(level, x, y, width, height)
        return pixels if pixels is not None else self._read_openslide(level, x, y, width, height)

    def _read_openslide(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGBA uint8 (height, width, 4) through OpenSlide."""
        loc_x, loc_y = self._location(level, x, y)
        try:
            region = self._slide.read_region((loc_x, loc_y), level, (width, height))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self.path}: cannot read pixels of level {level} at level-0 (x={loc_x}, y={loc_y}), "
                f"size {width}x{height}: {exc}"
            ) from None
        return np.asarray(region)

    def close(self) -> None:
        self._direct.close()
        self._slide.close()
