"""Slide pixels through tifffile: OME-TIFF and SubIFD pyramids, and TIFFs OpenSlide declines.

OpenSlide 4 opens a pyramidal OME-TIFF (levels in SubIFDs) as a one-level generic TIFF without a
pixel size; tifffile sees its levels and the OME-XML. Only brightfield slides are read: 8-bit RGB
(3 samples, or 4 with alpha composited on white). Reads decode only the tiles a region touches
(tifffile's zarr store of each level).
"""

from __future__ import annotations

import os
import reprlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from tifffile import PHOTOMETRIC, TIFF

from ..errors import SlideOpenError, SlideReadError
from .metadata import (
    PixelSize,
    SlideInfo,
    float_or_none,
    level_downsamples,
    ome_pixel_size,
    ome_pixels,
    pick_pixel_size,
    tiff_resolution_mpp,
)

# A level stored in chunks (tiles or strips) larger than this many pixels is refused: a region read
# would decode at least that much (a stripped TIFF with one strip decodes the whole level per read).
MAX_CHUNK_PIXELS = 4096 * 4096
_ASSOCIATED = {"label", "macro", "thumbnail", "overview"}
_RGB_PHOTOMETRIC = {PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR}


class NotBrightfieldError(SlideOpenError):
    """The file is a TIFF image, but not an 8-bit RGB brightfield slide."""


