"""Stage 2 of a slide: run the model over its tiles, behind one small interface with two backends.

- ``DriverBackend``: the model lives in the driver process (one GPU, or the CPU). Tile reads and
  post-processing are Dask tasks on worker processes; the driver batches tiles as their reads
  complete and submits each probability map back to the workers.
- ``WorkerBackend``: the model lives on Dask workers that advertise the resource ``GPU=1`` (one
  worker process per GPU, e.g. SLURM GPU jobs). A fused read -> predict task runs there with a
  predictor loaded once per worker process; post-processing is a separate task that any worker may
  take. Pixels never travel through the driver.

Both bound the tiles in flight (read but not yet post-processed), so memory does not grow with the
slide, and both return one ``TileResult`` per tile, in tile-index order. The tasks CPU workers run
(reads, post-processing) live in ``tile_work``, which never imports torch: a worker that does not
run the model does not load it (about 200 MB and 1.4 s per worker process).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from distributed import Client, Future, as_completed, wait
from tqdm import tqdm

from .config import ModelOptions, RunConfig
from .errors import CheckpointError
from .model.checkpoint import ModelBundle, resolve_weights
from .plan import SlidePlan
from .slide.reader import open_reader_cached
from .tile_work import (
    TileContext,
    TileResult,
    batch_seconds,
    core_of_read,
    post_process,
    post_process_from_batch,
    read_tile,
)
from .tiling import Tile, same_shape_batches

log = logging.getLogger(__name__)
GPU_RESOURCE = "GPU"


class TaskLedger:
    """Every Dask future a slide submitted, so a failure can stop them before its folder is removed.

    Futures without side effects (reads, predictions) are cancelled; futures that write into the
    slide's temporary folder are waited for, since a running Dask task cannot be interrupted.
    """

    def __init__(self) -> None:
        self.pure: list[Future] = []
        self.writing: list[Future] = []

    def prune(self) -> None:
        """Forget finished futures (their dependants keep what they still need alive)."""
        self.pure = [f for f in self.pure if not f.done()]
        self.writing = [f for f in self.writing if not f.done()]

    def stop(self, client: Client, timeout_s: float = 120.0) -> None:
        client.cancel([f for f in self.pure if not f.done()], force=True)
        pending = [f for f in self.writing if not f.done()]
        if pending:
            try:
                wait(pending, timeout=timeout_s)
            except Exception:  # a timeout or a failed write: nothing more to wait for
                log.warning("%d task(s) still running after %.0f s", sum(not f.done() for f in pending), timeout_s)


@dataclass
class TileRun:
    """What a backend returns once the model has seen every tile: the post-processing of the last
    tiles may still be running (``pending``), so the next slide's tiles can start meanwhile."""

    done: list[TileResult]
    pending: list[Future]
    timings: dict[str, float]

    def results(self) -> list[TileResult]:
        """Every tile's result in tile-index order (waits for the pending ones)."""
        finished = self.done + [future.result() for future in self.pending]
        self.done, self.pending = finished, []
        return sorted(finished, key=lambda r: r.index)


class InferenceBackend(Protocol):
    def run(self, plan: SlidePlan, ctx: TileContext, ledger: TaskLedger, progress: bool) -> TileRun:
        """Predict every tile of ``plan.tiles_to_run()`` and submit its post-processing."""
        ...

    def describe(self) -> dict[str, Any]: ...


def make_predictor(bundle: ModelBundle, options: ModelOptions) -> Any:
    """The model runner for ``bundle``: GRU-Net on its device, or the null model stand-in."""
    if bundle.metadata.get("architecture", {}).get("name") == "null-model":
        from .model.null_model import NullModel

        return NullModel()
    from .model.predictor import Predictor

    return Predictor.from_options(bundle, options)


