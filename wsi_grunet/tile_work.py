"""Per-tile work on CPU workers: one tile's probability -> its zarr core, its owned nuclei, their records.

``process_tile``: the probability of a tile's read box -> its core written to the OME-Zarr (each core
is whole shards, so one writer per shard) -> instances over the read box -> the instances this tile
owns (centroid in its core) -> saved with their measured polygons in the slide's work folder.
``write_tile_vectors`` later serialises those records with their slide-wide ids (GeoJSON and Parquet
pieces that the finishing stage joins in id order). The reading and post-processing tasks of CPU
workers are defined here (``read_tile``, ``post_process``, ...): this module, like the label and zarr
writers, never imports torch, so neither do those workers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import shapely

from .outputs.geojson import write_feature_piece
from .outputs.polygons import NucleusRecord, nuclei_records
from .outputs.table import NucleusTableWriter
from .outputs.zarr_store import OmeZarrWriter
from .ownership import owned_instances
from .postprocess import PostprocessParams, label_nuclei
from .slide.reader import open_reader_cached
from .tiling import Tile


@dataclass(frozen=True)
class TileContext:
    """Everything per-tile work needs that is the same for every tile of a slide."""

    model_shape: tuple[int, int]  # slide size in model pixels (height, width)
    halo: int  # model pixels of context on each side of a core
    params: PostprocessParams
    model_mpp: float  # microns per model pixel
    level0_per_model: float  # level-0 pixels per model pixel (polygons are written in level-0 pixels)
    work_dir: str  # the slide's temporary work folder
    zarr_path: str | None  # None: no OME-Zarr is written
    rgb_reader: tuple[str, float, float | None] | None = None  # slide reader args: the RGB slide goes in the zarr


@dataclass(frozen=True)
class TileResult:
    index: int
    count: int  # nuclei this tile owns
    cut_groups: int  # owned nuclei in touching groups cut by the read box (see ownership.py)
    seconds: float


class TileFiles(NamedTuple):
    """A tile's intermediate files in the slide's work folder."""

    labels: Path  # owned instances over the read box: their pixels' raster index and local id (npz)
    nuclei: Path  # measured polygons, one JSON line per owned nucleus
    features: Path  # GeoJSON features with global ids (one gzip member)
    table: Path  # Parquet rows with global ids


def tile_files(work_dir: str | Path, index: int) -> TileFiles:
    stem = Path(work_dir) / f"{index:07d}"
    suffixes = (".labels.npz", ".nuclei.jsonl", ".features.gz", ".parquet")
    return TileFiles(*(stem.with_name(stem.name + suffix) for suffix in suffixes))


def save_owned_labels(path: Path, labels: np.ndarray) -> None:
    """A tile's owned labels as their pixels only (raster index over the read box, label): a tile is
    mostly background, and each neighbouring core's label task reads this file again, so it is kept
    small and uncompressed (no inflating of the whole box per read)."""
    where = np.flatnonzero(labels)
    np.savez(path, index=where.astype(np.int64), value=labels.ravel()[where])


def owned_label_pixels(path: Path, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns, labels) of the pixels saved by :func:`save_owned_labels`, in the read box of
    ``width`` columns."""
    with np.load(path) as data:
        index, value = data["index"], data["value"]
    rows, cols = np.divmod(index, width)
    return rows, cols, value


def core_of_read(tile: Tile, image: np.ndarray) -> np.ndarray:
    """The tile's core cut from an array over its read box (model pixels). For the model input, the same
    pixels as a read of the core, since every output pixel is filtered from the same slide pixels."""
    return image[tile.core.relative_to(tile.read).slices()]


