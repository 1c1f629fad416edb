"""Nuclei of a finished run as a TIAToolbox ``SQLiteStore`` (``<slide>/nuclei.db``).

Polygons come from ``nuclei.geojson.gz`` (level-0 pixels, as written by the run), streamed one feature per
line; the measurements become annotation properties under the ``nuclei.parquet`` column names (``area_um2``
...), with ``nucleus_id`` (the id of the label image and the table) and ``class`` = "nucleus". The annotation
key is the feature's UUID, the same as in QuPath. Written in batches to ``<out>.partial-<pid>`` and renamed
into place when complete.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import require_tiatoolbox

require_tiatoolbox()

from shapely.geometry import shape  # noqa: E402
from tiatoolbox.annotation.storage import Annotation, SQLiteStore  # noqa: E402

from ..errors import OutputError  # noqa: E402
from ..outputs.polygons import MEASUREMENTS  # noqa: E402

GEOJSON_NAME = "nuclei.geojson.gz"
STORE_NAME = "nuclei.db"
BATCH = 5_000
_COLUMN_OF = {label: attr for attr, label in MEASUREMENTS}


class NucleusStore(SQLiteStore):
    """TIAToolbox's SQLiteStore, also on Pythons built without loadable SQLite extensions.

    TIAToolbox reads SQLite's compile options after ``enable_load_extension(True)``, which such builds
    (e.g. some python.org/pyenv builds) lack, so the store cannot even open there; the options (JSON and
    R-tree support, which it checks) are readable without it. Files are ordinary TIAToolbox stores.
    """

    @staticmethod
    def compile_options() -> list[str]:
        with sqlite3.connect(":memory:") as conn:
            options = conn.execute("pragma compile_options").fetchall()
        return [opt for (opt,) in options]


def open_store(path: str | os.PathLike, **kwargs: bool) -> SQLiteStore:
    """Open a store with TIAToolbox's own class where it works here, else :class:`NucleusStore`."""
    cls = SQLiteStore if hasattr(sqlite3.Connection, "enable_load_extension") else NucleusStore
    return cls(Path(path), **kwargs)


@dataclass(frozen=True)
class ExportResult:
    slide_dir: Path
    store: Path
    annotations: int


def slide_folders(results: Path) -> list[Path]:
    """The slide result folders under ``results`` (itself, when it is one), finished ones only."""
    results = Path(results)
    if not results.is_dir():
        raise OutputError(f"{results}: not a folder of results")
    if (results / GEOJSON_NAME).exists():
        return [results]
    found = sorted(
        p.parent
        for p in results.rglob(GEOJSON_NAME)
        if not any(part.startswith(".") for part in p.relative_to(results).parts)
    )
    if not found:
        raise OutputError(
            f"{results}: no slide results with {GEOJSON_NAME} found (run `wsi-grunet run` with "
            "output.formats including geojson)"
        )
    return found


def read_features(path: Path) -> Iterator[dict]:
    """Features of a ``nuclei.geojson.gz`` written by wsi-grunet (one feature per line), never all in memory."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                text = line.strip().rstrip(",")
                if not text.startswith('{"type":"Feature"'):
                    continue  # the collection's header and footer lines
                try:
                    yield json.loads(text)
                except json.JSONDecodeError as exc:
                    raise OutputError(f"{path}: line {number} is not a GeoJSON feature ({exc.msg})") from None
    except (OSError, EOFError) as exc:
        raise OutputError(f"{path}: cannot read ({exc})") from None


def feature_annotation(feature: dict) -> tuple[str, Annotation]:
    """(key, Annotation) of one wsi-grunet nucleus feature."""
    measurements = feature["properties"].get("measurements", {})
    props: dict[str, float | int | str] = {"class": "nucleus"}
    for label, value in measurements.items():
        if label == "Nucleus id":
            props["nucleus_id"] = int(value)
        else:
            props[_COLUMN_OF.get(label, label)] = value
    return str(feature["id"]), Annotation(shape(feature["geometry"]), props)


def _batches(items: Iterable[tuple[str, Annotation]], size: int) -> Iterator[list[tuple[str, Annotation]]]:
    batch: list[tuple[str, Annotation]] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def export_slide(slide_dir: Path, out: Path | None = None, batch: int = BATCH, overwrite: bool = True) -> ExportResult:
    """Write one slide folder's nuclei to a SQLiteStore (default ``<slide_dir>/nuclei.db``)."""
    slide_dir = Path(slide_dir)
    source = slide_dir / GEOJSON_NAME
    if not source.exists():
        raise OutputError(f"{slide_dir}: no {GEOJSON_NAME} (the polygons come from it)")
    out = Path(out) if out is not None else slide_dir / STORE_NAME
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    partial.unlink(missing_ok=True)
    count = 0
    try:
        store = open_store(partial, auto_commit=False)
        try:
            for group in _batches((feature_annotation(f) for f in read_features(source)), batch):
                keys, annotations = zip(*group)
                store.append_many(annotations, keys)
                store.commit()
                count += len(group)
        finally:
            store.close()
            # the store reconnects to its path when collected; let it go before the file is renamed
            del store
            gc.collect()
        os.replace(partial, out)
    except (OSError, ValueError, KeyError) as exc:
        raise OutputError(f"{out}: cannot write the TIAToolbox store ({exc})") from None
    finally:
        partial.unlink(missing_ok=True)
    return ExportResult(slide_dir, out, count)


def export_results(results: Path, out: Path | None = None) -> list[ExportResult]:
    """Export every slide folder under ``results``; ``out`` names the store file when there is one slide."""
    folders = slide_folders(Path(results))
    if out is not None and len(folders) > 1:
        raise OutputError(f"--out {out}: one file cannot hold {len(folders)} slides; leave --out unset")
    return [export_slide(folder, out) for folder in folders]
