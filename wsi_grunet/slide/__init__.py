"""Slide access (OpenSlide, resampled to model pixels) and tissue detection."""

from .reader import (
    SLIDE_EXTENSIONS,
    SlideInfo,
    SlideReader,
    choose_level,
    describe,
    find_slides,
    inspect_slide,
    open_reader_cached,
)
from .tissue import tile_has_tissue, tissue_mask

__all__ = [
    "SLIDE_EXTENSIONS",
    "SlideInfo",
    "SlideReader",
    "choose_level",
    "describe",
    "find_slides",
    "inspect_slide",
    "open_reader_cached",
    "tile_has_tissue",
    "tissue_mask",
]
