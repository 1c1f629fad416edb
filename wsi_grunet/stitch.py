"""Per-tile work on CPU workers, and the label pass that joins tiles.

Tile pass (``process_tile``): the probability of a tile's read box -> its core written to the
OME-Zarr (each core is whole shards, so one writer per shard) -> instances over the read box ->
the instances this tile owns (centroid in its core) -> saved with their measured polygons.
Label pass (``write_label_shard``): each core's labels are painted from the owned instances of the
tile and its neighbours, with global ids = the tile's offset (prefix sum of counts) + local id.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import shapely

from .geometry import Box
from .outputs.geojson import QuPathGeoJsonWriter
from .outputs.polygons import NucleusRecord, nuclei_records
from .outputs.table import NucleusTableWriter
from .outputs.zarr_store import OmeZarrWriter
from .ownership import owned_instances
from .postprocess import PostprocessParams, label_nuclei
from .tiling import Tile


class TileFiles(NamedTuple):
    """A tile's intermediate files in the slide's work folder."""

    labels: Path  # owned instances over the read box (npz, local ids)
    nuclei: Path  # measured polygons, one JSON line per owned nucleus
    features: Path  # GeoJSON features with global ids (one gzip member)
    table: Path  # Parquet rows with global ids


def tile_files(work_dir: str | Path, index: int) -> TileFiles:
    stem = Path(work_dir) / f"{index:07d}"
    return TileFiles(*(stem.with_name(stem.name + suffix) for suffix in (".labels.npz", ".nuclei.jsonl",
                                                                           ".features.gz", ".parquet")))


def process_tile(
    tile: Tile, prob: np.ndarray, distance: np.ndarray | None, slide_shape: tuple[int, int], halo: int,
    params: PostprocessParams, model_mpp: float, level0_per_model: float, zarr_path: str, work_dir: str,
) -> dict:
    """Post-process one tile; returns counts and timings (seconds)."""
    start = time.perf_counter()
    prob = prob.astype(np.float32)
    distance = None if distance is None else distance.astype(np.float32)
    core_in_read = tile.core.relative_to(tile.read)
    OmeZarrWriter.open(zarr_path).write_probability(tile.core, prob[core_in_read.slices()])
    labels = label_nuclei(prob, model_mpp, params, distance)
    owned = owned_instances(labels, tile.read, tile.core, slide_shape, halo, mpp=model_mpp)
    files = tile_files(work_dir, tile.index)
    records = []
    if owned.count:
        np.savez_compressed(files.labels, labels=owned.labels)
        records = nuclei_records(owned.labels, prob, (tile.read.y0, tile.read.x0), model_mpp, level0_per_model)
    with open(files.nuclei, "w") as handle:
        for record in records:
            row = {f.name: getattr(record, f.name) for f in fields(record)}  # asdict would deep-copy polygons
            row["polygon"] = shapely.to_wkt(record.polygon, rounding_precision=3)
            handle.write(json.dumps(row) + "\n")
    return {"index": tile.index, "count": len(records), "cut_groups": owned.n_in_cut_groups,
            "seconds": time.perf_counter() - start}


def iter_tile_records(work_dir: Path, index: int):
    """Yield the NucleusRecords a tile owns, in local id order (streamed from disk)."""
    records_path = tile_files(work_dir, index).nuclei
    if not records_path.exists():
        return
    with open(records_path) as handle:
        for line in handle:
            row = json.loads(line)
            row["polygon"] = shapely.from_wkt(row["polygon"])
            yield NucleusRecord(**row)


def write_tile_vectors(index: int, first_id: int, leading_comma: bool, slide_name: str, work_dir: str) -> int:
    """Serialise a tile's nuclei (ids first_id, first_id+1, ...) as a gzip member of GeoJSON features
    and a small Parquet piece; the main process joins the pieces in id order."""
    files = tile_files(work_dir, index)
    features = QuPathGeoJsonWriter(files.features.with_suffix(".geojson.gz"), slide_name=slide_name)  # serialiser only
    texts = []
    with NucleusTableWriter(files.table) as table:
        for offset, record in enumerate(iter_tile_records(work_dir, index)):
            texts.append(features.feature_text(record, first_id + offset))
            table.write(record, first_id + offset)
    body = ",\n".join(texts)
    files.features.write_bytes(gzip.compress(((",\n" if leading_comma else "") + body).encode(), 6))
    return len(texts)


def write_label_shard(core: Box, sources: list[tuple[Tile, int]], zarr_path: str, work_dir: str) -> int:
    """Paint the nuclei owned by ``sources`` (tile, id offset) into ``core``; first owner wins overlaps."""
    out = np.zeros(core.shape, np.int32)
    for tile, offset in sorted(sources, key=lambda s: s[0].index):
        labels_path = tile_files(work_dir, tile.index).labels
        if not labels_path.exists():
            continue
        overlap = tile.read.intersect(core)
        if overlap.is_empty():
            continue
        with np.load(labels_path) as data:
            local = data["labels"][overlap.relative_to(tile.read).slices()]
        target = out[overlap.relative_to(core).slices()]
        paint = (local > 0) & (target == 0)
        target[paint] = local[paint] + offset
    if out.any():
        OmeZarrWriter.open(zarr_path).write_labels(core, out)
    return int(np.count_nonzero(out))
