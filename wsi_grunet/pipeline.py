"""One slide through its three stages: plan -> infer -> finish.

- plan (``plan.py``): open the slide, find tissue, choose the tiles; saved as ``plan.json``.
- infer (``inference.py``): the model over the tiles plus per-tile post-processing (``tile_work.py``),
  through an inference backend (model in this process, or on GPU workers).
- finish (here): the label image (``label_image.py``), the OME-Zarr pyramid, GeoJSON and Parquet joined
  in id order, the preview and ``report.json``; then the temporary folder is renamed into place.

Everything is written under ``<out>/<parent>/.<leaf>.partial-<pid>/`` and renamed to ``<out>/<name>/``
only when complete. ``cohort.py`` runs many slides and overlaps one slide's finishing with the next
slide's tiles.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client

from . import __version__
from .config import RunConfig
from .display import display_text
from .errors import OutputError
from .inference import InferenceBackend, TaskLedger, TileRun
from .label_image import label_shard_jobs, write_label_shard
from .model.checkpoint import ModelBundle
from .nucleus_ids import id_offsets
from .outputs.geojson import assemble_gzip_collection
from .outputs.preview import InsetSource, render_preview
from .outputs.table import assemble_table
from .outputs.zarr_store import LABELS_PATH, OmeZarrWriter, downsample_shard_after
from .plan import SlidePlan, plan_slide
from .postprocess import PostprocessParams
from .tile_work import (
    TileContext,
    TileResult,
    iter_tile_rows,
    tile_files,
    write_rgb_core,
    write_tile_vectors,
)

log = logging.getLogger(__name__)
ALL_FORMATS = ("zarr", "geojson", "parquet", "preview")


@dataclass
class SlideResult:
    slide: str
    status: str  # ok | skipped | failed | busy
    name: str | None = None  # output name (folder under the output root)
    out_dir: str | None = None
    error: str | None = None
    nuclei: int = 0
    tiles: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every field goes into text outputs (cohort.csv, run_summary.json, index.html, the summary
        # printed): a file name that is not UTF-8, here or quoted in an error, is kept in its display form.
        self.slide = display_text(self.slide)
        self.name = None if self.name is None else display_text(self.name)
        self.out_dir = None if self.out_dir is None else display_text(self.out_dir)
        self.error = None if self.error is None else display_text(self.error)


@dataclass
class SlideWork:
    """A slide between its stages: its plan, its folders and what the tiles produced so far."""

    plan: SlidePlan
    thumb: np.ndarray
    thumb_um: float
    final_dir: Path
    tmp_dir: Path
    ctx: TileContext
    started: float
    ledger: TaskLedger = field(default_factory=TaskLedger)
    timings: dict[str, float] = field(default_factory=dict)
    tile_run: TileRun | None = None
    fingerprint: str | None = None  # cohort_state.slide_fingerprint, stored in report.json

    @property
    def tile_results(self) -> list[TileResult]:
        return [] if self.tile_run is None else self.tile_run.results()

    @property
    def work_dir(self) -> Path:
        return Path(self.ctx.work_dir)


def postprocess_params(bundle: ModelBundle, cfg: RunConfig) -> PostprocessParams:
    """Weights' tuned values, then any value set in the run config."""
    stored = dict(bundle.metadata.get("postprocess") or {})
    stored.setdefault("threshold", bundle.threshold)
    overrides = {k: v for k, v in vars(cfg.postprocess).items() if v is not None}
    return PostprocessParams.from_dict({**stored, **overrides})


def software_versions() -> dict[str, str]:
    import dask
    import openslide
    import torch
    import zarr

    return {
        "wsi_grunet": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dask": dask.__version__,
        "zarr": zarr.__version__,
        "openslide": openslide.__library_version__,
        "openslide_python": openslide.__version__,
        "numpy": np.__version__,
    }


