"""Quick-look PNG: where the nuclei are and what they look like.

Left: the slide thumbnail under a semi-transparent nucleus-density heat map (nuclei per mm^2, with a
colour bar). Right: a full-resolution inset of the densest region with every nucleus outlined, and a box
on the thumbnail showing where the inset lies.

Frames: nuclei arrive as ``(centroid_x, centroid_y, polygon)`` in level-0 pixels (pixel-corner
convention); micrometres are ``level-0 px * slide_mpp``. The density grid has square cells of ``cell_um``
micrometres from the slide's top-left corner; thumbnail pixel (i, j) covers micrometres
``[i * thumb_um, (i + 1) * thumb_um)``. The nuclei are streamed twice (``nuclei()`` is called once per
pass): the first pass counts centroids per cell, the second draws only the nuclei inside the inset, so a
slide with millions of nuclei never holds them all in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon

from ..errors import OutputError
from ..geometry import Box

OUTLINE_RGB = (0, 255, 0)  # bright green: stands out on both haematoxylin and eosin
INSET_BOX_RGB = (255, 255, 255)
HEAT_ALPHA = 0.5  # opacity of the heat map where nuclei are
# Low density blue, high density red; a cell with no nuclei nearby stays transparent.
HEAT_STOPS = np.array(
    [(48, 18, 59), (70, 130, 250), (30, 220, 180), (180, 250, 60), (250, 180, 40), (200, 30, 10)], np.float64
)
BACKGROUND = (255, 255, 255)
TEXT_RGB = (20, 20, 20)
MARGIN = 12

# (centroid x, centroid y, outline): level-0 pixels; the outline as a geometry or its WKT text (parsed
# only for the nuclei the inset draws)
Nucleus = tuple[float, float, Polygon | MultiPolygon | str]


@dataclass(frozen=True)
class InsetSource:
    """Reads slide pixels for the inset: ``read(box)`` returns RGB of ``box`` in pixels of ``um_per_px``."""

    read: Callable[[Box], np.ndarray]
    um_per_px: float


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans where the system has it (it has the micro and superscript signs), else Pillow's own."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _label(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> str:
    """``text``, spelt in ASCII when the font has no micro or superscript-two sign."""
    if getattr(font, "path", None) and "DejaVu" in str(getattr(font, "path", "")):
        return text
    return text.replace("\u00b5m", "um").replace("mm\u00b2", "mm^2")


def _rings(geom: Polygon | MultiPolygon) -> Iterable[np.ndarray]:
    polys = geom.geoms if isinstance(geom, MultiPolygon) else [geom]
    for poly in polys:
        if isinstance(poly, Polygon) and not poly.is_empty:
            yield np.asarray(poly.exterior.coords)
            for interior in poly.interiors:
                yield np.asarray(interior.coords)


def _as_rgb(thumbnail: np.ndarray) -> np.ndarray:
    array = np.asarray(thumbnail)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"thumbnail must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    return np.ascontiguousarray(array[:, :, :3]).astype(np.uint8, copy=False)


# -- density -------------------------------------------------------------------------------------


def density_counts(
    centroids_l0: Iterable[tuple[float, float]], grid: tuple[int, int], slide_mpp: float, cell_um: float
) -> np.ndarray:
    """Centroids per cell of a (rows, cols) grid of ``cell_um`` squares; centroids outside are dropped."""
    counts = np.zeros(grid, np.float64)
    scale = slide_mpp / cell_um
    for x, y in centroids_l0:
        row, col = int(y * scale), int(x * scale)
        if 0 <= row < grid[0] and 0 <= col < grid[1] and y >= 0 and x >= 0:
            counts[row, col] += 1
    return counts


def cell_area_mm2(extent_um: tuple[float, float], grid: tuple[int, int], cell_um: float) -> np.ndarray:
    """Area (mm^2) of each cell inside the slide: the last row/column may be cut by the slide edge."""
    edges = [
        np.minimum(np.arange(1, n + 1) * cell_um, extent) - np.arange(n) * cell_um for n, extent in zip(grid, extent_um)
    ]
    return np.outer(*edges) / 1e6


def density_per_mm2(counts: np.ndarray, area_mm2: np.ndarray, smooth_cells: float) -> np.ndarray:
    """Nuclei per mm^2: Gaussian-smoothed counts over smoothed in-slide area (edges are not diluted)."""
    if smooth_cells > 0:
        counts = ndimage.gaussian_filter(counts, smooth_cells, mode="constant")
        area_mm2 = ndimage.gaussian_filter(area_mm2, smooth_cells, mode="constant")
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.where(area_mm2 > 0, counts / np.where(area_mm2 > 0, area_mm2, 1.0), 0.0)
    return density


def colourise(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB along :data:`HEAT_STOPS`."""
    position = np.clip(values, 0.0, 1.0) * (len(HEAT_STOPS) - 1)
    low = np.minimum(position.astype(int), len(HEAT_STOPS) - 2)
    frac = (position - low)[..., None]
    return np.rint(HEAT_STOPS[low] * (1 - frac) + HEAT_STOPS[low + 1] * frac).astype(np.uint8)


