"""Tile plan over a slide in model pixels (pure geometry, (y, x) order).

A slide of shape (H, W) is cut into a regular grid of *cores* of side ``core = tile_size - 2*halo``
starting at (0, 0); the last row and column of cores are clipped to the slide, so the cores
partition ``[0, H) x [0, W)`` exactly: every pixel belongs to one core. Each tile *reads* its core
grown by ``halo`` on every side: ``tile_size x tile_size`` for a full core. A clipped core at the
slide's bottom or right edge reads only its own extent plus the halo, rounded up to ``EDGE_STEP``
(never more than ``tile_size``): the model pixels it skips lie more than a halo past the slide,
white glass that no owned nucleus can see, and on CPU they were a quarter of the model's work on a
small slide. The read still reaches at least a halo past the slide (read as white glass).

``tile_size`` and ``halo`` are multiples of 16, hence so is ``core`` and every read origin
``core * k - halo``. The U-Net pools four times by 2, so its pooling cells are 16-pixel blocks
anchored at the input's origin: with 16-aligned read origins those blocks sit at the same slide
positions in every tile and in a single pass over the whole slide, which is what lets a tiled
prediction equal the single-pass one inside each core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError
from .geometry import Box

ALIGNMENT = 16  # 2**4: four 2x poolings in the U-Net
EDGE_STEP = 64  # fitted edge reads grow in steps of this: few distinct shapes (GPU autotuning, batches)


class TilingError(ConfigError, ValueError):
    """Invalid tile geometry (a configuration error that is also a ValueError)."""


@dataclass(frozen=True)
class Tile:
    """One tile: ``core`` (pixels it owns) and ``read`` (pixels it sees), model pixels."""

    index: int  # row * n_cols + col
    row: int
    col: int
    core: Box
    read: Box


def _check(shape: tuple[int, int], tile_size: int, halo: int) -> int:
    """Validate arguments and return the core side; raises TilingError."""
    if len(shape) != 2 or any(int(n) != n or n < 1 for n in shape):
        raise TilingError(f"slide shape must be two positive integers (H, W), got {shape!r}")
    if int(tile_size) != tile_size or int(halo) != halo:
        raise TilingError(f"tile size and halo must be integers, got {tile_size!r} and {halo!r}")
    if halo < 0 or tile_size <= 0 or tile_size % ALIGNMENT or halo % ALIGNMENT:
        raise TilingError(
            f"tile size ({tile_size}) and halo ({halo}) must be non-negative multiples of {ALIGNMENT} "
            "(tile size positive)"
        )
    core = tile_size - 2 * halo
    if core < ALIGNMENT:
        raise TilingError(f"tile size ({tile_size}) must exceed twice the halo ({halo}) by {ALIGNMENT} or more")
    return core


def grid_shape(shape: tuple[int, int], tile_size: int, halo: int) -> tuple[int, int]:
    """(rows, cols) of the tile grid covering ``shape`` (H, W)."""
    core = _check(shape, tile_size, halo)
    return (math.ceil(shape[0] / core), math.ceil(shape[1] / core))


def read_extent(core_extent: int, tile_size: int, halo: int) -> int:
    """Pixels a tile reads along one axis for a core of ``core_extent``: the core and a halo on
    both sides, rounded up to a multiple of ``EDGE_STEP``, at most ``tile_size``."""
    return min(tile_size, -(-(core_extent + 2 * halo) // EDGE_STEP) * EDGE_STEP)


def tile_at(row: int, col: int, shape: tuple[int, int], tile_size: int, halo: int) -> Tile:
    """The tile in grid cell (row, col)."""
    core = _check(shape, tile_size, halo)
    rows, cols = math.ceil(shape[0] / core), math.ceil(shape[1] / core)
    if not (0 <= row < rows and 0 <= col < cols):
        raise IndexError(f"tile ({row}, {col}) outside the {rows} x {cols} grid")
    y0, x0 = row * core, col * core
    core_box = Box(y0, x0, min(y0 + core, shape[0]), min(x0 + core, shape[1]))
    height = read_extent(core_box.y1 - y0, tile_size, halo)
    width = read_extent(core_box.x1 - x0, tile_size, halo)
    read_box = Box(y0 - halo, x0 - halo, y0 - halo + height, x0 - halo + width)
    return Tile(index=row * cols + col, row=row, col=col, core=core_box, read=read_box)


def plan_tiles(shape: tuple[int, int], tile_size: int, halo: int) -> list[Tile]:
    """All tiles in index order (row-major). Raises TilingError (a ConfigError) for invalid sizes."""
    rows, cols = grid_shape(shape, tile_size, halo)
    return [tile_at(r, c, shape, tile_size, halo) for r in range(rows) for c in range(cols)]


def same_shape_batches(tiles: list[Tile], batch_size: int) -> list[list[Tile]]:
    """Consecutive tiles in batches of up to ``batch_size`` whose read boxes share one shape
    (a batch is one array: a fitted edge tile starts a batch of its own shape)."""
    batches: list[list[Tile]] = []
    for tile in tiles:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0].read.shape == tile.read.shape:
            last.append(tile)
        else:
            batches.append([tile])
    return batches


def neighbours(tile: Tile, grid: tuple[int, int]) -> list[int]:
    """Indices of the up to 8 tiles adjacent to ``tile`` (sharing an edge or a corner), ascending."""
    rows, cols = grid
    found = []
    for r in range(tile.row - 1, tile.row + 2):
        for c in range(tile.col - 1, tile.col + 2):
            if (r, c) != (tile.row, tile.col) and 0 <= r < rows and 0 <= c < cols:
                found.append(r * cols + c)
    return found


def tile_for_point(y: float, x: float, shape: tuple[int, int], tile_size: int, halo: int) -> int:
    """Index of the tile whose core contains the point (y, x) (continuous model pixels; pixel
    (i, j) covers [i, i+1) x [j, j+1)). Raises ValueError for a point outside the slide."""
    core = _check(shape, tile_size, halo)
    if not (0 <= y < shape[0] and 0 <= x < shape[1]):
        raise ValueError(f"point (y={y}, x={x}) lies outside the slide of shape {tuple(shape)}")
    cols = math.ceil(shape[1] / core)
    return int(y // core) * cols + int(x // core)
