"""One slide, end to end: slide -> tiles -> model -> stitch -> outputs.

Scheduling: tile reads and per-tile post-processing run as Dask tasks on CPU workers; the model runs
in this process (the GPU lane), which batches tiles as their reads complete and hands each
probability map back to the workers. At most ``cluster.tiles_in_flight`` tiles are between read and
post-processed, so memory does not grow with slide size. Everything is written under a temporary
folder that is renamed to ``<out>/<slide-stem>/`` only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, as_completed
from tqdm import tqdm

from . import __version__
from .config import RunConfig
from .errors import OutputError, WsiGrunetError
from .geometry import Box
from .model.checkpoint import ModelBundle
from .model.predictor import Predictor
from .outputs.geojson import assemble_gzip_collection
from .outputs.preview import render_preview
from .outputs.table import assemble_table
from .outputs.zarr_store import OmeZarrWriter
from .postprocess import PostprocessParams
from .slide.reader import SlideReader, open_reader_cached
from .slide.tissue import tile_has_tissue, tissue_mask
from .stitch import iter_tile_records, process_tile, tile_files, write_label_shard, write_tile_vectors
from .tiling import Tile, grid_shape, neighbours, plan_tiles

log = logging.getLogger(__name__)


@dataclass
class SlideResult:
    slide: str
    status: str  # ok | skipped | failed
    out_dir: str | None = None
    error: str | None = None
    nuclei: int = 0
    tiles: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def postprocess_params(bundle: ModelBundle, cfg: RunConfig) -> PostprocessParams:
    """Weights' tuned values, then any value set in the run config."""
    stored = dict(bundle.metadata.get("postprocess") or {})
    stored.setdefault("threshold", bundle.threshold)
    overrides = {k: v for k, v in vars(cfg.postprocess).items() if v is not None}
    return PostprocessParams.from_dict({**stored, **overrides})


def read_tile(path: str, target_mpp: float, mpp_override: float | None, box: Box) -> np.ndarray:
    return open_reader_cached(path, target_mpp, mpp_override).read(box)


def _software_versions() -> dict[str, str]:
    import dask
    import openslide
    import torch
    import zarr

    return {"wsi_grunet": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "dask": dask.__version__, "zarr": zarr.__version__, "openslide": openslide.__library_version__,
            "openslide_python": openslide.__version__, "numpy": np.__version__}


def finished(out_dir: Path) -> bool:
    report = out_dir / "report.json"
    try:
        return json.loads(report.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def check_writable(out_root: Path) -> None:
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        probe = out_root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out_root}: output folder is not writable ({exc.strerror or exc})") from None


def _select_tiles(reader: SlideReader, tiles: list[Tile], cfg: RunConfig) -> tuple[list[Tile], np.ndarray, float]:
    thumb, thumb_um = reader.thumbnail(cfg.tissue.thumbnail_mpp)
    if not cfg.tissue.enabled:
        return tiles, thumb, thumb_um
    mask = tissue_mask(thumb, thumb_um, cfg.tissue)
    return [t for t in tiles if tile_has_tissue(mask, thumb_um, t.read, reader.target_mpp)], thumb, thumb_um