# Colours of the heat map at this many evenly spaced values of [0, 1]: a table lookup per preview pixel
# instead of interpolating between the stops there (colours within 1 of the exact ramp).
_HEAT_TABLE_SIZE = 4096


def _interpolation(n_out: int, cell_px: float, n_cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear weights along one axis: cell centres at ``(k + 0.5) * cell_px``; (lower cell, upper cell,
    weight of the upper)."""
    position = np.clip((np.arange(n_out) + 0.5) / cell_px - 0.5, 0, n_cells - 1)
    low = np.minimum(position.astype(int), n_cells - 1)
    return low, np.minimum(low + 1, n_cells - 1), (position - low).astype(np.float32)


def heat_overlay(density: np.ndarray, vmax: float, size: tuple[int, int], cell_px: tuple[float, float]) -> Image.Image:
    """RGBA image of ``size`` (W, H): density colour-mapped to [0, vmax], interpolated bilinearly between
    cell centres (cell (r, c) is centred on preview pixel ``((r + 0.5) * cell_px_y, (c + 0.5) * cell_px_x)``)."""
    width, height = size
    r0, r1, fr = _interpolation(height, cell_px[0], density.shape[0])
    c0, c1, fc = _interpolation(width, cell_px[1], density.shape[1])
    scaled_cells = (density / vmax if vmax > 0 else np.zeros_like(density)).astype(np.float32)
    # Separable: along rows on the small grid of cells, then along columns at full size.
    by_row = scaled_cells[r0] * (1 - fr[:, None]) + scaled_cells[r1] * fr[:, None]
    scaled = by_row[:, c0] * (1 - fc) + by_row[:, c1] * fc
    index = np.rint(np.clip(scaled, 0.0, 1.0) * (_HEAT_TABLE_SIZE - 1)).astype(np.intp)
    ramp = np.linspace(0.0, 1.0, _HEAT_TABLE_SIZE)
    # Sparse areas are fainter, so the tissue stays readable; nothing nearby: transparent.
    table = np.empty((_HEAT_TABLE_SIZE, 4), np.uint8)
    table[:, :3] = colourise(ramp)
    table[:, 3] = np.rint(255 * HEAT_ALPHA * (0.4 + 0.6 * ramp))
    rgba = table[index]
    rgba[scaled < 0.05, 3] = 0
    return Image.fromarray(rgba, "RGBA")


def densest_cell(density: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the highest density; None when there are no nuclei."""
    if density.size == 0 or not density.max() > 0:
        return None
    row, col = np.unravel_index(int(np.argmax(density)), density.shape)
    return int(row), int(col)


def inset_box(centre_um: tuple[float, float], side_um: float, extent_um: tuple[float, float], um_per_px: float) -> Box:
    """Square box (pixels of ``um_per_px``) of ``side_um`` centred on ``centre_um`` (y, x), moved inside the
    slide; smaller where the slide is smaller."""
    side_px = max(1, round(side_um / um_per_px))
    limits = [max(1, int(extent / um_per_px)) for extent in extent_um]
    start = []
    for centre, limit in zip(centre_um, limits):
        size = min(side_px, limit)
        start.append(int(min(max(round(centre / um_per_px - size / 2), 0), limit - size)))
    return Box(start[0], start[1], start[0] + min(side_px, limits[0]), start[1] + min(side_px, limits[1]))


# -- drawing -------------------------------------------------------------------------------------


def _draw_outlines(
    draw: ImageDraw.ImageDraw,
    geom: Polygon | MultiPolygon,
    fx: float,
    fy: float,
    ox: float,
    oy: float,
    colour: tuple[int, int, int],
) -> None:
    for ring in _rings(geom):
        # A pixel corner (x, y) is drawn on the pixel whose top-left it is: outlines hug the object's
        # top/left edge from inside and its bottom/right edge from outside, never shifting it by a pixel.
        xy = np.column_stack([ring[:, 0] * fx - ox, ring[:, 1] * fy - oy])
        draw.line([tuple(p) for p in xy.tolist()], fill=colour, width=1)


def _nice_ticks(vmax: float) -> list[float]:
    return [0.0, vmax / 2, vmax] if vmax > 0 else [0.0]


def _colour_bar(width: int, vmax: float, font, label_font) -> Image.Image:
    """Horizontal colour bar 0..vmax with a title and three tick labels."""
    bar_h, title_h, tick_h = 14, 20, 18
    image = Image.new("RGB", (width, title_h + bar_h + tick_h), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((0, 0), _label("Nucleus density (nuclei per mm\u00b2)", label_font), fill=TEXT_RGB, font=label_font)
    ramp = colourise(np.linspace(0, 1, width))[None].repeat(bar_h, axis=0)
    # The bar shows the colours as they are blended over white, as on the thumbnail's glass.
    blended = np.rint(ramp * HEAT_ALPHA + 255 * (1 - HEAT_ALPHA)).astype(np.uint8)
    image.paste(Image.fromarray(blended), (0, title_h))
    draw.rectangle([0, title_h, width - 1, title_h + bar_h - 1], outline=TEXT_RGB)
    for k, value in enumerate(_nice_ticks(vmax)):
        text = f"{value:,.0f}"
        text_w = draw.textlength(text, font=font)
        x = [0, (width - text_w) / 2, width - text_w][k]
        draw.text((x, title_h + bar_h + 2), text, fill=TEXT_RGB, font=font)
    return image


def render_preview(
    thumbnail: np.ndarray,
    thumb_um: float,
    slide_mpp: float,
    nuclei: Callable[[], Iterable[Nucleus]],
    path: str | os.PathLike,
    slide_shape_l0: tuple[int, int] | None = None,
    inset: InsetSource | None = None,
    max_px: int = 2048,
    cell_um: float = 50.0,
    inset_um: float = 256.0,
    title: str | None = None,
    color: tuple[int, int, int] = OUTLINE_RGB,
) -> tuple[int, int]:
    """Write the preview PNG to ``path`` and return its (H, W).

    ``thumbnail``: uint8 image of the whole slide at ``thumb_um`` micrometres per pixel (only ever shrunk,
    to a longest side of ``max_px``); ``slide_mpp``: micrometres per level-0 pixel; ``nuclei``: returns a
    fresh iterable of ``(centroid_x, centroid_y, polygon)`` in level-0 pixels each time it is called (polygon:
    a geometry or its WKT);
    ``slide_shape_l0``: (H, W) of level 0 (default: the thumbnail's extent); ``inset``: where the inset's
    pixels come from (None: no inset); ``cell_um``: density cell edge; ``inset_um``: inset edge.
    """
    if thumb_um <= 0 or slide_mpp <= 0 or max_px < 1 or cell_um <= 0 or inset_um <= 0:
        raise ValueError(
            f"thumb_um ({thumb_um}), slide_mpp ({slide_mpp}), max_px ({max_px}), cell_um ({cell_um}) and "
            f"inset_um ({inset_um}) must be positive"
        )
    rgb = _as_rgb(thumbnail)
    if slide_shape_l0 is None:
        extent_um = (rgb.shape[0] * thumb_um, rgb.shape[1] * thumb_um)
    else:
        extent_um = (slide_shape_l0[0] * slide_mpp, slide_shape_l0[1] * slide_mpp)
    grid = (max(1, int(np.ceil(extent_um[0] / cell_um))), max(1, int(np.ceil(extent_um[1] / cell_um))))

    # Pass 1: centroids -> density.
    counts = density_counts(((x, y) for x, y, _ in nuclei()), grid, slide_mpp, cell_um)
    total = int(counts.sum())
    density = density_per_mm2(counts, cell_area_mm2(extent_um, grid, cell_um), smooth_cells=1.0)
    vmax = float(density.max())

    # The thumbnail, shrunk to max_px, under the heat map.
    thumb = Image.fromarray(rgb)
    width, height = thumb.size
    shrink = min(1.0, max_px / max(width, height))
    if shrink < 1.0:
        thumb = thumb.resize((max(1, round(width * shrink)), max(1, round(height * shrink))), Image.Resampling.LANCZOS)
    # Micrometres per preview pixel, per axis (absorbs the rounding of the resized size).
    um_px = (thumb_um * height / thumb.size[1], thumb_um * width / thumb.size[0])
    overlay = heat_overlay(density, vmax, thumb.size, (cell_um / um_px[0], cell_um / um_px[1]))
    thumb = Image.alpha_composite(thumb.convert("RGBA"), overlay).convert("RGB")

    font, label_font, title_font = _font(13), _font(15), _font(18)
    panel_w = max(256, round(inset_um / inset.um_per_px)) if inset is not None else 256
    header_h = 30 if title else 0
    canvas_w = MARGIN + thumb.size[0] + MARGIN + panel_w + MARGIN
    bar = _colour_bar(panel_w, vmax, font, label_font)

    panel: list[tuple[Image.Image, int]] = []  # images stacked in the right column, with the gap above
    peak = densest_cell(density)
    if inset is not None and peak is not None:
        centre_um = ((peak[0] + 0.5) * cell_um, (peak[1] + 0.5) * cell_um)
        box = inset_box(centre_um, inset_um, extent_um, inset.um_per_px)
        crop = Image.fromarray(_as_rgb(inset.read(box)))
        if crop.size != (box.width, box.height):
            raise ValueError(f"inset read returned {crop.size[::-1]}, expected {box.shape}")
        # Pass 2: outlines of the nuclei whose centroid lies in (or near) the inset.
        to_inset = slide_mpp / inset.um_per_px
        near = box.grow(round(20 / inset.um_per_px))
        draw = ImageDraw.Draw(crop)
        for x, y, polygon in nuclei():
            if near.contains_point(y * to_inset, x * to_inset):
                outline = shapely.from_wkt(polygon) if isinstance(polygon, str) else polygon
                _draw_outlines(draw, outline, to_inset, to_inset, box.x0, box.y0, color)
        caption = Image.new("RGB", (panel_w, 40), BACKGROUND)
        cdraw = ImageDraw.Draw(caption)
        side = (box.height * inset.um_per_px, box.width * inset.um_per_px)
        cdraw.text((0, 0), "Densest region (white box), nuclei outlined", fill=TEXT_RGB, font=label_font)
        text = f"{side[1]:.0f} x {side[0]:.0f} \u00b5m at {inset.um_per_px:.2f} \u00b5m/px, {total:,} nuclei in all"
        cdraw.text((0, 20), _label(text, font), fill=TEXT_RGB, font=font)
        panel += [(caption, 0), (crop, 2), (bar, MARGIN)]
        # Where the inset lies, on the thumbnail.
        tdraw = ImageDraw.Draw(thumb)
        y0, x0 = box.y0 * inset.um_per_px / um_px[0], box.x0 * inset.um_per_px / um_px[1]
        y1, x1 = box.y1 * inset.um_per_px / um_px[0], box.x1 * inset.um_per_px / um_px[1]
        for grow, colour in ((1, (0, 0, 0)), (0, INSET_BOX_RGB)):
            tdraw.rectangle([x0 - 1 - grow, y0 - 1 - grow, x1 + grow, y1 + grow], outline=colour, width=1 + grow)
    else:
        note = Image.new("RGB", (panel_w, 24), BACKGROUND)
        ImageDraw.Draw(note).text(
            (0, 0), "No nuclei found" if total == 0 else "No inset", fill=TEXT_RGB, font=label_font
        )
        panel += [(note, 0), (bar, MARGIN)]

    panel_h = sum(image.size[1] + gap for image, gap in panel)
    canvas_h = header_h + MARGIN + max(thumb.size[1], panel_h) + MARGIN
    canvas = Image.new("RGB", (canvas_w, canvas_h), BACKGROUND)
    if title:
        ImageDraw.Draw(canvas).text((MARGIN, 8), title, fill=TEXT_RGB, font=title_font)
    canvas.paste(thumb, (MARGIN, header_h + MARGIN))
    y = header_h + MARGIN
    for image, gap in panel:
        y += gap
        canvas.paste(image, (MARGIN + thumb.size[0] + MARGIN, y))
        y += image.size[1]

    out = Path(path)
    try:
        canvas.save(out, format="PNG")
    except OSError as exc:
        raise OutputError(f"{out}: cannot write preview PNG ({exc.strerror or exc})") from None
    return canvas.size[1], canvas.size[0]
