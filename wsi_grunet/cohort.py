"""Many slides: one bad slide never stops the others, and one slide's finishing (labels, pyramid,
vectors, preview) overlaps the next slide's tiles so the model is not idle while outputs are written.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from distributed import Client

from .cohort_state import SlideLock, ledger_row, remove_stale_folders, slide_fingerprint, try_lock_slide, update_ledger
from .config import RunConfig
from .errors import WsiGrunetError
from .inference import InferenceBackend, make_backend
from .model.checkpoint import ModelBundle
from .outputs.index_html import write_index_html
from .pipeline import (
    SlideResult,
    SlideWork,
    abandon_slide,
    check_writable,
    finish_slide,
    infer_slide,
    prepare_slide,
)
from .slide.discovery import SlideEntry

log = logging.getLogger(__name__)


def _failed(slide: Path, name: str, exc: BaseException, started: float) -> SlideResult:
    if isinstance(exc, WsiGrunetError):
        log.error("%s", exc)
        error = str(exc)
    else:  # an unexpected failure of one slide must not stop the cohort
        log.error("%s: unexpected error: %s\n%s", slide, exc, traceback.format_exc())
        error = f"{slide}: unexpected error: {exc!r}"
    return SlideResult(str(slide), "failed", name, error=error, seconds=time.perf_counter() - started)


def run_cohort(
    entries: Sequence[SlideEntry],
    out_root: Path,
    cfg: RunConfig,
    bundle: ModelBundle,
    client: Client,
    progress: bool = True,
    backend: InferenceBackend | None = None,
) -> list[SlideResult]:
    """Run every slide (in the given order); writes ``run_summary.json``. Results keep that order.

    Each slide is locked while this run works on it (``cohort_state``): a slide another live run holds
    is reported ``busy`` and left to it; finished results count only with the same fingerprint; every
    final result is merged into ``<out>/cohort.csv`` as soon as it is known.
    """
    check_writable(out_root)
    backend = backend or make_backend(cfg, bundle, client)
    log.info("model: %s; inference: %s", bundle.status_line, backend.describe())
    results: list[SlideResult | None] = [None] * len(entries)
    finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish")
    finishing: tuple[int, SlideWork, Future] | None = None
    locks: dict[int, SlideLock] = {}
    fingerprints: dict[int, str | None] = {}

    def settle(k: int) -> None:
        """Slide ``k``'s result is final: record it in the ledger, then let other runs have the slide."""
        result = results[k]
        try:
            if result is not None:
                update_ledger(
                    out_root,
                    [
                        ledger_row(
                            result.slide,
                            result.name,
                            result.status,
                            nuclei=result.nuclei,
                            tiles=result.tiles,
                            seconds=result.seconds,
                            weights_sha256=bundle.sha256,
                            fingerprint=fingerprints.get(k),
                            error=result.error,
                        )
                    ],
                )
        finally:
            lock = locks.pop(k, None)
            if lock is not None:
                lock.release()

    def collect() -> None:
        nonlocal finishing
        if finishing is None:
            return
        k, work, future = finishing
        finishing = None
        try:
            results[k] = future.result()
        except Exception as exc:
            abandon_slide(work, client)
            results[k] = _failed(entries[k].path, entries[k].name, exc, work.started)
        settle(k)

    try:
        for k, entry in enumerate(entries):
            started = time.perf_counter()
            lock = try_lock_slide(out_root, entry.name)
            if lock is None:
                log.info("%s: another run is working on %s; left to it", entry.path, out_root / entry.name)
                results[k] = SlideResult(str(entry.path), "busy", entry.name, str(out_root / entry.name))
                settle(k)
                continue
            locks[k] = lock
            try:
                fingerprints[k] = slide_fingerprint(
                    Path(entry.path), cfg, bundle.sha256, bundle.metadata.get("postprocess")
                )
            except OSError:  # an unreadable slide: prepare_slide reports it
                fingerprints[k] = None
            remove_stale_folders(out_root / entry.name, lock)  # a killed run's temporary folders
            try:
                prepared = prepare_slide(Path(entry.path), entry.name, out_root, cfg, bundle, fingerprints[k])
                if isinstance(prepared, SlideResult):
                    results[k] = prepared
                    settle(k)
                    continue
                try:
                    infer_slide(prepared, backend, progress)
                except BaseException:
                    abandon_slide(prepared, client)
                    raise
            except Exception as exc:
                results[k] = _failed(Path(entry.path), entry.name, exc, started)
                settle(k)
                continue
            collect()  # at most one slide finishing at a time: bounded memory, ordered outputs
            finishing = (k, prepared, finisher.submit(finish_slide, prepared, client, cfg, bundle, backend))
        collect()
    finally:
        finisher.shutdown(wait=True)
        for lock in locks.values():  # interrupted: nothing of these slides was moved into place
            lock.release()
    done = [r for r in results if r is not None]
    write_run_summary(out_root, bundle, done)
    write_index_html(out_root, done, model=bundle.status_line)  # a page to look at every slide's results
    return done


def write_run_summary(out_root: Path, bundle: ModelBundle, results: list[SlideResult]) -> None:
    summary = {
        "model": bundle.status_line,
        "weights_sha256": bundle.sha256,
        "outputs": {r.name: r.slide for r in results if r.name},
        "slides": [vars(r) for r in results],
        "failed": sum(r.status == "failed" for r in results),
    }
    tmp = out_root / f".run_summary.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_root / "run_summary.json")