class _TileLane:
    """Read (workers) -> predict in batches (this process) -> post-process (workers).

    At most ``limit`` tiles are between read and post-processed, which bounds memory whatever the
    slide size. On CPU tiles go one at a time: batching gives no speed-up there and delays
    post-processing.
    """

    def __init__(self, client: Client, predictor: Predictor, reader: SlideReader, cfg: RunConfig,
                 params: PostprocessParams, zarr_path: Path, work_dir: Path) -> None:
        self.client, self.predictor, self.reader, self.cfg, self.params = client, predictor, reader, cfg, params
        self.zarr_path, self.work_dir = str(zarr_path), str(work_dir)
        self.batch_size = cfg.model.batch_size if predictor.device.type == "cuda" else 1
        self.limit = max(cfg.cluster.tiles_in_flight, self.batch_size)
        self.reads = as_completed()
        self.tile_of: dict[str, Tile] = {}
        self.post: list = []
        self.results: list[dict] = []
        self.timings = {"inference_s": 0.0, "read_wait_s": 0.0}

    def _top_up(self, pending: deque) -> None:
        busy = self.reads.count() + sum(1 for f in self.post if not f.done())
        reader = self.reader
        while pending and busy < self.limit:
            tile = pending.popleft()
            future = self.client.submit(read_tile, str(reader.path), reader.target_mpp, reader.mpp_override,
                                        tile.read, pure=False, priority=-tile.index)
            self.tile_of[future.key] = tile
            self.reads.add(future)
            busy += 1

    def _collect(self, block: bool, bar: tqdm) -> None:
        for future in list(self.post):
            if block or future.done():
                self.results.append(future.result())
                self.post.remove(future)
                bar.update(1)

    def _predict(self, batch: list[tuple[Tile, np.ndarray]]) -> None:
        start = time.perf_counter()
        outputs = self.predictor.predict(np.stack([image for _, image in batch]))
        self.timings["inference_s"] += time.perf_counter() - start
        reader, cfg = self.reader, self.cfg
        for k, (tile, _) in enumerate(batch):
            distance = outputs["distance"][k].astype(np.float16) if "distance" in outputs else None
            self.post.append(self.client.submit(
                process_tile, tile, outputs["prob"][k].astype(np.float16), distance, reader.model_shape,
                cfg.tiling.halo, self.params, reader.target_mpp, reader.scale, self.zarr_path, self.work_dir,
                pure=False))

    def run(self, tiles: list[Tile], progress: bool) -> list[dict]:
        pending = deque(tiles)
        bar = tqdm(total=len(tiles), desc=Path(self.reader.path).name, unit="tile", disable=not progress)
        try:
            self._top_up(pending)
            batch: list[tuple[Tile, np.ndarray]] = []
            while pending or self.reads.count() or batch:
                if self.reads.count():
                    wait_start = time.perf_counter()
                    future = next(self.reads)
                    self.timings["read_wait_s"] += time.perf_counter() - wait_start
                    batch.append((self.tile_of.pop(future.key), future.result()))
                    future.release()
                if batch and (len(batch) >= self.batch_size or (not self.reads.count() and not pending)):
                    self._predict(batch)
                    batch = []
                self._collect(block=False, bar=bar)
                self._top_up(pending)
            self._collect(block=True, bar=bar)
        except BaseException:
            # Stop queued work before the caller removes the temporary folder it writes into.
            self.client.cancel(list(self.reads.futures) + self.post, force=True)
            raise
        finally:
            bar.close()
        return sorted(self.results, key=lambda r: r["index"])


def _write_labels(client: Client, tiles_all: list[Tile], counts: dict[int, int], grid: tuple[int, int],
                  zarr_path: Path, work_dir: Path) -> int:
    offsets, total = {}, 0
    for tile in tiles_all:  # global ids: prefix sum of owned counts in tile order
        offsets[tile.index] = total
        total += counts.get(tile.index, 0)
    futures = []
    for tile in tiles_all:
        sources = [(tiles_all[i], offsets[i]) for i in [tile.index, *neighbours(tile, grid)] if counts.get(i)]
        if sources:
            futures.append(client.submit(write_label_shard, tile.core, sources, str(zarr_path), str(work_dir), pure=False))
    client.gather(futures)
    return total


