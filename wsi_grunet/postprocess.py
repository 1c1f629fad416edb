"""Turn a nucleus probability map into nucleus instances (integer label images).

Everything here is pure numpy / scipy / scikit-image and works on one array at a time, in the
array's own pixel frame: ``labels[row, col]``. Physical sizes are given in microns and converted
with ``mpp`` (microns per pixel of the arrays passed in, i.e. model pixels).

Locality contract
-----------------
Foreground is ``prob > threshold``; a *component* is an 8-connected set of foreground pixels (with
its own small holes filled, see ``HOLE_MAX_UM2``). The instances inside a component depend only
on the values of ``prob`` (and ``distance``) on that component and on the fact that its one-pixel
outline is background: the locality radius is 1 pixel. Nothing is computed from image-wide
statistics: there is no global threshold selection or normalisation, the distance transform is
smoothed inside each component separately, and marker suppression never compares markers of
different components. Hence post-processing any crop that contains a component together with a
one-pixel margin (the component does not touch the crop edge) yields the same instances, pixel for
pixel, as post-processing the whole image. Tile stitching (``wsi_grunet.ownership``) relies on this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.morphology import local_maxima
from skimage.segmentation import watershed

from .errors import ConfigError
from .packing import pack_components

# Background regions enclosed by a single component and smaller than this are filled: they are
# low-probability spots inside a nucleus (nucleoli, pale chromatin), far smaller than any nucleus.
HOLE_MAX_UM2 = 16.0
# Light Gaussian smoothing (pixels) of the distance transform, done inside each component
# separately; it evens out the pixel-discretisation bumps along the ridge of elongated nuclei.
SMOOTHING_SIGMA_PX = 1.0
# A maximum of the smoothed distance becomes a marker only if it rises at least this far (pixels)
# above the saddle joining it to a higher maximum. Chosen on synthetic nuclei of radius 5-12 px
# with noisy edges: ellipses up to 3:1 stay whole, discs whose centres are >= 1.4 radii apart split.
MARKER_DYNAMIC_PX = 0.35
# More levels than this add distance transforms without changing the relief measurably.
MAX_RELIEF_LEVELS = 8
_TRUNCATE = 2.0  # kernel radius = ceil(truncate * sigma)

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class PostprocessParams:
    """Parameters of :func:`label_nuclei`. Sizes are physical (microns), never pixels."""

    threshold: float = 0.5  # foreground = prob > threshold
    min_area_um2: float = 8.0  # instances smaller than this are dropped
    marker_threshold: float = 0.5  # distance mode only: markers = distance > marker_threshold
    marker_min_distance_um: float = 2.0  # semantic mode: minimum separation of watershed markers
    compactness: float = 0.0  # scikit-image watershed compactness (0: classic watershed)
    # Semantic mode: probability levels whose distance transforms are averaged into the watershed
    # relief (1: the distance transform of the foreground alone; see ``level_distance``).
    relief_levels: float = 1.0

    def __post_init__(self) -> None:
        for name in ("threshold", "marker_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"postprocess.{name} must lie in [0, 1), got {value!r}")
        if not (float(self.relief_levels).is_integer() and 1 <= self.relief_levels <= MAX_RELIEF_LEVELS):
            raise ConfigError(
                f"postprocess.relief_levels must be a whole number from 1 to {MAX_RELIEF_LEVELS}, "
                f"got {self.relief_levels!r}"
            )
        for name in ("min_area_um2", "marker_min_distance_um", "compactness"):
            value = getattr(self, name)
            if not value >= 0.0:  # also rejects NaN
                raise ConfigError(f"postprocess.{name} must be zero or positive, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PostprocessParams:
        """Build from a mapping (e.g. stored with model weights). Unknown keys are rejected."""
        if not isinstance(data, dict):
            raise ConfigError(f"postprocess parameters: expected a mapping, got {data!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"postprocess parameters: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(names))}"
            )
        values = {}
        for name, value in data.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"postprocess.{name}: expected a number, got {value!r}")
            values[name] = float(value)
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def with_overrides(self, **overrides: float | None) -> PostprocessParams:
        """A copy with the given values replaced; ``None`` values keep the current value."""
        return PostprocessParams.from_dict({**self.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})


def label_nuclei(
    prob: np.ndarray,
    mpp: float,
    params: PostprocessParams,
    distance: np.ndarray | None = None,
) -> np.ndarray:
    """Split the foreground of a nucleus probability map into instances.

    Args:
        prob: (H, W) nucleus probability in [0, 1], float.
        mpp: microns per pixel of ``prob`` (model pixels).
        params: thresholds and physical sizes.
        distance: optional (H, W) normalised distance-to-background map in [0, 1] predicted by an
            auxiliary head. When given, markers are its connected regions above
            ``params.marker_threshold`` (distance mode); otherwise markers come from the Euclidean
            distance transform of the foreground (semantic mode).

    Returns:
        (H, W) int32 labels: 0 is background, instances are 1..n numbered in raster order of
        their first pixel, so equal inputs give byte-identical outputs.

    Locality: the instances of each foreground component depend only on the component's own
    pixels and its one-pixel background outline (see the module docstring). A crop containing a
    component plus a one-pixel margin gives the same instances as the whole image.

    Semantic mode: fill small holes; Euclidean distance transform (averaged over
    ``relief_levels`` probability levels, see :func:`level_distance`), smoothed inside each component
    (``d``, pixels); markers are the maxima of ``d`` whose dynamic is at least
    ``MARKER_DYNAMIC_PX``, thinned so that markers of one component are at least
    ``marker_min_distance_um`` apart (higher maxima win); watershed of ``-d`` inside the
    foreground. Distance mode: same hole filling, markers from ``distance`` as above, watershed of
    ``-distance``; a component without a marker becomes one instance. Both modes then drop
    instances below ``min_area_um2``.
    """
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"prob must be a 2-D (H, W) array, got shape {prob.shape}")
    if distance is not None:
        distance = np.asarray(distance)
        if distance.shape != prob.shape:
            raise ValueError(f"distance has shape {distance.shape}, prob has shape {prob.shape}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp!r}")
    px_area_um2 = float(mpp) ** 2

    foreground = prob > params.threshold
    if not foreground.any():
        return np.zeros(prob.shape, dtype=np.int32)
    components, _ = ndi.label(foreground, structure=_EIGHT)
    if distance is None:
        # Mostly background: label the components packed side by side (same instances, a fraction
        # of the pixels). The distance mode's single watershed is left as it is.
        packed = pack_components(components)
        if packed is None:
            return _semantic_instances(components, prob, px_area_um2, params, mpp)
        canvas_prob = packed.take(prob) if params.relief_levels > 1 else None  # one level reads no probability
        return relabel_raster(packed.unpack(_semantic_instances(packed.canvas, canvas_prob, px_area_um2, params, mpp)))
    components = _fill_enclosed_holes(components, HOLE_MAX_UM2 / px_area_um2)
    foreground = components > 0
    relief = np.where(foreground, distance.astype(np.float64), 0.0)
    markers, _ = ndi.label((relief > params.marker_threshold) & foreground, structure=_EIGHT)
    labels = watershed(-relief, markers, mask=foreground, connectivity=2, compactness=params.compactness)
    # A component without any marker (distance mode, faint centre) is one instance of its own.
    unmarked = foreground & (labels == 0)
    if unmarked.any():
        labels = labels.astype(np.int64)
        labels[unmarked] = components[unmarked].astype(np.int64) + int(labels.max())
    return relabel_raster(labels, min_size=params.min_area_um2 / px_area_um2)


def level_distance(foreground: np.ndarray, prob: np.ndarray | None, threshold: float, levels: int) -> np.ndarray:
    """Mean, over ``levels`` probability levels evenly spaced from ``threshold`` towards 1, of the
    Euclidean distance transform of the foreground pixels above each level (pixels; 0 outside).

    One level is the distance transform of the foreground itself. Touching nuclei usually meet in a
    valley of probability that stays above the threshold: the higher levels cut them apart there, so
    the mean deepens the saddle between their centres and each keeps its own marker. Locality: the
    pixels below a level are a superset of the background, so each distance is still that to a pixel
    of the same component or of its one-pixel outline.
    """
    # Pad with background so that the array edge counts as background, as the slide edge does.
    total = ndi.distance_transform_edt(np.pad(foreground, 1))[1:-1, 1:-1]
    if levels == 1:
        return total
    if prob is None:
        raise ValueError("more than one relief level needs the probability")
    for k in range(1, levels):
        above = foreground & (prob > threshold + k * (1.0 - threshold) / levels)
        total += ndi.distance_transform_edt(np.pad(above, 1))[1:-1, 1:-1]
    return total / levels


def _semantic_instances(
    components: np.ndarray, prob: np.ndarray | None, px_area_um2: float, params: PostprocessParams, mpp: float
) -> np.ndarray:
    """Semantic mode of :func:`label_nuclei` on labelled components (any ids, 0 background) and the
    probability on the same pixels."""
    components = _fill_enclosed_holes(components, HOLE_MAX_UM2 / px_area_um2)
    foreground = components > 0
    distance = level_distance(foreground, prob, params.threshold, int(params.relief_levels))
    relief = _smooth_within_components(distance, components, SMOOTHING_SIGMA_PX)
    # A component whose relief has a single regional maximum gets a single marker, so it is one
    # instance whatever the marker search and watershed would do: only the others need them.
    multi = _multi_peak_components(relief, components)
    split = np.isin(components, np.flatnonzero(multi)) if multi.any() else np.zeros(components.shape, bool)
    labels = np.where(split, 0, components).astype(np.int64)
    if split.any():
        parts = np.where(split, components, 0)
        markers = _distance_maxima(np.where(split, relief, 0.0), parts, params.marker_min_distance_um / mpp)
        offset = int(components.max())
        for index, box in enumerate(ndi.find_objects(parts), start=1):
            if box is None:
                continue
            # One component at a time: the watershed breaks ties between markers of equal height
            # by heap order, which would otherwise depend on the other components in the array.
            inside = parts[box] == index
            grown = watershed(
                -relief[box],
                np.where(inside, markers[box], 0),
                mask=inside,
                connectivity=2,
                compactness=params.compactness,
            )
            labels[box][inside] = grown[inside].astype(np.int64) + offset
    return relabel_raster(labels, min_size=params.min_area_um2 / px_area_um2)


def _countable(flat: np.ndarray) -> bool:
    """Integer ids small enough to count with ``np.bincount`` instead of sorting (labels numbered
    1..n always are)."""
    return bool(
        flat.size and np.issubdtype(flat.dtype, np.integer) and flat.min() >= 0 and flat.max() < 4 * flat.size + 1024
    )


def relabel_raster(labels: np.ndarray, min_size: float = 0.0) -> np.ndarray:
    """Renumber labels 1..n in raster order of each label's first pixel; drop labels with fewer
    than ``min_size`` pixels. Returns int32; 0 stays background."""
    labels = np.asarray(labels)
    flat = labels.ravel()
    if _countable(flat):
        # Counting instead of sorting: linear in pixels, same result as the np.unique path below.
        n = int(flat.max()) + 1
        counts = np.bincount(flat, minlength=n)
        where = np.flatnonzero(flat)
        first = np.full(n, flat.size, dtype=np.int64)
        np.minimum.at(first, flat[where], where)
        keep = np.flatnonzero((counts > 0) & (counts >= min_size))
        keep = keep[keep != 0]
        keep = keep[np.argsort(first[keep], kind="stable")]
        lut = np.zeros(n, dtype=np.int32)
        lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
        return lut[labels]
    ids, first, inverse, counts = np.unique(flat, return_index=True, return_inverse=True, return_counts=True)
    keep = np.flatnonzero((ids != 0) & (counts >= min_size))
    keep = keep[np.argsort(first[keep], kind="stable")]
    lut = np.zeros(len(ids), dtype=np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lut[inverse].reshape(np.shape(labels))


def compact_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ids of ``labels`` (non-negative ints) with background first, each id's first raster index
    (-1 for a background that is absent) and the labels renumbered 0..n-1 in id order.

    The same as ``np.unique(..., return_index=True, return_inverse=True)`` with 0 put first, by
    counting instead of sorting when the ids are small (they are: labels come numbered 1..n).
    """
    flat = labels.ravel()
    if not _countable(flat):
        ids, first, compact = np.unique(flat, return_index=True, return_inverse=True)
        compact = compact.reshape(labels.shape)
        if ids.size == 0 or ids[0] != 0:
            ids, first, compact = np.concatenate([[0], ids]), np.concatenate([[-1], first]), compact + 1
        return ids, first, compact
    present = np.bincount(flat) > 0
    background = bool(present[0])
    present[0] = True
    ids = np.flatnonzero(present)
    renumber = np.zeros(len(present), dtype=np.int64)
    renumber[ids] = np.arange(len(ids))
    compact = renumber[labels]
    where = np.flatnonzero(flat)
    first = np.full(len(ids), flat.size, dtype=np.int64)
    np.minimum.at(first, compact.ravel()[where], where)
    first[0] = np.argmax(flat == 0) if background else -1
    return ids, first, compact


