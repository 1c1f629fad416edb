"""The slide's label image: each tile core painted from the owned nuclei of that tile and its neighbours.

A nucleus owned by one tile may reach into a neighbour's core (up to the halo), so a core's labels come
from at most nine tiles. Each core is whole zarr shards and is painted by exactly one task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .geometry import Box
from .outputs.zarr_store import OmeZarrWriter
from .tile_work import owned_label_pixels, tile_files
from .tiling import Tile, neighbours


def label_shard_jobs(
    tiles: Sequence[Tile], counts: Mapping[int, int], offsets: Mapping[int, int], grid: tuple[int, int]
) -> list[tuple[Box, list[tuple[Tile, int]]]]:
    """(core, [(source tile, id offset), ...]) for every core that some owned nucleus may reach."""
    by_index = {tile.index: tile for tile in tiles}
    jobs = []
    for tile in tiles:
        sources = [(by_index[i], offsets[i]) for i in [tile.index, *neighbours(tile, grid)] if counts.get(i)]
        if sources:
            jobs.append((tile.core, sources))
    return jobs


def write_label_shard(core: Box, sources: list[tuple[Tile, int]], zarr_path: str, work_dir: str) -> int:
    """Paint the nuclei owned by ``sources`` (tile, id offset) into ``core``; the lower tile index wins
    the (rare) pixels two owners both claim, so the result never depends on task order."""
    out = np.zeros(core.shape, np.int32)
    for tile, offset in sorted(sources, key=lambda s: s[0].index):
        labels_path = tile_files(work_dir, tile.index).labels
        overlap = tile.read.intersect(core)
        if overlap.is_empty() or not labels_path.exists():
            continue
        rows, cols, values = owned_label_pixels(labels_path, tile.read.width)
        rows, cols = rows + (tile.read.y0 - core.y0), cols + (tile.read.x0 - core.x0)  # core frame
        inside = (rows >= 0) & (rows < core.height) & (cols >= 0) & (cols < core.width)
        rows, cols, values = rows[inside], cols[inside], values[inside]
        paint = out[rows, cols] == 0  # each pixel once per source: order within a source is free
        out[rows[paint], cols[paint]] = values[paint] + offset
    if out.any():
        OmeZarrWriter.open(zarr_path).write_labels(core, out)
    return int(np.count_nonzero(out))
