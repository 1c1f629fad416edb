"""Which library reads a slide's pixels, behind one small protocol.

OpenSlide first (it knows the vendor formats); tifffile when OpenSlide declines a TIFF, or when it
would read a pyramidal OME-TIFF / SubIFD pyramid as one level without a pixel size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import SlideOpenError
from .metadata import SlideInfo
from .openslide_backend import OpenSlideBackend, OpenSlideDeclined, open_openslide
from .tiff_backend import NotBrightfieldError, TiffBackend, chunk_table_problem, prefer_over_openslide


class SlideBackend(Protocol):
    """Pixels and metadata of one slide file. Coordinates are pixels of the level read."""

    name: str  # "openslide" | "tifffile"
    info: SlideInfo  # level dimensions, downsamples, pixel size

    @property
    def properties(self) -> Mapping[str, str]: ...

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB or RGBA uint8 (height, width, 3|4) from level pixel (x, y); the region lies inside the level."""
        ...

    def region_origin(self, level: int, x: int, y: int) -> tuple[float, float]:
        """Where a read asked for at (x, y) really starts, in level pixels (x, y)."""
        ...

    def close(self) -> None: ...


def open_backend(path: str | os.PathLike) -> SlideBackend:
    """Open ``path`` with the backend that reads it best. Raises SlideOpenError naming the file."""
    path = Path(path)
    if not path.exists():
        raise SlideOpenError(f"{path}: no such file")
    if path.is_dir():
        raise SlideOpenError(f"{path}: is a folder, not a slide file")
    problem = chunk_table_problem(path)  # before OpenSlide, which a corrupt TIFF can crash
    if problem is not None:
        raise SlideOpenError(f"{path}: {problem}")
    try:
        handle = open_openslide(path)
    except OpenSlideDeclined as declined:
        return _tifffile_instead(path, declined)
    backend = OpenSlideBackend(path, handle)
    if not prefer_over_openslide(path, backend.info):
        return backend
    backend.close()
    return TiffBackend(path)  # its refusal (e.g. a fluorescence image) is the answer


def _tifffile_instead(path: Path, declined: OpenSlideDeclined) -> SlideBackend:
    """tifffile for a file OpenSlide declined; OpenSlide's reason (and tifffile's) when neither reads it."""
    try:
        return TiffBackend(path)
    except NotBrightfieldError:
        raise
    except SlideOpenError as refused:
        reason = str(refused).removeprefix(f"{path}: ")
        if reason.startswith("not a TIFF file"):
            raise declined from None
        raise SlideOpenError(f"{declined}; tifffile cannot read it either: {reason}") from None