def _write_vectors(client: Client, tiles_all: list[Tile], counts: dict[int, int], work_dir: Path, tmp_dir: Path,
                   stem: str, thumb: np.ndarray, thumb_um: float, reader: SlideReader, cfg: RunConfig) -> int:
    """GeoJSON and table: workers serialise each tile's nuclei, this process joins the pieces in id
    order (streamed; never all nuclei in memory)."""
    owners = [t.index for t in tiles_all if counts.get(t.index)]
    futures, first_id = [], 1
    for n, index in enumerate(owners):
        futures.append(client.submit(write_tile_vectors, index, first_id, n > 0, stem, str(work_dir), pure=False))
        first_id += counts[index]
    written = sum(client.gather(futures))
    assemble_gzip_collection(tmp_dir / "nuclei.geojson.gz", (tile_files(work_dir, i).features for i in owners))
    assemble_table(tmp_dir / "nuclei.parquet", (tile_files(work_dir, i).table for i in owners))

    def polygons():
        for index in owners:
            for record in iter_tile_records(work_dir, index):
                yield record.polygon

    # The preview is read at the resolution that fills preview_max_px, never finer than the model's.
    height_um, width_um = (n * reader.slide_mpp for n in (reader.info.height, reader.info.width))
    preview_um = max(reader.target_mpp, max(height_um, width_um) / cfg.output.preview_max_px)
    if preview_um < thumb_um:
        thumb, thumb_um = reader.thumbnail(preview_um)
    render_preview(thumb, thumb_um, reader.slide_mpp, polygons(), tmp_dir / "preview.png", max_px=cfg.output.preview_max_px)
    return written


