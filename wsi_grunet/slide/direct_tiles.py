"""OpenSlide's pixels from tifffile, for the TIFF levels where the two give the same bytes.

For a 2304^2 read of a JPEG-tiled Aperio SVS, OpenSlide decodes the tiles with libjpeg-turbo, paints
them into a premultiplied ARGB buffer and hands back RGBA that is then copied to RGB; tifffile decodes
the same tiles with the same library straight into RGB, 2.2-3.4x faster (benchmarks/RESULTS.md).
OpenSlide stays the slide's reader (metadata, levels, pixel size, associated images); a level's
pixels come from tifffile only when

* the file is an Aperio SVS or a generic tiled TIFF, and tifffile sees a level of the same size;
* the level's downsample is an integer (OpenSlide interpolates reads of other levels);
* the level is tiled RGB with every tile stored (OpenSlide paints a missing tile transparent, which
  becomes white; tifffile would give black);
* two probe regions of the level (one across the tile seams nearest its centre, one at its
  bottom-right corner, where tiles are cut) are equal byte for byte, checked at the level's first read.

Anything else, and any read that fails, goes to OpenSlide, whose errors are the ones reported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from ..errors import SlideError
from .metadata import SlideInfo
from .resample import is_integral
from .tiff_backend import TiffBackend

# OpenSlide vendors whose files are plain tiled TIFFs that tifffile maps level for level.
DIRECT_VENDORS = frozenset({"aperio", "generic-tiff"})

Region = tuple[int, int, int, int]  # x, y, width, height in level pixels
ReadRegion = Callable[[int, int, int, int, int], np.ndarray]  # (level, x, y, width, height) -> RGB(A)


def probe_regions(width: int, height: int, tile_width: int, tile_height: int) -> list[Region]:
    """Two tile-sized regions of a level: one centred on the tile corner nearest the level's centre
    (so it spans up to four tiles), and the bottom-right corner (the cut edge tiles)."""
    w, h = min(tile_width, width), min(tile_height, height)
    corner_x = round(width / 2 / tile_width) * tile_width
    corner_y = round(height / 2 / tile_height) * tile_height
    x = min(max(corner_x - w // 2, 0), width - w)
    y = min(max(corner_y - h // 2, 0), height - h)
    return [(x, y, w, h), (width - w, height - h, w, h)]


def same_pixels(rgb: np.ndarray, reference: np.ndarray) -> bool:
    """True when ``rgb`` (H, W, 3) equals ``reference`` (RGB, or RGBA that is opaque everywhere)."""
    if reference.shape[-1] == 4:
        if not bool((reference[..., 3] == 255).all()):
            return False
        reference = reference[..., :3]
    return rgb.shape == reference.shape and bool(np.array_equal(rgb, reference))


class DirectTiles:
    """tifffile reads for the levels of one slide that give OpenSlide's pixels (see the module docstring).

    ``read_reference`` reads a region through OpenSlide, for the probes. Thread-safe: the probes run
    once per level under a lock; tifffile's reads are.
    """

    def __init__(self, path: str, info: SlideInfo, read_reference: ReadRegion):
        self._path, self._info, self._read_reference = path, info, read_reference
        self._lock = threading.Lock()
        self._verified: dict[int, bool] = {}
        self._opened = False
        self._tiff: TiffBackend | None = None
        self._tiff_level: dict[int, int] = {}  # OpenSlide level -> tifffile level of the same size

    @property
    def levels(self) -> list[int]:
        """Levels checked so far whose pixels come from tifffile."""
        return sorted(level for level, ok in self._verified.items() if ok)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray | None:
        """RGB (height, width, 3) from tifffile, or None where OpenSlide must read it."""
        if not self._verify(level):
            return None
        assert self._tiff is not None  # verified levels exist only with a tifffile view
        try:
            return self._tiff.read_region(self._tiff_level[level], x, y, width, height)
        except SlideError:
            return None

    def _verify(self, level: int) -> bool:
        with self._lock:
            if level not in self._verified:
                self._open()  # at the first read, so opening a slide (e.g. to list it) costs nothing more
                self._verified[level] = level in self._tiff_level and self._probe(level)
            return self._verified[level]

    def _open(self) -> None:
        if self._opened:
            return
        self._opened = True
        if self._info.vendor not in DIRECT_VENDORS:
            return
        try:
            tiff = TiffBackend(self._path)
        except Exception:  # noqa: BLE001 (whatever tifffile cannot map stays with OpenSlide)
            return
        sizes = {size: k for k, size in reversed(list(enumerate(tiff.info.level_dimensions)))}
        for level, size in enumerate(self._info.level_dimensions):
            k = sizes.get(size)
            if k is not None and is_integral(self._info.level_downsamples[level]) and tiff.level_tile_shape(k):
                self._tiff_level[level] = k
        if self._tiff_level:
            self._tiff = tiff
        else:
            tiff.close()

    def _probe(self, level: int) -> bool:
        assert self._tiff is not None
        k = self._tiff_level[level]
        tile = self._tiff.level_tile_shape(k)
        assert tile is not None
        width, height = self._info.level_dimensions[level]
        for x, y, w, h in probe_regions(width, height, tile[1], tile[0]):
            try:
                ours = self._tiff.read_region(k, x, y, w, h)
            except SlideError:
                return False
            try:
                reference = self._read_reference(level, x, y, w, h)
            except SlideError:
                return False
            if not same_pixels(ours, reference):
                return False
        return True

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