def tile_maps(outputs: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Tile ``k`` of a batch, in float16: half the bytes to move, far below the uint8 storage step."""
    distance = outputs["distance"][k].astype(np.float16) if "distance" in outputs else None
    return outputs["prob"][k].astype(np.float16), distance


class _Progress:
    def __init__(self, plan: SlidePlan, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc=plan.name, unit="tile", disable=not enabled)

    def close(self) -> None:
        self.bar.close()


class DriverBackend:
    """Reads (workers) -> predict in batches (this process) -> post-process (workers).

    On CPU tiles go one at a time: batching gives no speed-up there and delays post-processing.
    """

    def __init__(self, client: Client, predictor: Any, cfg: RunConfig) -> None:
        self.client, self.predictor = client, predictor
        self.batch_size = cfg.model.batch_size if predictor.device.type == "cuda" else 1
        self.limit = max(cfg.cluster.tiles_in_flight, self.batch_size)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "driver",
            "batch_size": self.batch_size,
            "tiles_in_flight": self.limit,
            **self.predictor.describe(),
        }

    def run(self, plan: SlidePlan, ctx: TileContext, ledger: TaskLedger, progress: bool) -> TileRun:
        tiles = plan.tiles_to_run()
        pending: deque[Tile] = deque(tiles)
        reads = as_completed()
        tile_of: dict[Any, Tile] = {}
        post: list[Future] = []
        results: list[TileResult] = []
        # driver_wakeups: loop turns; each one blocks or makes progress, so it stays near 3 per tile
        timings = {
            "inference_s": 0.0,
            "inference_cpu_s": 0.0,
            "read_wait_s": 0.0,
            "post_wait_s": 0.0,
            "driver_wakeups": 0.0,
        }
        bar = _Progress(plan, len(tiles), progress)
        reader_args = plan.reader_args()

        def top_up() -> None:
            busy = reads.count() + sum(not f.done() for f in post)
            while pending and busy < self.limit:
                tile = pending.popleft()
                future = self.client.submit(read_tile, reader_args, tile, pure=False, priority=-tile.index)
                ledger.pure.append(future)
                tile_of[future.key] = tile
                reads.add(future)
                busy += 1

        def collect() -> None:
            for future in [f for f in post if f.done()]:
                results.append(future.result())
                post.remove(future)
                bar.bar.update(1)

        def predict(batch: list[tuple[Tile, np.ndarray, Future]]) -> None:
            start, start_cpu = time.perf_counter(), time.thread_time()
            outputs = self.predictor.predict(np.stack([image for _, image, _ in batch]))
            timings["inference_s"] += time.perf_counter() - start
            timings["inference_cpu_s"] += time.thread_time() - start_cpu  # this thread's share only
            for k, (tile, _, read) in enumerate(batch):
                # The read stays on its worker for the zarr's RGB (post-processing runs there by locality).
                image = read if ctx.rgb_reader is not None else None
                future = self.client.submit(post_process, ctx, tile, tile_maps(outputs, k), image, pure=False)
                read.release()
                ledger.writing.append(future)
                post.append(future)

        try:
            batch: list[tuple[Tile, np.ndarray, Future]] = []
            while pending or reads.count() or batch:
                timings["driver_wakeups"] += 1
                ledger.prune()
                collect()
                top_up()
                if reads.count() and len(batch) < self.batch_size:
                    start = time.perf_counter()
                    future = next(reads)  # blocks until a read is done
                    timings["read_wait_s"] += time.perf_counter() - start
                    tile, image = tile_of.pop(future.key), future.result()
                    if batch and image.shape != batch[0][1].shape:  # a fitted edge tile: one shape per batch
                        predict(batch)
                        batch = []
                    batch.append((tile, image, future))
                elif batch:
                    predict(batch)
                    batch = []
                elif post:  # the in-flight bound is taken by post-processing: block, never spin
                    start = time.perf_counter()
                    wait(post, return_when="FIRST_COMPLETED")
                    timings["post_wait_s"] += time.perf_counter() - start
        finally:
            bar.close()
        return TileRun(results, post, timings)


# -- the model on workers ------------------------------------------------------------------------

_WORKER_PREDICTORS: dict[tuple, Any] = {}


def worker_predictor(weights: str | None, sha256: str | None, options: ModelOptions) -> Any:
    """This worker process's predictor, loaded from the weights file once and then reused."""
    key = (weights, sha256, options)
    if key not in _WORKER_PREDICTORS:
        bundle = resolve_weights(weights)
        if sha256 is not None and bundle.sha256 != sha256:
            raise CheckpointError(
                f"{bundle.source}: on this worker the weights have sha256 {bundle.sha256}, "
                f"not {sha256} as in the driver: the workers see different weight files"
            )
        _WORKER_PREDICTORS.clear()  # one model per worker process
        _WORKER_PREDICTORS[key] = make_predictor(bundle, options)
    return _WORKER_PREDICTORS[key]


def predict_tiles_on_worker(
    weights: str | None,
    sha256: str | None,
    options: ModelOptions,
    reader_args: tuple[str, float, float | None],
    tiles: list[Tile],
    with_rgb: bool = False,
) -> tuple[list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]], float]:
    """Fused read -> predict for a batch of tiles; returns each tile's maps (with its core's RGB for the
    zarr when ``with_rgb``, so it is not decoded twice) and the model seconds."""
    predictor = worker_predictor(weights, sha256, options)
    reader = open_reader_cached(*reader_args)
    images = np.stack([reader.read(tile.read) for tile in tiles])
    start = time.perf_counter()
    outputs = predictor.predict(images)
    seconds = time.perf_counter() - start
    return [
        (*tile_maps(outputs, k), core_of_read(tile, images[k]).copy() if with_rgb else None)
        for k, tile in enumerate(tiles)
    ], seconds


