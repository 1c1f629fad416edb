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
import shapely.affinity
from scipy import ndimage
from shapely.affinity import affine_transform
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.polygon import orient
from skimage.measure import find_contours

# Instance values are kept at least this far from the threshold (probability units), so that a contour
# never collapses onto a pixel centre where the probability barely passes (or misses) the threshold.
SUBPIXEL_MARGIN = 0.05

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


def circularity(area: float, perimeter: float) -> float:
    """4*pi*A/P^2 clipped to [0, 1] (1 for a disc; 0 for a degenerate outline)."""
    if perimeter <= 0:
        return 0.0
    return float(min(max(4.0 * math.pi * area / (perimeter * perimeter), 0.0), 1.0))


def instance_field(inside: np.ndarray, prob: np.ndarray, threshold: float) -> np.ndarray:
    """The field whose ``threshold`` contour outlines one instance (``inside``) on ``prob``.

    Every pixel gets an instance value ``m > threshold``: its probability, kept at least
    ``SUBPIXEL_MARGIN`` above the threshold (foreground), or its probability mirrored about the threshold
    (``2 t - p``, at least the margin above it) where it is at or below the threshold (background, filled
    holes). The field is ``m`` inside the instance and ``2 t - m`` outside it. So the bilinear contour
    crosses each edge between an inside and an outside pixel centre strictly between them (never more than
    half a pixel beyond the pixel edge), any two instances' fields are mirror images on both instances'
    pixels and equal and below the threshold elsewhere: their contours meet but never cross.
    """
    t = float(threshold)
    p = np.asarray(prob, dtype=np.float64)
    m = np.where(p > t, np.clip(p, t + SUBPIXEL_MARGIN, 1.0), 2.0 * t - np.minimum(p, t - SUBPIXEL_MARGIN))
    return np.where(inside, m, 2.0 * t - m)


def _crossing(a: float, b: float, t: float) -> float:
    """Where the linear interpolation from value a (at 0) to value b (at 1) equals t."""
    return (t - a) / (b - a)


def _saddle_losses(field: np.ndarray, inside: np.ndarray, other: np.ndarray, t: float) -> list[Polygon]:
    """Quadrilaterals to cut from an instance where it meets another region crosswise.

    In a 2 x 2 block with the instance on one diagonal and foreground of others on the other, both
    contours (traced with high values connected) would join their diagonal through the block's centre and
    overlap in the quadrilateral of the four edge crossings. The bilinear saddle value (mean of the four
    corners) decides: above the threshold the instance keeps the join, otherwise it gives up that
    quadrilateral, which the mirrored field of the other instance then keeps. Coordinates: (x, y) in the
    field's pixel-centre index frame."""
    a, b = inside[:-1, :-1], inside[:-1, 1:]
    c, d = inside[1:, :-1], inside[1:, 1:]
    oa, ob, oc, od = other[:-1, :-1], other[:-1, 1:], other[1:, :-1], other[1:, 1:]
    crossed = (a & d & ob & oc) | (b & c & oa & od)
    if not crossed.any():
        return []
    quads = []
    for r, q in zip(*np.nonzero(crossed)):
        v = field[r : r + 2, q : q + 2]
        if v.mean() > t:
            continue
        top = q + _crossing(v[0, 0], v[0, 1], t)
        bottom = q + _crossing(v[1, 0], v[1, 1], t)
        left = r + _crossing(v[0, 0], v[1, 0], t)
        right = r + _crossing(v[0, 1], v[1, 1], t)
        quads.append(Polygon([(top, r), (q + 1, right), (bottom, r + 1), (q, left)]))
    return quads