def _fill_enclosed_holes(components: np.ndarray, max_hole_px: float) -> np.ndarray:
    """Fill background regions smaller than ``max_hole_px`` that are enclosed by one component.

    A background region (4-connected, the complement of 8-connected foreground) qualifies when it
    does not touch the array edge and every foreground pixel around it belongs to the same
    component, so that filling it changes that component only and never merges two components.
    """
    holes, n_holes = ndi.label(components == 0)
    if n_holes == 0:
        return components
    sizes = np.bincount(holes.ravel(), minlength=n_holes + 1)
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    candidate = sizes < max_hole_px
    candidate[0] = False
    candidate[edge] = False
    if not candidate.any():
        return components
    # Only the pixels of candidate holes matter: gather the component ids of their 8 neighbours.
    padded = np.pad(components.astype(np.int64), 1)
    where = np.flatnonzero(candidate[holes])
    hole_of = holes.ravel()[where]
    rows, cols = np.divmod(where, components.shape[1])
    big = np.iinfo(np.int64).max  # "no component yet"
    hi = np.zeros(n_holes + 1, dtype=np.int64)
    lo = np.full(n_holes + 1, big, dtype=np.int64)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            around = padded[rows + dy, cols + dx]
            np.maximum.at(hi, hole_of, around)
            np.minimum.at(lo, hole_of, np.where(around > 0, around, big))
    fill = np.zeros(n_holes + 1, dtype=components.dtype)
    single = candidate & (hi == lo) & (hi > 0)
    fill[single] = hi[single]
    out = components.copy()
    filled = where[single[hole_of]]
    out.ravel()[filled] = fill[holes.ravel()[filled]]
    return out


