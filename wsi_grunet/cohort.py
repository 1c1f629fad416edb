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


def run_cohort(entries: Sequence[SlideEntry], out_root: Path, cfg: RunConfig, bundle: ModelBundle, client: Client,
               progress: bool = True, backend: InferenceBackend | None = None) -> list[SlideResult]:
    """Run every slide (in the given order); writes ``run_summary.json``. Results keep that order."""
    check_writable(out_root)
    backend = backend or make_backend(cfg, bundle, client)
    log.info("model: %s; inference: %s", bundle.status_line, backend.describe())
    results: list[SlideResult | None] = [None] * len(entries)
    finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish")
    finishing: tuple[int, SlideWork, Future] | None = None

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

    try:
        for k, entry in enumerate(entries):
            started = time.perf_counter()
            try:
                prepared = prepare_slide(Path(entry.path), entry.name, out_root, cfg, bundle)
                if isinstance(prepared, SlideResult):
                    results[k] = prepared
                    continue
                try:
                    infer_slide(prepared, backend, progress)
                except BaseException:
                    abandon_slide(prepared, client)
                    raise
            except Exception as exc:
                results[k] = _failed(Path(entry.path), entry.name, exc, started)
                continue
            collect()  # at most one slide finishing at a time: bounded memory, ordered outputs
            finishing = (k, prepared, finisher.submit(finish_slide, prepared, client, cfg, bundle, backend))
        collect()
    finally:
        finisher.shutdown(wait=True)
    done = [r for r in results if r is not None]
    write_run_summary(out_root, bundle, done)
    write_index_html(out_root, done, model=bundle.status_line)  # a page to look at every slide's results
    return done


def write_run_summary(out_root: Path, bundle: ModelBundle, results: list[SlideResult]) -> None:
    summary = {"model": bundle.status_line, "weights_sha256": bundle.sha256,
               "outputs": {r.name: r.slide for r in results if r.name},
               "slides": [vars(r) for r in results], "failed": sum(r.status == "failed" for r in results)}
    tmp = out_root / f".run_summary.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_root / "run_summary.json")
