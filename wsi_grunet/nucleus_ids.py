"""Slide-wide nucleus ids: one pure function, used by the label painting and the vector writers.

A tile's owned nuclei have local ids 1..count (in the order post-processing found them); their global
ids are ``offset + local``, with offsets the prefix sum of the owned counts in tile-index order. The
order is fixed by the tile grid, not by when tiles finished, so ids never depend on scheduling.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def id_offsets(tile_indices: Iterable[int], counts: Mapping[int, int]) -> dict[int, int]:
    """Offset of every tile in ``tile_indices`` (sorted by index): its nuclei get ``offset + 1 ...``."""
    offsets, total = {}, 0
    for index in sorted(tile_indices):
        offsets[index] = total
        total += counts.get(index, 0)
    return offsets