def _gaussian_weights(sigma: float) -> np.ndarray:
    """The 1-D kernel ``ndi.gaussian_filter`` uses (radius ceil(truncate * sigma)), computed the same way."""
    radius = int(np.ceil(_TRUNCATE * sigma))
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return phi / phi.sum()


def _smooth_within_components(values: np.ndarray, components: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smooth ``values`` inside each component, normalised by the kernel weight that falls
    inside the same component: neighbouring components never leak into each other, so the result
    on a component depends on that component alone. Background is 0.

    One vectorised pass over the foreground pixels: a tap counts where the pixel it reaches has the
    same component id. The arithmetic is that of ``ndi.gaussian_filter`` (separable, rows then
    columns, symmetric taps summed outermost pair first) applied to each component alone, so the
    values are bit for bit those of filtering one component at a time."""
    out = np.zeros(values.shape, dtype=np.float64)
    inside = components > 0
    if sigma <= 0:
        out[inside] = values[inside]
        return out
    w = _gaussian_weights(sigma)
    radius = len(w) // 2
    # Where a pixel's window holds no other component, filtering the whole image (background zeroed)
    # does exactly the per-component arithmetic; only pixels near another component need the taps.
    masked = np.where(inside, values.astype(np.float64), 0.0)
    kwargs = {"mode": "constant", "truncate": _TRUNCATE}
    out[inside] = (
        ndi.gaussian_filter(masked, sigma, **kwargs)[inside]
        / ndi.gaussian_filter(inside.astype(np.float64), sigma, **kwargs)[inside]
    )
    size = 2 * radius + 1
    highest = ndi.maximum_filter(components, size=size, mode="constant", cval=0)
    big = np.iinfo(components.dtype).max
    lowest = ndi.minimum_filter(np.where(inside, components, big), size=size, mode="constant", cval=big)
    near_other = inside & ((highest != components) | (lowest != components))
    if not near_other.any():
        return out
    width = components.shape[1] + 2 * radius
    flat_comp = np.pad(components, radius).ravel()
    flat_vals = np.pad(values.astype(np.float64), radius).ravel()
    rows, cols = np.nonzero(near_other)
    centre = (rows + radius) * width + (cols + radius)
    own = flat_comp[centre]

    def tap(offset: int) -> tuple[np.ndarray, np.ndarray]:
        index = centre + offset
        same = flat_comp[index] == own
        return np.where(same, flat_vals[index], 0.0), same.astype(np.float64)

    def column(dx: int) -> tuple[np.ndarray, np.ndarray]:
        """The first (row-direction) pass, evaluated at the pixel ``dx`` columns away."""
        value, weight = tap(dx)
        value, weight = value * w[radius], weight * w[radius]
        for j in range(-radius, 0):
            v1, w1 = tap(j * width + dx)
            v2, w2 = tap(-j * width + dx)
            value += (v1 + v2) * w[radius + j]
            weight += (w1 + w2) * w[radius + j]
        return value, weight

    columns = {dx: column(dx) for dx in range(-radius, radius + 1)}
    total, weight = columns[0][0] * w[radius], columns[0][1] * w[radius]
    for j in range(-radius, 0):
        total += (columns[j][0] + columns[-j][0]) * w[radius + j]
        weight += (columns[j][1] + columns[-j][1]) * w[radius + j]
    out[rows, cols] = total / weight
    return out


def _multi_peak_components(relief: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Boolean per component id (index 0 = background, False): its relief has more than one
    regional maximum (8-connected plateaus higher than all their neighbours)."""
    n = int(components.max())
    tops = (components > 0) & local_maxima(relief, connectivity=2, allow_borders=True)
    plateaus, n_plateaus = ndi.label(tops, structure=_EIGHT)
    if n_plateaus == 0:
        return np.zeros(n + 1, dtype=bool)
    where = np.flatnonzero(plateaus)
    owner = np.zeros(n_plateaus + 1, dtype=np.int64)
    owner[plateaus.ravel()[where]] = components.ravel()[where]  # a plateau lies in one component
    return np.bincount(owner[1:], minlength=n + 1) > 1


def _reconstruct_by_dilation(seed: np.ndarray, ceiling: np.ndarray) -> np.ndarray:
    """Greyscale reconstruction by dilation (8-connected) of ``seed`` under ``ceiling`` (seed <= ceiling).

    Geodesic dilations are repeated only at pixels next to a change: near the tops of a distance map
    few pixels change, so this is far cheaper than a sort of the whole image. Values are only ever
    copied (max / min of existing values), so the result equals any other exact reconstruction."""
    height, width = seed.shape
    stride = width + 2
    value = np.pad(seed.astype(np.float64), 1, constant_values=-np.inf).ravel()
    cap = np.pad(ceiling.astype(np.float64), 1, constant_values=-np.inf).ravel()
    steps = np.array([dy * stride + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx], dtype=np.int64)
    rows, cols = np.nonzero(ceiling > seed)  # only these can rise
    active = (rows + 1) * stride + (cols + 1)
    flag = np.zeros(value.size, dtype=bool)
    while active.size:
        grown = value[active]
        for step in steps:
            np.maximum(grown, value[active + step], out=grown)
        np.minimum(grown, cap[active], out=grown)
        rising = grown > value[active]
        if not rising.any():
            break
        changed = active[rising]
        value[changed] = grown[rising]
        # Pixels that can still rise and have a changed neighbour (a flag array: no sorting).
        flag[:] = False
        for step in steps:
            flag[changed + step] = True
        flag &= cap > value
        active = np.flatnonzero(flag)
    return value.reshape(height + 2, stride)[1:-1, 1:-1]


def _h_domes(dist: np.ndarray, components: np.ndarray) -> np.ndarray:
    """h-maxima domes by reconstruction: seed = d, ceiling = d + h inside the components and 0
    outside, so reconstruction never carries values from one component to another through the
    background (components are 8-connected components: they never touch, even diagonally); the
    result equals the classic reconstruction of d - h under d, shifted up by h."""
    inside = components > 0
    seed = np.where(inside, dist, 0.0)
    ceiling = np.where(inside, dist + MARKER_DYNAMIC_PX, 0.0)
    return np.where(inside, _reconstruct_by_dilation(seed, ceiling), 0.0)


def _distance_maxima(dist: np.ndarray, components: np.ndarray, min_distance_px: float) -> np.ndarray:
    """Watershed markers from the distance transform: maxima with dynamic >= MARKER_DYNAMIC_PX,
    then, per component, greedy suppression of markers closer than ``min_distance_px`` to a
    higher one. Returns an int32 marker image (0 = none)."""
    foreground = components > 0
    domes = _h_domes(dist, components)
    # Regional maxima of the reconstruction: maxima of d that rise at least h above every saddle
    # towards a higher (or equally high) maximum; shallower maxima merge into one plateau.
    tops = foreground & local_maxima(domes, connectivity=2, allow_borders=True)
    plateaus, n = ndi.label(tops, structure=_EIGHT)
    if n == 0:
        return plateaus.astype(np.int32)
    flat = plateaus.ravel()
    _, first = np.unique(flat, return_index=True)
    first = first[1:]  # raster index of each plateau's first pixel (label 0 is not a plateau)
    height = domes.ravel()[first]  # plateaus are flat: any pixel gives the height
    component = components.ravel()[first]
    counts = np.bincount(flat, minlength=n + 1)[1:]
    # Centroids in each component's own frame (from its box corner), so that they, and which markers
    # are closer than the minimum distance, do not depend on where the component lies in the array.
    corners = np.array([(s[0].start, s[1].start) if s is not None else (0, 0) for s in ndi.find_objects(components)])
    where = np.flatnonzero(flat)
    rows, cols = np.divmod(where, plateaus.shape[1])
    corner = corners[components.ravel()[where] - 1]
    cy = np.bincount(flat[where], weights=rows - corner[:, 0], minlength=n + 1)[1:] / counts
    cx = np.bincount(flat[where], weights=cols - corner[:, 1], minlength=n + 1)[1:] / counts

    keep = np.ones(n, dtype=bool)
    if min_distance_px > 0 and n > 1:
        # A third axis keeps components apart: markers of one component share it exactly.
        apart = component.astype(np.float64) * (2.0 * min_distance_px + 2.0)
        points = np.column_stack([cy, cx, apart])
        pairs = cKDTree(points).query_pairs(r=min_distance_px, output_type="ndarray")
        pairs = pairs[component[pairs[:, 0]] == component[pairs[:, 1]]]
        if len(pairs):
            # Greedy: visit markers highest first (ties: earlier raster position first, so the
            # result never depends on labelling order); a kept marker removes the lower ones near it.
            order = np.lexsort((first, -height))
            position = np.empty(n, dtype=np.int64)
            position[order] = np.arange(n)
            neighbours: dict[int, list[int]] = {}
            for a, b in pairs.tolist():
                neighbours.setdefault(a, []).append(b)
                neighbours.setdefault(b, []).append(a)
            for i in order.tolist():
                if keep[i]:
                    for j in neighbours.get(i, ()):
                        if position[j] > position[i]:
                            keep[j] = False
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[plateaus]


def instance_measurements(labels: np.ndarray, prob: np.ndarray, mpp: float) -> list[dict[str, float]]:
    """Per-instance measurements, ordered by label id.

    Returns one dict per label 1..max: ``id``, ``area_px``, ``area_um2``, ``centroid_y`` and
    ``centroid_x`` (array pixel coordinates, row/column indices) and ``mean_probability``.
    Labels with no pixels are skipped.
    """
    flat = np.asarray(labels).ravel()
    n = int(flat.max()) if flat.size else 0
    if n == 0:
        return []
    counts = np.bincount(flat, minlength=n + 1)
    rows, cols = np.divmod(np.arange(flat.size), labels.shape[1])
    sum_y = np.bincount(flat, weights=rows, minlength=n + 1)
    sum_x = np.bincount(flat, weights=cols, minlength=n + 1)
    sum_p = np.bincount(flat, weights=np.asarray(prob, dtype=np.float64).ravel(), minlength=n + 1)
    out = []
    for i in np.flatnonzero(counts[1:]) + 1:
        c = counts[i]
        out.append(
            {
                "id": int(i),
                "area_px": int(c),
                "area_um2": float(c * mpp * mpp),
                "centroid_y": float(sum_y[i] / c),
                "centroid_x": float(sum_x[i] / c),
                "mean_probability": float(sum_p[i] / c),
            }
        )
    return out
