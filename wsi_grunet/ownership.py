"""Tile-border contract: which tile owns a nucleus.

A tile has a ``core`` box (the cores of all tiles partition the slide) and a ``read`` box, the core
grown by ``halo`` model pixels on each side; probabilities and instance labels are computed on the
whole read box, and the read box may extend beyond the slide. All boxes are in model pixels of the
slide (``wsi_grunet.geometry.Box``, half-open); ``labels[row, col]`` is the model pixel
``(read.y0 + row, read.x0 + col)``.

Ownership rule: an instance is owned by the tile whose core contains its centroid, the mean of its
pixels' (y, x) model coordinates, compared exactly in integer arithmetic. Because the cores
partition the slide and a centroid of slide pixels lies inside the slide, at most one tile owns a
given instance.

Guarantee: suppose that (a) on every read box the probabilities equal those of a single pass over
the whole slide, and (b) every foreground component, i.e. a nucleus or a group of touching nuclei
(see ``wsi_grunet.postprocess``), has a bounding box of at most ``halo`` pixels in height and
width. Then the component of an instance whose centroid lies in a core does not touch the border
of that tile's read box, so by the locality contract of ``label_nuclei`` the tile computes exactly
the single-pass instances on it. Hence the union of the owned instances of all tiles equals the
single-pass instance set, pixel for pixel, and every nucleus is owned exactly once.

When a single owned instance reaches the read border inside the slide, it is certainly larger
than the halo and cannot be complete: :func:`owned_instances` raises ``StitchContractError``. When
only a group of touching nuclei crosses the border, each nucleus is whole but its outline next to
its neighbours may differ slightly from a single pass; such instances are counted in
``OwnedInstances.n_in_cut_groups`` so that the caller can report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .errors import StitchContractError
from .geometry import Box
from .postprocess import compact_ids


@dataclass(frozen=True)
class OwnedInstances:
    """The instances a tile owns.

    Attributes:
        labels: int32 array over the read box (same shape as the input labels). Owned instances
            are numbered 1..n in raster order of their first pixel; everything else is 0,
            including pixels outside the slide.
        source_ids: int64 array of length n; ``source_ids[k - 1]`` is the input label of output
            label ``k``.
        centroids: float64 array (n, 2) of centroids (y, x) in slide model pixels (pixel indices,
            so a single pixel at row r has centroid y = r), restricted to pixels inside the slide.
        n_in_cut_groups: number of owned instances that touch (through a chain of touching
            instances) an instance reaching the read border inside the slide: exact only if that
            chain is computed as in a single pass, which the tile cannot guarantee.
    """

    labels: np.ndarray
    source_ids: np.ndarray
    centroids: np.ndarray
    n_in_cut_groups: int

    @property
    def count(self) -> int:
        return len(self.source_ids)


def owned_instances(
    labels: np.ndarray,
    read: Box,
    core: Box,
    slide_shape: tuple[int, int],
    halo: int,
    mpp: float | None = None,
) -> OwnedInstances:
    """Keep the instances whose centroid lies in ``core``, checking the tile-border contract.

    Args:
        labels: (H, W) integer instance labels over ``read`` (0 = background), any numbering.
        read: the box the labels cover, model pixels of the slide; may extend beyond the slide.
        core: the tile's core, inside ``read``.
        slide_shape: (height, width) of the slide in model pixels. Labels outside it are ignored.
        halo: the tiling halo in model pixels (quoted in the error message).
        mpp: model microns per pixel; when given, the error message also gives sizes in microns.

    Returns:
        :class:`OwnedInstances`.

    Raises:
        StitchContractError: an owned instance touches a read-box border that is not the slide
            edge. It is larger than the halo, so its part beyond the read box is unknown.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape != read.shape:
        raise ValueError(f"labels have shape {labels.shape}, the read box {read} has shape {read.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if core.is_empty() or core.intersect(read) != core:
        raise ValueError(f"core {core} must be a non-empty box inside the read box {read}")

    inside = read.intersect(Box(0, 0, int(slide_shape[0]), int(slide_shape[1]))).relative_to(read)
    clipped = np.zeros(read.shape, dtype=np.int64)
    if not inside.is_empty():
        clipped[inside.slices()] = labels[inside.slices()]

    ids, first, compact = compact_ids(clipped)
    n = len(ids)
    if n == 1:
        empty = np.zeros(read.shape, dtype=np.int32)
        return OwnedInstances(empty, np.zeros(0, dtype=np.int64), np.zeros((0, 2)), 0)

    where = np.flatnonzero(compact)  # the instances' pixels: a tile is mostly background
    flat = compact.ravel()[where]
    rows, cols = np.divmod(where, read.width)
    counts = np.bincount(flat, minlength=n).astype(np.int64)
    # Integer sums of global coordinates: exact, so every tile decides alike for the same instance.
    sum_y = np.rint(np.bincount(flat, weights=rows, minlength=n)).astype(np.int64) + counts * read.y0
    sum_x = np.rint(np.bincount(flat, weights=cols, minlength=n)).astype(np.int64) + counts * read.x0
    owned = (
        (counts * core.y0 <= sum_y)
        & (sum_y < counts * core.y1)
        & (counts * core.x0 <= sum_x)
        & (sum_x < counts * core.x1)
    )
    owned[0] = False

    at_border = _touching_inner_border(compact, read, slide_shape, n)
    offending = np.flatnonzero(owned & at_border)
    if len(offending):
        worst = offending[np.argmin(first[offending])]
        centroid = (sum_y[worst] / counts[worst], sum_x[worst] / counts[worst])
        raise StitchContractError(_contract_message(compact == worst, read, centroid, halo, mpp))

    in_cut_groups = owned & _groups_reaching(compact, where, at_border, n)

    kept = np.flatnonzero(owned)
    kept = kept[np.argsort(first[kept], kind="stable")]
    lut = np.zeros(n, dtype=np.int32)
    lut[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
    centroids = np.column_stack([sum_y[kept] / counts[kept], sum_x[kept] / counts[kept]])
    return OwnedInstances(
        labels=lut[compact],
        source_ids=ids[kept].astype(np.int64),
        centroids=centroids,
        n_in_cut_groups=int(in_cut_groups.sum()),
    )


def _touching_inner_border(compact: np.ndarray, read: Box, slide_shape: tuple[int, int], n: int) -> np.ndarray:
    """Boolean per compact id: the instance has a pixel on a read-box side that lies inside the
    slide (beyond that side the slide goes on, unseen by this tile)."""
    height, width = int(slide_shape[0]), int(slide_shape[1])
    edges = []
    if read.y0 > 0:
        edges.append(compact[0, :])
    if read.y1 < height:
        edges.append(compact[-1, :])
    if read.x0 > 0:
        edges.append(compact[:, 0])
    if read.x1 < width:
        edges.append(compact[:, -1])
    touching = np.zeros(n, dtype=bool)
    for edge in edges:
        touching[edge] = True
    touching[0] = False
    return touching


def _groups_reaching(compact: np.ndarray, where: np.ndarray, seeds: np.ndarray, n: int) -> np.ndarray:
    """Boolean per compact id: connected to a seed id through a chain of instances touching in
    the 8-neighbourhood. ``where``: the flat indices of the instances' pixels (only they can touch)."""
    if not seeds.any():
        return np.zeros(n, dtype=bool)
    height, width = compact.shape
    flat = compact.ravel()
    rows, cols = np.divmod(where, width)
    below = rows < height - 1
    # Each pixel with its right, lower, lower-right and lower-left neighbour: every adjacent pair once.
    pairs = []
    for step, valid in (
        (1, cols < width - 1),
        (width, below),
        (width + 1, below & (cols < width - 1)),
        (width - 1, below & (cols > 0)),
    ):
        source = where[valid]
        a, b = flat[source], flat[source + step]
        touch = (a != b) & (b > 0)
        pairs.append(np.stack([a[touch], b[touch]]))
    edges = np.concatenate(pairs, axis=1)
    graph = coo_matrix((np.ones(edges.shape[1], dtype=np.int8), (edges[0], edges[1])), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    return np.isin(group, group[seeds])


def _contract_message(mask: np.ndarray, read: Box, centroid: tuple[float, float], halo: int, mpp: float | None) -> str:
    cy, cx = centroid
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    size = f"{h} x {w} px"
    halo_text = f"{halo} px"
    if mpp is not None:
        size += f" ({h * mpp:.0f} x {w * mpp:.0f} um)"
        halo_text += f" ({halo * mpp:g} um)"
    return (
        f"a nucleus of at least {size} near model pixel (y={cy:.0f}, x={cx:.0f}) reaches the border of the tile "
        f"read from model box y {read.y0}..{read.y1}, x {read.x0}..{read.x1}: it is larger than the halo of "
        f"{halo_text}, so it cannot be segmented exactly across tiles. Increase tiling.halo (a multiple of 16) "
        f"so that the halo is wider than the largest nucleus; if the object is not a nucleus but a large "
        f"false-positive region, raise postprocess.threshold"
    )
