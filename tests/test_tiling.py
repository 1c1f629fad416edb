"""Tile plan: cores partition the slide, reads are tile-sized and 16-aligned, neighbours, point lookup."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_grunet.config import DEFAULT_HALO, DEFAULT_TILE_SIZE
from wsi_grunet.errors import ConfigError
from wsi_grunet.tiling import EDGE_STEP, Tile, grid_shape, neighbours, plan_tiles, same_shape_batches, tile_for_point

SHAPES = [(1, 1), (1, 300), (257, 1), (64, 64), (96, 160), (100, 230), (1024, 2048), (1000, 999)]
SIZES = [(64, 16), (64, 0), (96, 32), (1152, 64), (48, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tile_size,halo", SIZES)
def test_cores_partition_the_slide(shape, tile_size, halo):
    tiles = plan_tiles(shape, tile_size, halo)
    count = np.zeros(shape, dtype=np.int32)
    for tile in tiles:
        assert not tile.core.is_empty()
        assert 0 <= tile.core.y0 and tile.core.y1 <= shape[0]
        assert 0 <= tile.core.x0 and tile.core.x1 <= shape[1]
        count[tile.core.slices()] += 1
    assert np.all(count == 1), "every pixel must lie in exactly one core"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tile_size,halo", SIZES)
def test_read_boxes_are_aligned_and_hold_core_and_halo(shape, tile_size, halo):
    for tile in plan_tiles(shape, tile_size, halo):
        assert tile.read.y0 % 16 == 0 and tile.read.x0 % 16 == 0
        assert tile.read.height % 16 == 0 and tile.read.width % 16 == 0
        # every read starts a halo before its core and holds the core plus a halo on each side
        assert (tile.read.y0, tile.read.x0) == (tile.core.y0 - halo, tile.core.x0 - halo)
        assert tile.read.y1 >= tile.core.y1 + halo and tile.read.x1 >= tile.core.x1 + halo
        assert tile.read.height <= tile_size and tile.read.width <= tile_size
        full_rows = tile.core.height == tile_size - 2 * halo
        full_cols = tile.core.width == tile_size - 2 * halo
        # a full core reads the whole tile; a clipped edge core reads less, in EDGE_STEP steps
        assert (
            (tile.read.height == tile_size)
            if full_rows
            else (tile.read.height - 2 * halo < tile.core.height + EDGE_STEP)
        )
        assert (
            (tile.read.width == tile_size) if full_cols else (tile.read.width - 2 * halo < tile.core.width + EDGE_STEP)
        )


def test_edge_reads_are_fitted_on_a_small_slide():
    """The packaged example slide's model image (2961 x 2216) at the default tiles: the last row and
    column read only what their clipped cores and halos need."""
    assert (DEFAULT_TILE_SIZE, DEFAULT_HALO) == (1152, 128)
    tiles = plan_tiles((2961, 2216), DEFAULT_TILE_SIZE, DEFAULT_HALO)
    shapes = {(t.row, t.col): t.read.shape for t in tiles}
    assert shapes[(0, 0)] == (1152, 1152)
    assert shapes[(0, 2)] == (1152, 704)  # core 424 wide + 2 x 128 = 680 -> 704
    assert shapes[(3, 0)] == (576, 1152)  # core 273 high + 256 = 529 -> 576
    assert shapes[(3, 2)] == (576, 704)
    read = sum(t.read.height * t.read.width for t in tiles)
    assert read < 0.77 * len(tiles) * 1152 * 1152


def test_same_shape_batches_keep_order_and_never_mix_shapes():
    tiles = plan_tiles((2961, 2216), DEFAULT_TILE_SIZE, DEFAULT_HALO)
    batches = same_shape_batches(tiles, 2)
    assert [t.index for b in batches for t in b] == [t.index for t in tiles]
    assert all(len(b) <= 2 and len({t.read.shape for t in b}) == 1 for b in batches)
    # row 0: two full tiles, one edge tile; so a batch of 2 never holds the edge tile with another
    assert [[t.index for t in b] for b in batches[:2]] == [[0, 1], [2]]


def test_indices_are_row_major_and_match_grid_shape():
    shape, tile_size, halo = (700, 1100), 256, 32
    rows, cols = grid_shape(shape, tile_size, halo)
    assert (rows, cols) == (-(-700 // 192), -(-1100 // 192))
    tiles = plan_tiles(shape, tile_size, halo)
    assert len(tiles) == rows * cols
    for position, tile in enumerate(tiles):
        assert tile.index == position == tile.row * cols + tile.col
        assert tile.core.y0 == tile.row * 192 and tile.core.x0 == tile.col * 192
    # the last row and column are clipped to the slide
    assert tiles[-1].core.y1 == 700 and tiles[-1].core.x1 == 1100
    assert tiles[-1].core.height == 700 - (rows - 1) * 192


def test_exact_multiple_has_no_ragged_tiles():
    tiles = plan_tiles((2048, 1024), 1152, 64)
    assert grid_shape((2048, 1024), 1152, 64) == (2, 1)
    assert all(t.core.shape == (1024, 1024) for t in tiles)


@pytest.mark.parametrize(
    "shape,tile_size,halo",
    [
        ((100, 100), 100, 16),  # tile size not a multiple of 16
        ((100, 100), 128, 8),  # halo not a multiple of 16
        ((100, 100), 64, 32),  # no core left
        ((100, 100), 64, 24),
        ((100, 100), 64, -16),
        ((100, 100), 0, 0),
        ((0, 100), 64, 16),
        ((100,), 64, 16),
    ],
)
def test_invalid_sizes_raise(shape, tile_size, halo):
    with pytest.raises(ConfigError):
        plan_tiles(shape, tile_size, halo)
    with pytest.raises(ValueError):
        grid_shape(shape, tile_size, halo)


def _touching(a: Tile, b: Tile) -> bool:
    """Cores share an edge or a corner (computed from the boxes, not the grid)."""
    return a.index != b.index and not a.core.grow(1).intersect(b.core).is_empty()


@pytest.mark.parametrize("shape", [(1, 1), (100, 40), (40, 100), (300, 300), (500, 260)])
def test_neighbours_are_the_tiles_with_touching_cores(shape):
    tiles = plan_tiles(shape, 96, 32)
    grid = grid_shape(shape, 96, 32)
    for tile in tiles:
        expected = sorted(other.index for other in tiles if _touching(tile, other))
        found = neighbours(tile, grid)
        assert sorted(found) == expected
        assert len(set(found)) == len(found) <= 8


def test_neighbour_counts_on_a_large_grid():
    grid = grid_shape((320, 320), 96, 32)  # 10 x 10
    tiles = plan_tiles((320, 320), 96, 32)
    counts = {t.index: len(neighbours(t, grid)) for t in tiles}
    assert counts[0] == 3 and counts[9] == 3 and counts[99] == 3
    assert counts[5] == 5 and counts[50] == 5
    assert counts[55] == 8
    assert neighbours(tiles[0], grid) == [1, 10, 11]


def test_tile_for_point_returns_the_core_that_contains_it():
    shape, tile_size, halo = (1000, 777), 128, 16
    tiles = plan_tiles(shape, tile_size, halo)
    rng = np.random.default_rng(3)
    points = rng.uniform([0, 0], shape, size=(500, 2))
    # also the exact corners of cores and the last pixel
    corners = [(t.core.y0, t.core.x0) for t in tiles] + [(999.999, 776.999), (0.0, 0.0)]
    for y, x in list(map(tuple, points)) + corners:
        index = tile_for_point(y, x, shape, tile_size, halo)
        assert tiles[index].core.contains_point(y, x)


@pytest.mark.parametrize("point", [(-0.5, 3), (3, -1e-9), (1000, 3), (3, 777)])
def test_tile_for_point_outside_the_slide_raises(point):
    with pytest.raises(ValueError):
        tile_for_point(point[0], point[1], (1000, 777), 128, 16)