def process_tile(
    ctx: TileContext,
    tile: Tile,
    prob: np.ndarray,
    distance: np.ndarray | None = None,
    rgb_core: np.ndarray | None = None,
) -> TileResult:
    """Post-process one tile (probability over its read box, any float dtype). ``rgb_core``: the slide's
    RGB over the tile's core, when the caller has it (it is read again otherwise)."""
    start = time.perf_counter()
    prob = prob.astype(np.float32)
    distance = None if distance is None else distance.astype(np.float32)
    if ctx.zarr_path is not None:
        rgb = None
        if ctx.rgb_reader is not None:
            rgb = rgb_core if rgb_core is not None else open_reader_cached(*ctx.rgb_reader).read(tile.core)
        # The core's shards are this task's alone: probability and RGB go in together.
        OmeZarrWriter.open(ctx.zarr_path).write_probability(tile.core, core_of_read(tile, prob), rgb)
    labels = label_nuclei(prob, ctx.model_mpp, ctx.params, distance)
    owned = owned_instances(labels, tile.read, tile.core, ctx.model_shape, ctx.halo, mpp=ctx.model_mpp)
    files = tile_files(ctx.work_dir, tile.index)
    records = []
    if owned.count:
        save_owned_labels(files.labels, owned.labels)
        # Outlines follow the probability at the threshold the nuclei were labelled with.
        records = nuclei_records(
            owned.labels,
            prob,
            (tile.read.y0, tile.read.x0),
            ctx.model_mpp,
            ctx.level0_per_model,
            threshold=ctx.params.threshold,
        )
    with open(files.nuclei, "w") as handle:
        for record in records:
            row = {f.name: getattr(record, f.name) for f in fields(record)}  # asdict would deep-copy polygons
            row["polygon"] = shapely.to_wkt(record.polygon, rounding_precision=3)
            handle.write(json.dumps(row) + "\n")
    return TileResult(tile.index, len(records), owned.n_in_cut_groups, time.perf_counter() - start)


def read_tile(reader_args: tuple[str, float, float | None], tile: Tile) -> np.ndarray:
    """The model input of a tile: its read box, uint8 RGB at the model's pixel size."""
    return open_reader_cached(*reader_args).read(tile.read)


def post_process(
    ctx: TileContext, tile: Tile, predicted: tuple[np.ndarray, np.ndarray | None], image: np.ndarray | None = None
) -> TileResult:
    """:func:`process_tile` on a (probability, distance) pair sent by the driver; ``image`` is the tile's
    read (a worker's result, so the RGB for the zarr is not decoded twice)."""
    return process_tile(ctx, tile, *predicted, rgb_core=None if image is None else core_of_read(tile, image))


def post_process_from_batch(ctx: TileContext, tile: Tile, batch: tuple[list, float], k: int) -> TileResult:
    """:func:`process_tile` on tile ``k`` of a GPU worker's batch result (maps, model seconds)."""
    return process_tile(ctx, tile, *batch[0][k])


def batch_seconds(batch: tuple[list, float]) -> float:
    """The model seconds of a GPU worker's batch result."""
    return batch[1]


def write_rgb_core(ctx: TileContext, tile: Tile) -> None:
    """The RGB slide of a tile that is not run (no tissue): its core's shards, probability 0."""
    if ctx.zarr_path is None or ctx.rgb_reader is None:
        return
    rgb = open_reader_cached(*ctx.rgb_reader).read(tile.core)
    OmeZarrWriter.open(ctx.zarr_path).write_probability(tile.core, np.zeros(tile.core.shape, np.uint8), rgb)


def iter_tile_rows(work_dir: str | Path, index: int) -> Iterator[dict]:
    """Yield the rows a tile owns, in local id order, with each polygon as WKT text (streamed from disk)."""
    records_path = tile_files(work_dir, index).nuclei
    if not records_path.exists():
        return
    with open(records_path) as handle:
        for line in handle:
            yield json.loads(line)


def iter_tile_records(work_dir: str | Path, index: int) -> Iterator[NucleusRecord]:
    """Yield the NucleusRecords a tile owns, in local id order (streamed from disk)."""
    for row in iter_tile_rows(work_dir, index):
        row["polygon"] = shapely.from_wkt(row["polygon"])
        yield NucleusRecord(**row)


def write_tile_vectors(
    work_dir: str, index: int, offset: int, leading_comma: bool, slide_name: str, geojson: bool, table: bool
) -> int:
    """Serialise a tile's nuclei (ids offset+1, offset+2, ...) as a GeoJSON piece and a Parquet piece."""
    files = tile_files(work_dir, index)
    numbered = list(enumerate(iter_tile_records(work_dir, index), start=offset + 1))
    if geojson:
        write_feature_piece(files.features, numbered, slide_name, leading_comma)
    if table:
        with NucleusTableWriter(files.table) as writer:
            for nucleus_id, record in numbered:
                writer.write(record, nucleus_id)
    return len(numbered)