def _ring_moments(xy: np.ndarray) -> np.ndarray:
    """Signed area, first and second moments (A, Sx, Sy, Sxx, Syy, Sxy) of a closed ring (K, 2) by Green's theorem."""
    x0, y0 = xy[:-1, 0], xy[:-1, 1]
    x1, y1 = xy[1:, 0], xy[1:, 1]
    cross = x0 * y1 - x1 * y0
    return np.array(
        [
            cross.sum() / 2.0,
            ((x0 + x1) * cross).sum() / 6.0,
            ((y0 + y1) * cross).sum() / 6.0,
            ((x0 * x0 + x0 * x1 + x1 * x1) * cross).sum() / 12.0,
            ((y0 * y0 + y0 * y1 + y1 * y1) * cross).sum() / 12.0,
            ((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross).sum() / 24.0,
        ]
    )


def _polygon_moments(polygon: Polygon) -> np.ndarray:
    """Moments of a polygon, holes subtracted (rings wound as :func:`orient` leaves them)."""
    polygon = orient(polygon, sign=1.0)
    return sum((_ring_moments(np.asarray(r.coords)) for r in [polygon.exterior, *polygon.interiors]), np.zeros(6))


def axes_from_moments(moments: np.ndarray) -> tuple[float, float, float]:
    """Major and minor axis length and eccentricity of the ellipse with the region's second moments."""
    area, sx, sy, sxx, syy, sxy = moments
    if area <= 0:
        return 0.0, 0.0, 0.0
    cx, cy = sx / area, sy / area
    cxx, cyy, cxy = sxx / area - cx * cx, syy / area - cy * cy, sxy / area - cx * cy
    half_trace = (cyy + cxx) / 2.0
    spread = math.sqrt(max(((cyy - cxx) / 2.0) ** 2 + cxy * cxy, 0.0))
    l1, l2 = max(half_trace + spread, 0.0), max(half_trace - spread, 0.0)
    eccentricity = math.sqrt(1.0 - l2 / l1) if l1 > 0 else 0.0
    return 4.0 * math.sqrt(l1), 4.0 * math.sqrt(l2), eccentricity


def subpixel_outline(inside: np.ndarray, prob: np.ndarray, threshold: float) -> tuple[np.ndarray | None, Polygon]:
    """Sub-pixel outline of one instance, (x, y) = (column, row) index coordinates of the crop.

    ``inside`` and ``prob`` are a crop whose outermost rows and columns hold no instance pixel (the
    instance's box plus a one-pixel margin; pixels beyond the slide count as probability 0). The outline is
    the ``threshold`` contour of the bilinearly interpolated :func:`instance_field` (marching squares,
    diagonal neighbours joined), so it depends on the probability and on which pixels are the instance
    within one pixel of it, nothing else. Holes stay as interior rings; where only a diagonal contact
    joins parts, the largest part is kept.

    Returns ``(ring, polygon)``: for the common case of one simple outline, ``ring`` is its closed
    (K, 2) counter-clockwise vertex array and ``polygon`` is empty (the caller builds polygons in bulk);
    otherwise ``ring`` is None and ``polygon`` is the outline (empty if there is none)."""
    t = float(threshold)
    field = instance_field(inside, prob, t)
    contours = find_contours(field, t, fully_connected="high")
    rings = [c[:, ::-1] for c in contours if len(c) >= 4]  # (row, col) -> (x, y)
    other = ~inside & (prob > t)
    quads = _saddle_losses(field, inside, other, t)
    if len(rings) == 1 and not quads:
        ring = rings[0]
        if _signed_area(ring) > 0:
            return ring, Polygon()
    areas = [_signed_area(r) for r in rings]
    shells = [k for k, area in enumerate(areas) if area > 0]
    if not shells:
        return None, Polygon()
    parts = shapely.union_all([Polygon(rings[k]) for k in shells])
    holes = [Polygon(rings[k]) for k, area in enumerate(areas) if area < 0]
    polygon = shapely.make_valid(shapely.difference(parts, shapely.union_all(holes))) if holes else parts
    if quads:
        polygon = shapely.make_valid(shapely.difference(polygon, shapely.union_all(quads)))
    polygon = largest_polygon(polygon)
    if not polygon.is_valid:
        polygon = largest_polygon(shapely.make_valid(polygon))
    return None, orient(polygon, sign=1.0)


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0


def _rings_moments(coords: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(n, 6) moments of n closed rings stored one after another in ``coords`` (starts: first row of each)."""
    x0, y0 = coords[:-1, 0], coords[:-1, 1]
    x1, y1 = coords[1:, 0], coords[1:, 1]
    cross = x0 * y1 - x1 * y0
    ends = np.append(starts[1:], len(coords)) - 1  # the segment from a ring's last vertex to the next ring's first
    cross[ends[:-1]] = 0.0  # joins two rings: not a segment
    terms = np.stack(
        [
            cross / 2.0,
            (x0 + x1) * cross / 6.0,
            (y0 + y1) * cross / 6.0,
            (x0 * x0 + x0 * x1 + x1 * x1) * cross / 12.0,
            (y0 * y0 + y0 * y1 + y1 * y1) * cross / 12.0,
            (x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross / 24.0,
        ],
        axis=1,
    )
    return np.add.reduceat(terms, starts, axis=0) if len(terms) else np.zeros((len(starts), 6))


def nuclei_records(
    labels: np.ndarray,
    prob: np.ndarray,
    origin_yx: tuple[int, int],
    model_mpp: float,
    level0_per_model: float,
    simplify_px: float = 0.0,
    threshold: float = 0.5,
    outline: str = "subpixel",
) -> list[NucleusRecord]:
    """Measure and outline every labelled nucleus.

    ``labels``: int (H, W) model pixels, 0 = background, ids >= 1. ``prob``: float (H, W) nucleus
    probability. ``origin_yx``: model-pixel position of ``labels[0, 0]`` in the slide. ``model_mpp``:
    micrometres per model pixel. ``level0_per_model``: level-0 pixels per model pixel (model_mpp /
    slide_mpp). ``threshold``: the foreground threshold the labels were made with. ``outline``:
    ``"subpixel"`` (default) outlines each nucleus by the threshold contour of the interpolated probability,
    confined to its own pixels (:func:`subpixel_outline`); ``"pixels"`` follows the pixel edges.
    ``simplify_px``: Douglas-Peucker tolerance in model pixels (0: none).

    Area, perimeter, circularity, solidity and the moment axes are measured on the outline; the centroid,
    box and mean probability on the pixels (the centroid is the one tile ownership uses). Only the labels
    and probability within one pixel of a nucleus enter its record, so tiles agree with a single pass.
    Per-pixel sums are one pass over the array, outlines are traced on bounding-box crops, and polygons
    and their measurements are built for all nuclei at once.
    """
    if labels.ndim != 2 or prob.shape != labels.shape:
        raise ValueError(f"labels {labels.shape} and prob {prob.shape} must be equal 2-D shapes")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got {labels.dtype}")
    if model_mpp <= 0 or level0_per_model <= 0:
        raise ValueError(f"model_mpp ({model_mpp}) and level0_per_model ({level0_per_model}) must be positive")
    if outline not in ("subpixel", "pixels"):
        raise ValueError(f"outline must be 'subpixel' or 'pixels', got {outline!r}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold!r}")
    labels = np.where(labels > 0, labels, 0)
    boxes = ndimage.find_objects(labels) if labels.size else []
    if not boxes:
        return []
    oy, ox = origin_yx
    f = float(level0_per_model)
    width = labels.shape[1]
    # One pass over the array for every per-pixel sum (ids index the bins).
    # Over the nuclei's pixels only (a tile is mostly background); each bin still adds its pixels in
    # raster order, so the sums are those of a pass over the whole array.
    where = np.flatnonzero(labels)
    flat = labels.ravel()[where]
    n = len(boxes) + 1
    rows, cols = np.divmod(where, width)
    counts = np.bincount(flat, minlength=n)
    sum_y = np.bincount(flat, weights=rows, minlength=n)
    sum_x = np.bincount(flat, weights=cols, minlength=n)
    sum_p = np.bincount(flat, weights=np.asarray(prob, dtype=np.float64).ravel()[where], minlength=n)
    # Padded once (beyond the array: background, probability 0), so every crop has its one-pixel margin.
    padded_labels = np.pad(labels, 1)
    padded_prob = np.pad(np.asarray(prob, dtype=np.float64), 1)

    ids: list[int] = []
    origins: list[tuple[float, float]] = []  # model-pixel slide position of each crop's index (0, 0) centre
    shapes: list[Polygon | None] = []
    simple_rings: list[np.ndarray] = []
    simple_of: list[int] = []
    for index, window in enumerate(boxes):
        if window is None:
            continue
        local_id = index + 1
        ys = slice(window[0].start, window[0].stop + 2)  # padded frame: the box plus one pixel each side
        xs = slice(window[1].start, window[1].stop + 2)
        inside = padded_labels[ys, xs] == local_id
        if outline == "subpixel":
            ring, shape = subpixel_outline(inside, padded_prob[ys, xs], threshold)
        else:
            ring, shape = None, largest_polygon(trace_mask(inside)[0])
            shape = shapely.affinity.translate(shape, -0.5, -0.5)  # corner frame -> centre index frame
        if ring is None and shape.is_empty:
            continue
        ids.append(local_id)
        # Crop index (c, r) is padded pixel (xs.start + c, ys.start + r): model pixel centre + 0.5 - 1.
        origins.append((ox + xs.start - 0.5, oy + ys.start - 0.5))
        if ring is not None and simplify_px <= 0:
            simple_of.append(len(shapes))
            simple_rings.append(ring)
            shapes.append(None)
        else:
            if ring is not None:
                shape = Polygon(ring)
            if simplify_px > 0:
                shape = largest_polygon(shapely.make_valid(shape.simplify(simplify_px, preserve_topology=True)))
                shape = orient(shape, sign=1.0)
            shapes.append(shape)
    if not ids:
        return []

    count = len(ids)
    moments = np.zeros((count, 6))
    geoms = np.empty(count, dtype=object)
    if simple_rings:
        sizes = np.array([len(r) for r in simple_rings])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        coords = np.concatenate(simple_rings)
        moments[simple_of] = _rings_moments(coords, starts)
        # Crop index frame -> level-0 pixels, then one bulk construction of rings and polygons.
        shift = np.repeat(np.asarray(origins)[simple_of], sizes, axis=0)
        ring_ids = np.repeat(np.arange(len(simple_rings)), sizes)
        rings = shapely.linearrings(f * (coords + shift), indices=ring_ids)
        geoms[simple_of] = shapely.polygons(rings)
    for k, shape in enumerate(shapes):
        if shape is not None:
            moments[k] = _polygon_moments(shape)
            x0, y0 = origins[k]
            geoms[k] = affine_transform(shape, [f, 0.0, 0.0, f, f * x0, f * y0])
    areas_px = moments[:, 0]
    perimeters_px = shapely.length(geoms) / f
    hull_px = shapely.area(shapely.convex_hull(geoms)) / (f * f)
    pixel_um2 = model_mpp * model_mpp
    records: list[NucleusRecord] = []
    for k, local_id in enumerate(ids):
        n_px = counts[local_id]
        window = boxes[local_id - 1]
        area_um2 = float(areas_px[k] * pixel_um2)
        perimeter_um = float(perimeters_px[k] * model_mpp)
        major_px, minor_px, eccentricity = axes_from_moments(moments[k])
        records.append(
            NucleusRecord(
                local_id=local_id,
                centroid_x=float((ox + sum_x[local_id] / n_px + 0.5) * f),
                centroid_y=float((oy + sum_y[local_id] / n_px + 0.5) * f),
                bbox_x0=float((ox + window[1].start) * f),
                bbox_y0=float((oy + window[0].start) * f),
                bbox_x1=float((ox + window[1].stop) * f),
                bbox_y1=float((oy + window[0].stop) * f),
                area_um2=area_um2,
                perimeter_um=perimeter_um,
                circularity=circularity(area_um2, perimeter_um),
                mean_probability=float(sum_p[local_id] / n_px),
                eccentricity=float(eccentricity),
                solidity=float(min(areas_px[k] / hull_px[k], 1.0)) if hull_px[k] > 0 else 1.0,
                major_axis_um=major_px * model_mpp,
                minor_axis_um=minor_px * model_mpp,
                polygon=geoms[k],
            )
        )
    return records
