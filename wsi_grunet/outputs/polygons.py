"""Instance labels -> one measured polygon per nucleus, in level-0 slide pixels.

Frames: ``labels`` and ``prob`` are in model pixels (y, x), with ``origin_yx`` the model-pixel position of
``labels[0, 0]`` in the slide. Polygons, centroids and boxes of a :class:`NucleusRecord` are in level-0
pixels with the pixel-corner convention QuPath uses: pixel (row i, column j) covers x in [j, j+1) and
y in [i, i+1). Areas and lengths are in micrometres.

Contours follow pixel *edges*, so the unsimplified polygon covers exactly the nucleus' pixels. They are
traced with marching squares on the padded mask (which passes through the midpoints of the boundary edges)
and then snapped to the pixel corners between those midpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np
import shapely
from scipy import ndimage
from shapely.affinity import affine_transform
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.polygon import orient
from skimage.measure import find_contours

# (record attribute, display name) of every per-nucleus measurement, in output order. The GeoJSON uses the
# display names, the table the attribute names; both come from this one list.
MEASUREMENTS: tuple[tuple[str, str], ...] = (
    ("area_um2", "Area um^2"),
    ("perimeter_um", "Perimeter um"),
    ("circularity", "Circularity"),
    ("mean_probability", "Mean probability"),
    ("eccentricity", "Eccentricity"),
    ("solidity", "Solidity"),
    ("major_axis_um", "Major axis um"),
    ("minor_axis_um", "Minor axis um"),
)


@dataclass(frozen=True)
class NucleusRecord:
    """One nucleus. Positions in level-0 pixels (x right, y down); sizes in micrometres.

    ``local_id`` is the nucleus' value in the label array it came from. ``centroid_*`` is the mean of its
    pixel centres. ``bbox_*`` is the half-open pixel-edge box (x1, y1 exclusive). ``area_um2`` counts pixels;
    ``perimeter_um`` is the length of the boundary through the midpoints of the boundary pixel edges
    (all parts and holes; see :func:`trace_mask`); ``circularity`` is
    4*pi*area/perimeter^2 clipped to [0, 1]. ``eccentricity`` and the axis lengths come from the second
    moments of the pixel centres (ellipse of equal moments); ``solidity`` is pixel area over the area of the
    convex hull of the exact pixel outline. ``polygon`` is valid, exterior counter-clockwise in x-right/y-up
    terms (clockwise as seen on screen), holes kept as interior rings.
    """

    local_id: int
    centroid_x: float
    centroid_y: float
    bbox_x0: float
    bbox_y0: float
    bbox_x1: float
    bbox_y1: float
    area_um2: float
    perimeter_um: float
    circularity: float
    mean_probability: float
    eccentricity: float
    solidity: float
    major_axis_um: float
    minor_axis_um: float
    polygon: Polygon

    def measurements(self) -> dict[str, float]:
        """Display name -> value for every entry of :data:`MEASUREMENTS`."""
        return {label: float(getattr(self, attr)) for attr, label in MEASUREMENTS}


def ring_on_pixel_edges(contour: np.ndarray) -> np.ndarray:
    """Snap a closed marching-squares contour of a binary mask (level 0.5) to pixel corners.

    ``contour`` is (K, 2) (row, col) in pixel-centre index coordinates, first point == last point. Every
    point is the midpoint of a boundary pixel edge: a half-integer row for an edge between two rows, a
    half-integer column for an edge between two columns. Where consecutive points lie on edges of different
    orientation, the outline turns at the pixel corner they share; those corners are all the vertices of the
    exact pixel outline. Returns (M, 2) (x, y) corner coordinates, still in pixel-centre index units
    (integer + 0.5), not closed.
    """
    pts = contour[:-1]
    nxt = np.roll(pts, -1, axis=0)
    on_row_line = (pts[:, 0] % 1.0) != 0.0
    next_on_row_line = np.roll(on_row_line, -1)
    turn = on_row_line != next_on_row_line
    corner_y = np.where(on_row_line, pts[:, 0], nxt[:, 0])[turn]
    corner_x = np.where(on_row_line, nxt[:, 1], pts[:, 1])[turn]
    return np.stack([corner_x, corner_y], axis=1)


def trace_mask(mask: np.ndarray) -> tuple[Polygon | MultiPolygon, float]:
    """Exact pixel-edge outline of a boolean mask and a perimeter estimate, both in mask pixels.

    The outline is in the mask's own pixel-corner coordinates (x, y). All rings (outer outlines and holes)
    are combined with even-odd filling, which is right for any nesting; diagonal-only pixel contacts may
    leave a MultiPolygon, and the caller decides what to keep. The perimeter is the total length of the
    marching-squares contours through the boundary-edge midpoints: the pixel staircase overstates the
    length of a smooth outline by up to 4/pi at any resolution, the midpoint path by a few percent.
    """
    padded = np.pad(mask, 1).astype(np.float64)
    contours = [c for c in find_contours(padded, 0.5) if len(c) >= 4]
    perimeter = float(sum(np.hypot(*np.diff(c, axis=0).T).sum() for c in contours))
    # Padding by one pixel closes every contour; its offset cancels the +0.5 from centre to corner frame.
    rings = [ring_on_pixel_edges(c) - 0.5 for c in contours]
    polys = [Polygon(r) for r in rings if len(r) >= 3]
    if not polys:
        return Polygon(), perimeter
    if len(polys) == 1 and polys[0].is_valid:
        return polys[0], perimeter
    polys = [shapely.make_valid(p) for p in polys]
    return reduce(lambda a, b: a.symmetric_difference(b), polys), perimeter


def mask_polygon(mask: np.ndarray) -> Polygon | MultiPolygon:
    """Exact pixel-edge outline of a boolean mask (see :func:`trace_mask`)."""
    return trace_mask(mask)[0]


def largest_polygon(geom) -> Polygon:
    """The largest-area Polygon of any geometry (an empty Polygon if there is none)."""
    if isinstance(geom, Polygon):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    parts = [p for g in parts for p in (g.geoms if isinstance(g, MultiPolygon) else [g])]
    return max(parts, key=lambda p: p.area) if parts else Polygon()


def moment_axes(ys: np.ndarray, xs: np.ndarray) -> tuple[float, float, float]:
    """Major and minor axis length (pixels) and eccentricity of the ellipse with the same second moments."""
    dy = ys - ys.mean()
    dx = xs - xs.mean()
    cyy, cxx, cxy = float(np.mean(dy * dy)), float(np.mean(dx * dx)), float(np.mean(dx * dy))
    half_trace = (cyy + cxx) / 2.0
    spread = math.sqrt(max(((cyy - cxx) / 2.0) ** 2 + cxy * cxy, 0.0))
    l1, l2 = half_trace + spread, max(half_trace - spread, 0.0)
    eccentricity = math.sqrt(1.0 - l2 / l1) if l1 > 0 else 0.0
    return 4.0 * math.sqrt(l1), 4.0 * math.sqrt(l2), eccentricity


def circularity(area: float, perimeter: float) -> float:
    """4*pi*A/P^2 clipped to [0, 1] (1 for a disc; 0 for a degenerate outline)."""
    if perimeter <= 0:
        return 0.0
    return float(min(max(4.0 * math.pi * area / (perimeter * perimeter), 0.0), 1.0))


def nuclei_records(
    labels: np.ndarray,
    prob: np.ndarray,
    origin_yx: tuple[int, int],
    model_mpp: float,
    level0_per_model: float,
    simplify_px: float = 0.5,
) -> list[NucleusRecord]:
    """Measure and outline every labelled nucleus.

    ``labels``: int (H, W) model pixels, 0 = background, ids >= 1. ``prob``: float (H, W) nucleus
    probability. ``origin_yx``: model-pixel position of ``labels[0, 0]`` in the slide. ``model_mpp``:
    micrometres per model pixel. ``level0_per_model``: level-0 pixels per model pixel (model_mpp /
    slide_mpp). ``simplify_px``: Douglas-Peucker tolerance in model pixels (0 keeps the exact pixel
    outline; the default drops collinear vertices and the shallowest staircase jags only, so the polygon's
    area stays within a few percent of the pixel area). Work is per-instance on bounding-box crops, so cost
    is linear in pixels.
    """
    if labels.ndim != 2 or prob.shape != labels.shape:
        raise ValueError(f"labels {labels.shape} and prob {prob.shape} must be equal 2-D shapes")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got {labels.dtype}")
    if model_mpp <= 0 or level0_per_model <= 0:
        raise ValueError(f"model_mpp ({model_mpp}) and level0_per_model ({level0_per_model}) must be positive")
    oy, ox = origin_yx
    f = float(level0_per_model)
    pixel_um2 = model_mpp * model_mpp
    records: list[NucleusRecord] = []
    for index, window in enumerate(ndimage.find_objects(labels)):
        if window is None:
            continue
        local_id = index + 1
        mask = labels[window] == local_id
        ys, xs = np.nonzero(mask)
        cy0, cx0 = window[0].start, window[1].start
        outline, perimeter_px = trace_mask(mask)
        exact = largest_polygon(outline)
        if exact.is_empty:
            continue
        shape = exact.simplify(simplify_px, preserve_topology=True) if simplify_px > 0 else exact
        shape = largest_polygon(shape if shape.is_valid else shapely.make_valid(shape))
        # Crop pixel-corner frame -> slide model pixels -> level-0 pixels.
        polygon = orient(affine_transform(shape, [f, 0.0, 0.0, f, f * (ox + cx0), f * (oy + cy0)]), sign=1.0)
        n_px = ys.size
        area_um2 = n_px * pixel_um2
        perimeter_um = perimeter_px * model_mpp
        hull_area = exact.convex_hull.area
        major_px, minor_px, eccentricity = moment_axes(ys.astype(np.float64), xs.astype(np.float64))
        records.append(
            NucleusRecord(
                local_id=local_id,
                centroid_x=float((ox + cx0 + xs.mean() + 0.5) * f),
                centroid_y=float((oy + cy0 + ys.mean() + 0.5) * f),
                bbox_x0=float((ox + window[1].start) * f),
                bbox_y0=float((oy + window[0].start) * f),
                bbox_x1=float((ox + window[1].stop) * f),
                bbox_y1=float((oy + window[0].stop) * f),
                area_um2=float(area_um2),
                perimeter_um=float(perimeter_um),
                circularity=circularity(area_um2, perimeter_um),
                mean_probability=float(prob[window][mask].mean(dtype=np.float64)),
                eccentricity=float(eccentricity),
                solidity=float(min(n_px / hull_area, 1.0)) if hull_area > 0 else 1.0,
                major_axis_um=major_px * model_mpp,
                minor_axis_um=minor_px * model_mpp,
                polygon=polygon,
            )
        )
    return records
