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

from .cohort_state import (
    LEDGER,
    SlideLock,
    ledger_row,
    remove_stale_folders,
    slide_fingerprint,
    try_lock_slide,
    update_ledger,
)
from .config import RunConfig
from .display import display_text
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
        error = display_text(str(exc))
        log.error("%s", error)
    else:  # an unexpected failure of one slide must not stop the cohort
        error = f"{display_text(slide)}: unexpected error: {exc!r}"
        log.error("%s\n%s", error, display_text(traceback.format_exc()))
    return SlideResult(str(slide), "failed", name, error=error, seconds=time.perf_counter() - started)


def _unrecorded(result: SlideResult, exc: Exception) -> SlideResult:
    """The slide's result when it could not be merged into cohort.csv: failed, with the reason on one line."""
    reason = " ".join((str(exc) or repr(exc)).split())
    error = f"{result.slide}: its result ({result.status}) could not be recorded in {LEDGER}: {reason}"
    log.error("%s", display_text(error))
    return SlideResult(result.slide, "failed", result.name, result.out_dir, error=error, seconds=result.seconds)


def _abandon(work: SlideWork, client: Client) -> None:
    """Stop a failed slide's tasks and remove its folder; a problem doing so is logged, never raised over
    the slide's own error."""
    try:
        abandon_slide(work, client)
    except Exception as exc:
        log.error("%s: stopping its tasks after a failure failed too: %r", display_text(work.plan.slide), exc)


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

    def record(k: int, result: SlideResult) -> None:
        row = ledger_row(
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
        update_ledger(out_root, [row])

    def settle(k: int) -> None:
        """Slide ``k``'s result is final: record it in the ledger, then let other runs have the slide.

        A result that cannot be recorded makes the slide failed (the run summary and the index say
        why); recording that is tried once, and the run goes on with the next slide either way.
        """
        result = results[k]
        try:
            if result is not None:
                try:
                    record(k, result)
                except Exception as exc:
                    results[k] = result = _unrecorded(result, exc)
                    try:
                        record(k, result)
                    except Exception as again:
                        log.error("%s: its failure is not in %s either: %r", result.slide, LEDGER, again)
        finally:
            lock = locks.pop(k, None)
            if lock is not None:
                lock.release()

    def start(k: int, entry: SlideEntry) -> SlideWork | None:
        """Lock slide ``k``, plan it and run its tiles. None when its result is already final (another
        run holds it, or it is finished): then ``results[k]`` holds it."""
        lock = try_lock_slide(out_root, entry.name)
        if lock is None:
            log.info(
                "%s: another run is working on %s; left to it",
                display_text(entry.path),
                display_text(out_root / entry.name),
            )
            results[k] = SlideResult(str(entry.path), "busy", entry.name, str(out_root / entry.name))
            return None
        locks[k] = lock
        try:
            fingerprints[k] = slide_fingerprint(
                Path(entry.path), cfg, bundle.sha256, bundle.metadata.get("postprocess")
            )
        except OSError:  # an unreadable slide: prepare_slide reports it
            fingerprints[k] = None
        remove_stale_folders(out_root / entry.name, lock)  # a killed run's temporary folders
        prepared = prepare_slide(Path(entry.path), entry.name, out_root, cfg, bundle, fingerprints[k])
        if isinstance(prepared, SlideResult):
            results[k] = prepared
            return None
        try:
            infer_slide(prepared, backend, progress)
        except BaseException:
            _abandon(prepared, client)
            raise
        return prepared

    def collect() -> None:
        nonlocal finishing
        if finishing is None:
            return
        k, work, future = finishing
        finishing = None
        try:
            results[k] = future.result()
        except Exception as exc:
            results[k] = _failed(entries[k].path, entries[k].name, exc, work.started)
            _abandon(work, client)
        settle(k)

    try:
        for k, entry in enumerate(entries):
            started = time.perf_counter()
            try:
                work = start(k, entry)
            except Exception as exc:  # whatever goes wrong with one slide fails that slide only
                results[k], work = _failed(Path(entry.path), entry.name, exc, started), None
            if work is None:
                settle(k)
                continue
            collect()  # at most one slide finishing at a time: bounded memory, ordered outputs
            finishing = (k, work, finisher.submit(finish_slide, work, client, cfg, bundle, backend))
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
    try:
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        os.replace(tmp, out_root / "run_summary.json")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