def run_slide(slide: Path, out_root: Path, cfg: RunConfig, bundle: ModelBundle, predictor: Predictor,
              client: Client, progress: bool = True) -> SlideResult:
    """Process one slide into ``out_root/<stem>/``. Raises WsiGrunetError for bad input."""
    start = time.perf_counter()
    stem = slide.name.split(".")[0] if slide.suffix else slide.name
    final_dir = out_root / stem
    if finished(final_dir) and not cfg.output.overwrite:
        log.info("%s: finished results exist in %s, skipped (set output.overwrite to redo)", slide, final_dir)
        return SlideResult(str(slide), "skipped", str(final_dir))
    timings: dict[str, float] = {}
    reader = SlideReader(slide, bundle.mpp, cfg.slide.mpp)
    tmp_dir = out_root / f".{stem}.partial-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    work_dir = tmp_dir / "work"
    work_dir.mkdir(parents=True)
    try:
        t = time.perf_counter()
        tiles_all = plan_tiles(reader.model_shape, cfg.tiling.tile_size, cfg.tiling.halo)
        tiles, thumb, thumb_um = _select_tiles(reader, tiles_all, cfg)
        timings["tissue_s"] = time.perf_counter() - t
        log.info("%s: %d x %d model px at %.3f um/px, %d of %d tiles hold tissue; %s", slide.name,
                 reader.model_shape[1], reader.model_shape[0], bundle.mpp, len(tiles), len(tiles_all), bundle.status_line)
        zarr_path = tmp_dir / f"{stem}.ome.zarr"
        OmeZarrWriter(zarr_path, reader.model_shape, bundle.mpp, shard=cfg.tiling.core, chunk=cfg.output.chunk,
                      levels=cfg.output.pyramid_levels, name=stem)
        params = postprocess_params(bundle, cfg)
        t = time.perf_counter()
        lane = _TileLane(client, predictor, reader, cfg, params, zarr_path, work_dir)
        tile_results = lane.run(tiles, progress)
        timings["tiles_s"] = time.perf_counter() - t
        timings.update(lane.timings)
        counts = {r["index"]: r["count"] for r in tile_results}
        t = time.perf_counter()
        total = _write_labels(client, tiles_all, counts, grid_shape(reader.model_shape, cfg.tiling.tile_size, cfg.tiling.halo), zarr_path, work_dir)
        timings["labels_s"] = time.perf_counter() - t
        t = time.perf_counter()
        OmeZarrWriter.open(zarr_path).build_pyramid(client.get_executor(pure=False))
        timings["pyramid_s"] = time.perf_counter() - t
        t = time.perf_counter()
        written = _write_vectors(client, tiles_all, counts, work_dir, tmp_dir, stem, thumb, thumb_um, reader, cfg)
        timings["vectors_s"] = time.perf_counter() - t
        if written != total:
            raise RuntimeError(f"{slide}: {written} nuclei in the vector outputs but {total} in the labels")
        shutil.rmtree(work_dir)
        timings["total_s"] = time.perf_counter() - start
        tiles_per_s = len(tiles) / timings["tiles_s"] if timings["tiles_s"] > 0 else 0.0
        report = {
            "status": "ok",
            "slide": {"path": str(slide.resolve()), **reader.info.to_dict(), "mpp_used": reader.slide_mpp,
                      "mpp_source": "--mpp override" if cfg.slide.mpp else "slide"},
            "model": {"trained": bundle.trained, "status": bundle.status_line, "weights": bundle.source,
                      "sha256": bundle.sha256, "mpp": bundle.mpp, "architecture": bundle.metadata.get("architecture"),
                      "device": str(predictor.device), "amp": str(predictor.amp_dtype)},
            "postprocess": params.to_dict(),
            "config": cfg.to_dict(),
            "counts": {"nuclei": total, "tiles_total": len(tiles_all), "tiles_with_tissue": len(tiles),
                       "model_shape": list(reader.model_shape),
                       "nuclei_in_cut_groups": int(sum(r["cut_groups"] for r in tile_results))},
            "timings": {**{k: round(v, 3) for k, v in timings.items()}, "tiles_per_s": round(tiles_per_s, 3),
                        "postprocess_task_s": round(sum(r["seconds"] for r in tile_results), 3)},
            "software": _software_versions(),
            "outputs": {"zarr": zarr_path.name, "geojson": "nuclei.geojson.gz", "table": "nuclei.parquet",
                        "preview": "preview.png"},
        }
        (tmp_dir / "report.json").write_text(json.dumps(report, indent=2))
        if final_dir.exists():  # replace an unfinished or overwritten result
            old = out_root / f".{stem}.old-{os.getpid()}"
            os.replace(final_dir, old)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, final_dir)
        log.info("%s: %d nuclei, %d tiles in %.1f s (%.2f tiles/s) -> %s", slide.name, total, len(tiles),
                 timings["total_s"], tiles_per_s, final_dir)
        return SlideResult(str(slide), "ok", str(final_dir), nuclei=total, tiles=len(tiles),
                           seconds=timings["total_s"], details=report["timings"])
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def run_cohort(slides: list[Path], out_root: Path, cfg: RunConfig, bundle: ModelBundle, client: Client,
               progress: bool = True) -> list[SlideResult]:
    """Run every slide; one bad slide never stops the others. Writes ``run_summary.json``."""
    check_writable(out_root)
    predictor = Predictor(bundle, cfg.model.device, cfg.model.amp, cfg.model.channels_last)
    log.info("model: %s on %s", bundle.status_line, predictor.device)
    results = []
    for slide in slides:
        start = time.perf_counter()
        try:
            results.append(run_slide(slide, out_root, cfg, bundle, predictor, client, progress))
        except WsiGrunetError as exc:
            log.error("%s", exc)
            results.append(SlideResult(str(slide), "failed", error=str(exc), seconds=time.perf_counter() - start))
        except Exception as exc:  # an unexpected failure of one slide must not stop the cohort
            log.error("%s: unexpected error: %s\n%s", slide, exc, traceback.format_exc())
            results.append(SlideResult(str(slide), "failed", error=f"{slide}: unexpected error: {exc!r}",
                                       seconds=time.perf_counter() - start))
    summary = {"model": bundle.status_line, "slides": [vars(r) for r in results],
               "failed": sum(r.status == "failed" for r in results)}
    tmp = out_root / ".run_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_root / "run_summary.json")
    return results