class WorkerBackend:
    """Fused read -> predict tasks on ``GPU``-resource workers; post-processing on any worker."""

    def __init__(self, client: Client, bundle: ModelBundle, cfg: RunConfig) -> None:
        self.client = client
        self.weights = cfg.model.weights
        self.sha256 = bundle.sha256
        self.options = cfg.model
        self.batch_size = cfg.model.batch_size if cfg.model.device != "cpu" else 1
        self.limit = max(cfg.cluster.tiles_in_flight, self.batch_size)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "workers",
            "resource": f"{GPU_RESOURCE}=1",
            "batch_size": self.batch_size,
            "tiles_in_flight": self.limit,
            "device": self.options.device,
        }

    def run(self, plan: SlidePlan, ctx: TileContext, ledger: TaskLedger, progress: bool) -> TileRun:
        tiles = plan.tiles_to_run()
        batches = deque(same_shape_batches(tiles, self.batch_size))
        reader_args = plan.reader_args()
        in_flight: list[Future] = []
        model_s: list[Future] = []
        results: list[TileResult] = []
        bar = _Progress(plan, len(tiles), progress)
        submit: Callable[..., Future] = self.client.submit
        try:
            while batches:
                ledger.prune()
                while batches and len(in_flight) + self.batch_size <= self.limit:
                    batch = batches.popleft()
                    predicted = submit(
                        predict_tiles_on_worker,
                        self.weights,
                        self.sha256,
                        self.options,
                        reader_args,
                        batch,
                        ctx.rgb_reader is not None,
                        pure=False,
                        resources={GPU_RESOURCE: 1},
                        priority=-batch[0].index,
                    )
                    ledger.pure.append(predicted)
                    model_s.append(submit(batch_seconds, predicted, pure=False))
                    for k, tile in enumerate(batch):
                        future = submit(post_process_from_batch, ctx, tile, predicted, k, pure=False)
                        ledger.writing.append(future)
                        in_flight.append(future)
                if batches:
                    done, _ = wait(in_flight, return_when="FIRST_COMPLETED")
                    for future in done:
                        results.append(future.result())
                        in_flight.remove(future)
                        bar.bar.update(1)
        finally:
            bar.close()
        inference_s = float(sum(self.client.gather(model_s)))  # every prediction has run by now
        return TileRun(results, in_flight, {"inference_s": inference_s})


def make_backend(cfg: RunConfig, bundle: ModelBundle, client: Client) -> InferenceBackend:
    if cfg.model.backend == "workers":
        return WorkerBackend(client, bundle, cfg)
    return DriverBackend(client, make_predictor(bundle, cfg.model), cfg)
