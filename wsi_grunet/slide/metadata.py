"""What a slide says about itself: ``SlideInfo`` and the pixel size, from OpenSlide properties, TIFF
resolution tags or OME-XML, each taken only when plausible.

No backend is imported here: the functions take plain property mappings and XML text, so they are
tested without files.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: Pixel sizes outside this range (um/px) are not taken from a file: generic TIFF resolution tags
#: often hold a scanner-independent default (72 dpi is 352.8 um/px), not the optics.
PLAUSIBLE_MPP = (0.05, 20.0)

# OpenSlide's standard property names (kept as text so this module needs no OpenSlide).
PROPERTY_MPP_X = "openslide.mpp-x"
PROPERTY_MPP_Y = "openslide.mpp-y"
PROPERTY_OBJECTIVE_POWER = "openslide.objective-power"
PROPERTY_VENDOR = "openslide.vendor"

# Micrometres per OME length unit (the OME schema's UnitsLength symbols and a few spellings of them).
_OME_UNIT_UM = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "in": 25400.0,
    "inch": 25400.0,
}


@dataclass(frozen=True)
class SlideInfo:
    """What a backend reports about a slide. Sizes are (width, height), as OpenSlide gives them.

    ``mpp_x``/``mpp_y`` are um per level-0 pixel, or None when the file records none or records an
    implausible value; ``mpp_rejected`` then holds that implausible value (um/px) for messages.
    ``mpp_source`` says where the pixel size came from; ``backend`` which library reads the pixels.
    """

    path: str
    vendor: str | None
    width: int
    height: int
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    associated_images: tuple[str, ...]
    mpp_rejected: float | None = None
    mpp_source: str | None = None
    backend: str = "openslide"

    @property
    def mpp(self) -> float | None:
        """Mean of ``mpp_x`` and ``mpp_y`` (um/px), or None."""
        if self.mpp_x is None or self.mpp_y is None:
            return None
        return (self.mpp_x + self.mpp_y) / 2.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists)."""
        data = asdict(self)
        data["level_dimensions"] = [list(dims) for dims in self.level_dimensions]
        data["level_downsamples"] = list(self.level_downsamples)
        data["associated_images"] = list(self.associated_images)
        return data


@dataclass(frozen=True)
class PixelSize:
    """A pixel size found in a file: um/px per axis (None when absent or implausible)."""

    mpp_x: float | None
    mpp_y: float | None
    source: str | None = None
    rejected: float | None = None


def float_or_none(value: object) -> float | None:
    """``value`` as a finite float, or None."""
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def plausible(mpp: float | None) -> bool:
    return mpp is not None and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def level_downsamples(level_dimensions: tuple[tuple[int, int], ...]) -> tuple[float, ...]:
    """Level-0 size over level size, averaged over both axes (OpenSlide's definition)."""
    width0, height0 = level_dimensions[0]
    return tuple((width0 / w + height0 / h) / 2.0 for w, h in level_dimensions)


def tiff_resolution_mpp(resolution: object, unit: object) -> float | None:
    """um/px from a TIFF X/YResolution (pixels per unit) when the unit is a length (cm or inch).

    ``unit`` is OpenSlide's text ("centimeter", "inch") or the TIFF ResolutionUnit code (2 inch, 3 cm).
    """
    value = float_or_none(resolution)
    key = str(unit).lower() if unit is not None else ""
    microns_per_unit = {"centimeter": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}.get(key)
    if value is None or value <= 0 or microns_per_unit is None:
        return None
    return microns_per_unit / value


def pick_pixel_size(candidates: list[tuple[str, float | None, float | None]]) -> PixelSize:
    """The first candidate ``(source, mpp_x, mpp_y)`` whose values are plausible.

    A candidate with one axis missing uses the other for both. Remembers the first implausible value
    so a message can say what the file claimed.
    """
    rejected = None
    for source, mpp_x, mpp_y in candidates:
        if mpp_x is None and mpp_y is None:
            continue
        mpp_x = mpp_x if mpp_x is not None else mpp_y
        mpp_y = mpp_y if mpp_y is not None else mpp_x
        if plausible(mpp_x) and plausible(mpp_y):
            return PixelSize(mpp_x, mpp_y, source)
        if rejected is None:
            rejected = mpp_x if not plausible(mpp_x) else mpp_y
    return PixelSize(None, None, None, rejected)


def openslide_pixel_size(properties: Mapping[str, str]) -> PixelSize:
    """OpenSlide's mpp, else TIFF resolution tags, each only if plausible.

    OpenSlide 4 itself derives ``openslide.mpp-x`` from TIFF resolution tags for generic TIFFs, so
    the plausibility check applies to every source.
    """
    unit = properties.get("tiff.ResolutionUnit")
    return pick_pixel_size(
        [
            (
                "openslide.mpp-x/y",
                float_or_none(properties.get(PROPERTY_MPP_X)),
                float_or_none(properties.get(PROPERTY_MPP_Y)),
            ),
            (
                "TIFF resolution tags",
                tiff_resolution_mpp(properties.get("tiff.XResolution"), unit),
                tiff_resolution_mpp(properties.get("tiff.YResolution"), unit),
            ),
        ]
    )


def ome_unit_um(unit: str | None) -> float | None:
    """Micrometres per OME length unit; OME's default unit is the micrometre. None if unknown."""
    if unit is None or unit == "":
        return 1.0
    text = unit.strip()
    return _OME_UNIT_UM.get(text, _OME_UNIT_UM.get(text.lower()))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def ome_pixels(ome_xml: str) -> list[dict[str, str]]:
    """Attributes of each Image's Pixels element, in document order. Empty for unparsable XML."""
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return []
    found = []
    for image in root.iter():
        if _local(image.tag) != "Image":
            continue
        for child in image:
            if _local(child.tag) == "Pixels":
                found.append(dict(child.attrib))
                break
    return found


def ome_pixel_size(pixels: Mapping[str, str]) -> tuple[float | None, float | None]:
    """(x, y) um/px from an OME Pixels element's PhysicalSizeX/Y and their units (None if absent/unknown)."""
    result = []
    for axis in ("X", "Y"):
        value = float_or_none(pixels.get(f"PhysicalSize{axis}"))
        factor = ome_unit_um(pixels.get(f"PhysicalSize{axis}Unit"))
        result.append(None if value is None or value <= 0 or factor is None else value * factor)
    return result[0], result[1]