def _error_text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _open_tiff(path: Path) -> tifffile.TiffFile:
    try:
        return tifffile.TiffFile(path)
    except tifffile.TiffFileError as exc:
        raise SlideOpenError(f"{path}: not a TIFF file ({exc})") from None
    except OSError as exc:
        raise SlideOpenError(f"{path}: cannot open ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 (malformed structures raise assorted errors inside tifffile)
        raise SlideOpenError(f"{path}: unreadable TIFF structure ({exc})") from None


def _main_series(tif: tifffile.TiffFile) -> tuple[int, Any]:
    """Index and series of the largest image (by level-0 pixels): the slide, not its label or macro."""
    best, best_area = 0, -1
    for index, series in enumerate(tif.series):
        axes, shape = series.axes, series.shape
        if "Y" not in axes or "X" not in axes:
            continue
        area = shape[axes.index("Y")] * shape[axes.index("X")]
        if area > best_area:
            best, best_area = index, area
    if best_area < 0:
        raise SlideOpenError(f"{tif.filehandle.path}: the TIFF holds no image")
    return best, tif.series[best]


def _layout(path: Path, series: Any) -> str:
    """The sample layout of an 8-bit RGB(A) series: "interleaved" (Y, X, S) or "planar" (S, Y, X).

    Anything else (fluorescence channels, 16-bit, grey, Z or T axes) raises NotBrightfieldError.
    """
    axes, shape, dtype = series.axes, series.shape, np.dtype(series.dtype)
    page = series.keyframe
    channels = int(np.prod([shape[axes.index(a)] for a in axes if a in "CS"]))
    extra = ", ".join(f"{a} of size {shape[axes.index(a)]}" for a in axes if a not in "YXCS")
    rgb_like = axes in ("YXS", "SYX", "CYX") and channels in (3, 4) and page.photometric in _RGB_PHOTOMETRIC
    if dtype != np.uint8 or not rgb_like:
        raise NotBrightfieldError(
            f"{path}: not a brightfield RGB slide: it has {channels} channel{'s' if channels != 1 else ''} "
            f"of {dtype}{f' with extra axes ({extra})' if extra else ''} "
            f"(photometric {_photometric_name(page.photometric)}); "
            "only 8-bit RGB (3 samples, or 4 with alpha) is read"
        )
    return "interleaved" if axes == "YXS" else "planar"


def _photometric_name(value: int) -> str:
    """PHOTOMETRIC's name for a tag value, or the number where it is none the TIFF standard knows."""
    try:
        return PHOTOMETRIC(value).name
    except ValueError:
        return str(value)


def chunk_table_problem(path: str | os.PathLike) -> str | None:
    """Why a TIFF's tile and strip tables cannot be trusted, or None.

    OpenSlide trusts them, and a corrupt one kills the process inside it: image and tile sizes that
    disagree with the tiles listed make it divide by zero (SIGFPE) when the file is opened, a TileWidth
    near 2**31 makes GLib abort on a tile buffer of terabytes. So each image of the file's IFD chain must
    have positive tile sizes and list the tiles its size needs (a corrupt ImageWidth, ImageLength,
    TileWidth or TileLength changes that number), and every stored tile or strip must lie inside the
    file (a truncated copy, or a corrupt offset or byte count, puts some past its end). Files tifffile
    cannot parse, and NDPI files (whose offsets tifffile reconstructs), are not judged here: None, and
    OpenSlide has its say.
    """
    try:
        size = os.path.getsize(path)
        with tifffile.TiffFile(path) as tif:
            if tif.is_ndpi:
                return None
            for index, page in enumerate(tif.pages):
                problem = _page_chunk_problem(page, size)
                if problem is not None:
                    return f"TIFF image {index} {problem}; the file is corrupt or truncated"
    except Exception:  # noqa: BLE001 (tifffile raises assorted errors on malformed structures)
        return None
    return None


def _page_chunk_problem(page: Any, file_size: int) -> str | None:
    tile_width, tile_length = page.tags.valueof(322), page.tags.valueof(323)  # TileWidth, TileLength
    if (tile_width, tile_length) != (None, None) and not (_positive_int(tile_width) and _positive_int(tile_length)):
        return (
            f"has an unusable tile size (TileWidth {reprlib.repr(tile_width)}, TileLength {reprlib.repr(tile_length)})"
        )
    offsets = np.asarray(page.dataoffsets, dtype=np.uint64)
    counts = np.asarray(page.databytecounts, dtype=np.uint64)
    if len(offsets) != len(counts):
        return f"lists {len(offsets)} offsets of pixel data but {len(counts)} byte counts"
    if page.is_tiled:
        needed = int(np.prod(page.chunked))
        if len(offsets) != needed:
            height, width = page.imagelength, page.imagewidth
            return (
                f"lists {len(offsets)} tiles, but its size ({width} x {height} px in tiles of "
                f"{page.tilewidth} x {page.tilelength}) needs {needed}"
            )
    stored = counts > 0  # a count of 0: a tile not stored (sparse slides)
    ends = offsets[stored] + counts[stored]
    if bool((ends < offsets[stored]).any()):  # the sum wrapped around: beyond any file
        return "has pixel data past the end of the file (an offset or byte count near 2**64)"
    end = int(ends.max(initial=0))
    if end > file_size:
        return f"has pixel data up to byte {end}, past the end of the file ({file_size} bytes)"
    return None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and value > 0


def _check_pages(path: Path, levels: list[Any]) -> None:
    for index, level in enumerate(levels):
        page = level.keyframe
        if page.compression not in TIFF.DECOMPRESSORS:
            name = getattr(page.compression, "name", str(int(page.compression)))
            raise SlideOpenError(f"{path}: level {index} uses compression {name}, which cannot be decoded")
        if page.is_tiled:
            chunk = page.tilelength * page.tilewidth
        else:
            chunk = min(page.rowsperstrip or page.imagelength, page.imagelength) * page.imagewidth
        if chunk > MAX_CHUNK_PIXELS:
            raise SlideOpenError(
                f"{path}: level {index} is stored in chunks of {chunk} pixels (not tiled); reading a region "
                "would decode most of the level each time"
            )


def _ome_objective(ome_xml: str) -> float | None:
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Objective":
            value = float_or_none(element.attrib.get("NominalMagnification"))
            if value and value > 0:
                return value
    return None


def _pixel_size(tif: tifffile.TiffFile, index: int, width: int, height: int) -> PixelSize:
    """OME-XML PhysicalSizeX/Y of the slide's Image, else the TIFF resolution tags; plausible values only."""
    candidates: list[tuple[str, float | None, float | None]] = []
    if tif.is_ome and tif.ome_metadata:
        images = ome_pixels(tif.ome_metadata)
        matching = [p for p in images if (p.get("SizeX"), p.get("SizeY")) == (str(width), str(height))]
        chosen = images[index] if index < len(images) and images[index] in matching else None
        chosen = chosen if chosen is not None else (matching[0] if matching else None)
        if chosen is not None:
            candidates.append(("OME-XML PhysicalSizeX/Y", *ome_pixel_size(chosen)))
    page = tif.series[index].keyframe
    tags = page.tags
    unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else None
    resolution = []
    for name in ("XResolution", "YResolution"):
        value = tags[name].value if name in tags else None
        ratio = value[0] / value[1] if isinstance(value, tuple) and len(value) == 2 and value[1] else value
        resolution.append(tiff_resolution_mpp(ratio, int(unit) if unit is not None else None))
    candidates.append(("TIFF resolution tags", resolution[0], resolution[1]))
    return pick_pixel_size(candidates)


class TiffBackend:
    """One tifffile handle and a zarr view of each pyramid level (reads decode only touched tiles)."""

    name = "tifffile"

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._tif = _open_tiff(Path(path))
        try:
            self._setup(Path(path))
        except SlideOpenError:
            self._tif.close()
            raise
        except Exception as exc:  # noqa: BLE001 (tifffile parses tags and series lazily: malformed ones raise here)
            self._tif.close()
            raise SlideOpenError(f"{path}: unreadable TIFF structure ({_error_text(exc)})") from None

    def _setup(self, path: Path) -> None:
        tif = self._tif
        index, series = _main_series(tif)
        self._layout = _layout(path, series)
        levels = list(series.levels)
        _check_pages(path, levels)
        self._levels = levels
        dims = []
        for level in levels:
            if level.axes != series.axes:
                raise SlideOpenError(f"{path}: pyramid levels differ in layout ({series.axes} and {level.axes})")
            dims.append((int(level.shape[level.axes.index("X")]), int(level.shape[level.axes.index("Y")])))
        try:
            self._arrays = [zarr.open_array(series.aszarr(level=i, maxworkers=1), mode="r") for i in range(len(levels))]
        except Exception as exc:  # noqa: BLE001 (tifffile's store may raise any error on odd layouts)
            raise SlideOpenError(f"{path}: cannot map the TIFF's tiles ({exc})") from None
        width, height = dims[0]
        size = _pixel_size(tif, index, width, height)
        associated = tuple(
            sorted(
                s.name.lower() for k, s in enumerate(tif.series) if k != index and (s.name or "").lower() in _ASSOCIATED
            )
        )
        self._properties: dict[str, str] = {"tifffile.series": str(series.kind), "tifffile.axes": series.axes}
        self.info = SlideInfo(
            path=self.path,
            vendor="ome-tiff" if tif.is_ome else "generic-tiff",
            width=width,
            height=height,
            mpp_x=size.mpp_x,
            mpp_y=size.mpp_y,
            objective_power=_ome_objective(tif.ome_metadata) if tif.is_ome and tif.ome_metadata else None,
            level_count=len(dims),
            level_dimensions=tuple(dims),
            level_downsamples=level_downsamples(tuple(dims)),
            associated_images=associated,
            mpp_rejected=size.rejected,
            mpp_source=size.source,
            backend="tifffile",
        )

    @property
    def properties(self) -> Mapping[str, str]:
        return self._properties

    def level_tile_shape(self, level: int) -> tuple[int, int] | None:
        """(tile height, tile width) of a level stored as tiles of interleaved 3-sample RGB with every
        tile present; None for any other level (strips, alpha, planar samples, missing tiles)."""
        series = self._levels[level]
        page = series.keyframe
        if not page.is_tiled or self._layout != "interleaved" or page.samplesperpixel != 3:
            return None
        if any(not all(p.databytecounts) for p in series.pages):
            return None
        return int(page.tilelength), int(page.tilewidth)

    def region_origin(self, level: int, x: int, y: int) -> tuple[float, float]:
        """Reads start exactly where asked (level pixels)."""
        return float(x), float(y)

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB(A) uint8 (height, width, 3 or 4) of level pixels from (x, y), inside the level."""
        array = self._arrays[level]
        try:
            if self._layout == "interleaved":
                pixels = np.asarray(array[y : y + height, x : x + width, :])
            else:
                pixels = np.moveaxis(np.asarray(array[:, y : y + height, x : x + width]), 0, -1)
        except Exception as exc:  # noqa: BLE001 (each codec raises its own error types)
            raise SlideReadError(
                f"{self.path}: cannot read pixels of level {level} at (x={x}, y={y}), size {width}x{height}: {exc}"
            ) from None
        return np.ascontiguousarray(pixels)

    def close(self) -> None:
        self._tif.close()


def prefer_over_openslide(path: str | os.PathLike, info: SlideInfo) -> bool:
    """True when tifffile sees more of a generic TIFF than OpenSlide: an OME-TIFF, or SubIFD levels."""
    if info.vendor != "generic-tiff":
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome:
                return True
            _, series = _main_series(tif)
            return len(series.levels) > info.level_count
    except Exception:  # noqa: BLE001 (whatever tifffile cannot parse stays with OpenSlide)
        return False