def read_report(out_dir: Path) -> dict[str, Any] | None:
    try:
        report = json.loads((out_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def check_writable(out_root: Path) -> None:
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        probe = out_root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out_root}: output folder is not writable ({exc.strerror or exc})") from None


def output_dirs(out_root: Path, name: str) -> tuple[Path, Path]:
    """The slide's final folder and this process's temporary folder beside it."""
    final_dir = out_root / name
    return final_dir, final_dir.parent / f".{final_dir.name}.partial-{os.getpid()}"


def existing_result(slide: Path, final_dir: Path) -> dict[str, Any] | None:
    """The finished report in ``final_dir``, if any; an error when it belongs to another slide."""
    report = read_report(final_dir)
    if report is None or report.get("status") != "ok":
        return None
    other = report.get("slide", {}).get("path")
    if other and not same_slide(other, slide):
        raise OutputError(
            f"{display_text(slide)}: its output folder {display_text(final_dir)} holds the results of another "
            f"slide ({other}); two slides never share an output folder: use another --out or rename one slide"
        )
    return report


def same_slide(recorded: str, slide: Path) -> bool:
    """Whether a report's ``slide.path`` (the display form of the resolved path; as given, possibly
    relative, in reports of earlier versions) names ``slide``."""
    return display_text(Path(recorded).resolve()) == display_text(slide.resolve())


def prepare_slide(
    slide: Path, name: str, out_root: Path, cfg: RunConfig, bundle: ModelBundle, fingerprint: str | None = None
) -> SlideWork | SlideResult:
    """Stage 1: plan the slide and set up its temporary folder (or report it as already finished).

    With a ``fingerprint``, finished results count only when their report has the same one."""
    start = time.perf_counter()
    final_dir, tmp_dir = output_dirs(out_root, name)
    existing = existing_result(slide, final_dir)
    if existing is not None and not cfg.output.overwrite:
        if fingerprint is None or existing.get("fingerprint") == fingerprint:
            log.info(
                "%s: finished results exist in %s, skipped (set output.overwrite to redo)",
                display_text(slide),
                display_text(final_dir),
            )
            counts = existing.get("counts") or {}
            return SlideResult(
                str(slide),
                "skipped",
                name,
                str(final_dir),
                nuclei=int(counts.get("nuclei", 0)),
                tiles=int(counts.get("tiles_with_tissue", 0)),
            )
        log.info(
            "%s: the results in %s came from other weights, settings or slide file; redone",
            display_text(slide),
            display_text(final_dir),
        )
    plan, thumb, thumb_um = plan_slide(slide, name, cfg, bundle.mpp)
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    work_dir = tmp_dir / "work"
    work_dir.mkdir(parents=True)
    zarr_path = tmp_dir / f"{final_dir.name}.ome.zarr" if "zarr" in cfg.output.formats else None
    try:
        plan.save(tmp_dir / "plan.json")
        if zarr_path is not None:
            OmeZarrWriter(
                zarr_path,
                plan.model_shape,
                plan.model_mpp,
                shard=plan.core,
                chunk=cfg.zarr_chunk,
                levels=cfg.output.pyramid_levels,
                name=final_dir.name,
                rgb=cfg.output.slide_rgb,
            )
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    ctx = TileContext(
        model_shape=plan.model_shape,
        halo=plan.halo,
        params=postprocess_params(bundle, cfg),
        model_mpp=plan.model_mpp,
        level0_per_model=plan.level0_per_model,
        work_dir=str(work_dir),
        zarr_path=None if zarr_path is None else str(zarr_path),
        rgb_reader=plan.reader_args() if zarr_path is not None and cfg.output.slide_rgb else None,
    )
    work = SlideWork(plan, thumb, thumb_um, final_dir, tmp_dir, ctx, start, fingerprint=fingerprint)
    work.timings["plan_s"] = time.perf_counter() - start
    log.info(
        "%s: %d x %d model px at %.3f um/px, %d of %d tiles hold tissue; %s",
        name,
        plan.model_shape[1],
        plan.model_shape[0],
        plan.model_mpp,
        len(plan.tissue_tiles),
        len(plan.all_tiles()),
        bundle.status_line,
    )
    return work


def infer_slide(work: SlideWork, backend: InferenceBackend, progress: bool) -> None:
    """Stage 2: every tile predicted; the last tiles' post-processing may still be running after it."""
    start = time.perf_counter()
    work.tile_run = backend.run(work.plan, work.ctx, work.ledger, progress)
    work.timings["model_phase_s"] = time.perf_counter() - start
    work.timings.update(work.tile_run.timings)


def _submit_vectors(
    client: Client, work: SlideWork, owners: list[int], offsets: dict[int, int], cfg: RunConfig
) -> list:
    """Workers serialise each owning tile's nuclei with their slide-wide ids (GeoJSON and table pieces)."""
    geojson, table = "geojson" in cfg.output.formats, "parquet" in cfg.output.formats
    if not (geojson or table):
        return []
    args = (work.final_dir.name, geojson, table)
    futures = [
        client.submit(write_tile_vectors, str(work.work_dir), index, offsets[index], n > 0, *args, pure=False)
        for n, index in enumerate(owners)
    ]
    work.ledger.writing.extend(futures)
    return futures


def _assemble_vectors(work: SlideWork, owners: list[int], cfg: RunConfig) -> None:
    """Join the tiles' pieces in id order (streamed; never all nuclei in memory)."""
    if "geojson" in cfg.output.formats:
        assemble_gzip_collection(
            work.tmp_dir / "nuclei.geojson.gz", (tile_files(work.work_dir, i).features for i in owners)
        )
    if "parquet" in cfg.output.formats:
        assemble_table(work.tmp_dir / "nuclei.parquet", (tile_files(work.work_dir, i).table for i in owners))


def _submit_zarr(client: Client, work: SlideWork, counts: dict[int, int], offsets: dict[int, int]) -> tuple[list, list]:
    """Label shards, the RGB of tiles without tissue, then the pyramid: each level of the image and of
    the labels as soon as the level above it is written. Returns (level-0 writes, pyramid tasks)."""
    plan, zarr_path = work.plan, work.ctx.zarr_path
    assert zarr_path is not None  # only called when the slide has an OME-Zarr
    jobs = label_shard_jobs(plan.all_tiles(), counts, offsets, plan.grid)
    labels = [
        client.submit(write_label_shard, core, sources, zarr_path, str(work.work_dir), pure=False)
        for core, sources in jobs
    ]
    image: list[Any] = []
    if work.ctx.rgb_reader is not None:  # the RGB of the tiles without tissue, one task per core
        run = set(plan.tissue_tiles)
        image = [
            client.submit(write_rgb_core, work.ctx, tile, pure=False)
            for tile in plan.all_tiles()
            if tile.index not in run
        ]
    writer = OmeZarrWriter.open(zarr_path)
    above = {"": image, LABELS_PATH: labels}
    pyramid: list[Any] = []
    for level in range(1, writer.levels):
        this_level: dict[str, list] = {group: [] for group in above}
        for args in writer.pyramid_tasks(level):
            this_level[args[1]].append(client.submit(downsample_shard_after, above[args[1]], *args, pure=False))
        above = this_level
        pyramid += [future for futures in this_level.values() for future in futures]
    work.ledger.writing.extend(image + labels + pyramid)
    return image + labels, pyramid


def _write_preview(work: SlideWork, owners: list[int], cfg: RunConfig, total: int) -> None:
    def nuclei():  # streamed from the tiles' records; the preview walks them twice and draws a few
        for index in owners:
            for row in iter_tile_rows(work.work_dir, index):
                yield row["centroid_x"], row["centroid_y"], row["polygon"]  # WKT: parsed only if drawn

    plan, thumb, thumb_um = work.plan, work.thumb, work.thumb_um
    # The preview is read at the resolution that fills preview_max_px, never finer than the model's.
    height_um, width_um = (n * plan.slide_mpp for n in (plan.slide_info["height"], plan.slide_info["width"]))
    preview_um = max(plan.model_mpp, max(height_um, width_um) / cfg.output.preview_max_px)
    reader = plan.open_reader()
    if preview_um < thumb_um:
        thumb, thumb_um = reader.thumbnail(preview_um)
    render_preview(
        thumb,
        thumb_um,
        plan.slide_mpp,
        nuclei,
        work.tmp_dir / "preview.png",
        slide_shape_l0=(plan.slide_info["height"], plan.slide_info["width"]),
        inset=InsetSource(reader.read, plan.model_mpp),
        max_px=cfg.output.preview_max_px,
        title=f"{plan.name}: {total:,} nuclei",
    )


def finish_slide(
    work: SlideWork, client: Client, cfg: RunConfig, bundle: ModelBundle, backend: InferenceBackend
) -> SlideResult:
    """Stage 3: labels, pyramid, vectors, preview and report; then the folder is moved into place."""
    plan, timings = work.plan, work.timings
    tile_results = work.tile_results  # waits for the last tiles' post-processing
    timings["tiles_s"] = time.perf_counter() - work.started - timings["plan_s"]
    counts = {r.index: r.count for r in tile_results}
    offsets = id_offsets(counts, counts)
    total = sum(counts.values())
    formats = [f for f in ALL_FORMATS if f in cfg.output.formats]
    # Everything below runs side by side: zarr writes and vector pieces on the workers, the preview in a
    # thread here while this thread joins the vector pieces. Each stage's time is from the start of
    # finishing to its end, so the stages overlap.
    start = time.perf_counter()
    owners = sorted(i for i in counts if counts[i])  # tiles that own nuclei, in id order
    level0, pyramid = _submit_zarr(client, work, counts, offsets) if work.ctx.zarr_path is not None else ([], [])
    vectors = _submit_vectors(client, work, owners, offsets, cfg)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="preview") as pool:
        preview = None
        if "preview" in formats:
            preview = pool.submit(_write_preview, work, owners, cfg, total)
        written = sum(client.gather(vectors)) if vectors else total
        _assemble_vectors(work, owners, cfg)
        if written != total:
            raise RuntimeError(f"{plan.slide}: {written} nuclei in the vector outputs but {total} in the tiles")
        timings["vectors_s"] = time.perf_counter() - start
        if work.ctx.zarr_path is not None:
            client.gather(level0)
            timings["labels_s"] = time.perf_counter() - start
            client.gather(pyramid)
            timings["pyramid_s"] = time.perf_counter() - start
        if preview is not None:
            preview.result()
            timings["preview_s"] = time.perf_counter() - start
    timings["finish_s"] = time.perf_counter() - start
    shutil.rmtree(work.work_dir)
    timings["total_s"] = time.perf_counter() - work.started
    n_tiles = len(plan.tissue_tiles)
    tiles_per_s = n_tiles / timings["tiles_s"] if timings.get("tiles_s") else 0.0
    report: dict[str, Any] = {
        "status": "ok",
        "name": plan.name,
        "fingerprint": work.fingerprint,
        "slide": {
            **plan.slide_info,
            # after slide_info, whose path is the one given (perhaps relative): reruns compare this one
            "path": display_text(Path(plan.slide).resolve()),
            "mpp_used": plan.slide_mpp,
            "mpp_source": "--mpp override" if plan.mpp_override else "slide",
        },
        "model": {
            "trained": bundle.trained,
            "status": bundle.status_line,
            "weights": bundle.source,
            "sha256": bundle.sha256,
            "mpp": bundle.mpp,
            "architecture": bundle.metadata.get("architecture"),
            "inference": backend.describe(),
        },
        "plan": {
            "tile_size": plan.tile_size,
            "halo": plan.halo,
            "zarr_chunk": cfg.zarr_chunk,
            "level0_per_model": plan.level0_per_model,
            "model_shape": list(plan.model_shape),
        },
        "postprocess": work.ctx.params.to_dict(),
        "config": cfg.to_dict(),
        "counts": {
            "nuclei": total,
            "tiles_total": len(plan.all_tiles()),
            "tiles_with_tissue": n_tiles,
            "model_shape": list(plan.model_shape),
            "nuclei_in_cut_groups": int(sum(r.cut_groups for r in tile_results)),
        },
        "timings": {
            **{k: round(v, 3) for k, v in timings.items()},
            "tiles_per_s": round(tiles_per_s, 3),
            "postprocess_task_s": round(sum(r.seconds for r in tile_results), 3),
        },
        "software": software_versions(),
        "outputs": {
            key: value
            for key, value in {
                "zarr": f"{work.final_dir.name}.ome.zarr",
                "geojson": "nuclei.geojson.gz",
                "parquet": "nuclei.parquet",
                "preview": "preview.png",
            }.items()
            if key in formats
        },
    }
    (work.tmp_dir / "report.json").write_text(json.dumps(report, indent=2))
    _move_into_place(work.tmp_dir, work.final_dir)
    log.info(
        "%s: %d nuclei, %d tiles in %.1f s (%.2f tiles/s) -> %s",
        plan.name,
        total,
        n_tiles,
        timings["total_s"],
        tiles_per_s,
        display_text(work.final_dir),
    )
    return SlideResult(
        plan.slide,
        "ok",
        plan.name,
        str(work.final_dir),
        nuclei=total,
        tiles=n_tiles,
        seconds=timings["total_s"],
        details=report["timings"],
    )


def _move_into_place(tmp_dir: Path, final_dir: Path) -> None:
    if final_dir.exists():  # replace an unfinished or overwritten result
        old = final_dir.parent / f".{final_dir.name}.old-{os.getpid()}"
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def abandon_slide(work: SlideWork, client: Client) -> None:
    """After a failure: stop the slide's tasks, then remove its temporary folder (also when stopping
    fails, so a failed slide leaves nothing behind)."""
    try:
        work.ledger.stop(client)
    finally:
        shutil.rmtree(work.tmp_dir, ignore_errors=True)


def run_slide(
    slide: Path,
    name: str,
    out_root: Path,
    cfg: RunConfig,
    bundle: ModelBundle,
    backend: InferenceBackend,
    client: Client,
    progress: bool = True,
) -> SlideResult:
    """All three stages of one slide. Raises WsiGrunetError for bad input."""
    work = prepare_slide(slide, name, out_root, cfg, bundle)
    if isinstance(work, SlideResult):
        return work
    try:
        infer_slide(work, backend, progress)
        return finish_slide(work, client, cfg, bundle, backend)
    except BaseException:
        abandon_slide(work, client)
        raise
