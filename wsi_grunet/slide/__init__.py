"""Slide access (OpenSlide or tifffile, resampled to model pixels), discovery and tissue detection."""

from .discovery import SLIDE_EXTENSIONS, SlideEntry, find_slides, output_names
from .metadata import SlideInfo
from .reader import SlideReader, describe, inspect_slide, open_reader_cached
from .resample import ReadPlan, choose_level, plan_read
from .tissue import tile_has_tissue, tissue_mask

__all__ = [
    "SLIDE_EXTENSIONS",
    "ReadPlan",
    "SlideEntry",
    "SlideInfo",
    "SlideReader",
    "choose_level",
    "describe",
    "find_slides",
    "inspect_slide",
    "open_reader_cached",
    "output_names",
    "plan_read",
    "tile_has_tissue",
    "tissue_mask",
]
