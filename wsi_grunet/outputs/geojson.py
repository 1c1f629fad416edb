"""Streamed, gzip-compressed QuPath GeoJSON (``nuclei.geojson.gz``) of nucleus detections.

QuPath (0.4 and later) imports a ``FeatureCollection`` whose features carry a UUID ``id``,
``properties.objectType = "detection"``, a classification object with both ``name`` and ``color`` and a
``measurements`` map of name -> number. Coordinates are level-0 pixels; QuPath keeps 0.01 px precision, so
geometries are reduced to that grid here (validity-preserving) and written with two decimals. QuPath
reads ``.gz`` files only when the rest of the name ends in ``.json`` or ``.geojson``.

Features are written one at a time and never collected, so memory does not grow with the nucleus count.
The file appears under its final name only when the writer closes without error.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import typing
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from ..errors import OutputError
from .polygons import NucleusRecord

# Fixed namespace: the same slide name and nucleus id give the same feature id in every run.
NUCLEUS_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "wsi-grunet/nucleus")
QUPATH_PRECISION_PX = 0.01
MEASUREMENT_DECIMALS = 4
_HEADER = '{"type":"FeatureCollection","features":[\n'
_FOOTER = "\n]}\n"
DEFAULT_CLASSIFICATION = {"name": "Nucleus", "color": [255, 200, 0]}


def nucleus_uuid(slide_name: str, nucleus_id: int) -> str:
    """Deterministic UUID (version 5) of one nucleus of one slide."""
    return str(uuid.uuid5(NUCLEUS_ID_NAMESPACE, f"{slide_name}/{int(nucleus_id)}"))


def _ring(ring) -> list[list[float]]:
    # The coordinates lie on the 0.01 px grid already (set_precision); rounding only drops the float
    # noise, and numpy's rounding gives Python's round() there, for a whole ring at once.
    return np.round(shapely.get_coordinates(ring), 2).tolist()


def geometry_json(geom: Polygon | MultiPolygon) -> dict:
    """GeoJSON geometry dict of a (precision-reduced) Polygon or MultiPolygon; rings stay closed."""
    if isinstance(geom, Polygon):
        rings = [_ring(geom.exterior)] + [_ring(r) for r in geom.interiors]
        return {"type": "Polygon", "coordinates": rings}
    return {"type": "MultiPolygon", "coordinates": [geometry_json(p)["coordinates"] for p in geom.geoms]}


def _polygonal(geom) -> Polygon | MultiPolygon:
    """Drop non-areal leftovers of precision reduction (lines, points)."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon) and not g.is_empty]
    return MultiPolygon(parts) if len(parts) > 1 else (parts[0] if parts else Polygon())


def nucleus_feature(
    record: NucleusRecord, nucleus_id: int, slide_name: str, classification: dict | None = None, where: str = "GeoJSON"
) -> dict:
    """The QuPath detection Feature of one nucleus: the one definition of the record format."""
    geom = _polygonal(shapely.set_precision(record.polygon, QUPATH_PRECISION_PX))
    if geom.is_empty:
        raise OutputError(f"{where}: nucleus {nucleus_id} has no area at QuPath's 0.01 px precision")
    # Precision reduction may re-order rings; keep exteriors counter-clockwise (x right, y up terms).
    geom = shapely.orient_polygons(geom)
    # Four decimals are far below measurement noise and keep the file small.
    measurements = {name: round(value, MEASUREMENT_DECIMALS) for name, value in record.measurements().items()}
    measurements["Nucleus id"] = int(nucleus_id)
    bad = [name for name, value in measurements.items() if not math.isfinite(value)]
    if bad:
        raise OutputError(f"{where}: nucleus {nucleus_id} has non-finite measurement(s) {', '.join(bad)}")
    return {
        "type": "Feature",
        "id": nucleus_uuid(slide_name, nucleus_id),
        "geometry": geometry_json(geom),
        "properties": {
            "objectType": "detection",
            "classification": classification or DEFAULT_CLASSIFICATION,
            "measurements": measurements,
        },
    }


def _compact(feature: dict) -> str:
    return json.dumps(feature, separators=(",", ":"), allow_nan=False)


def write_feature_piece(
    path: str | os.PathLike,
    numbered_records: Iterable[tuple[int, NucleusRecord]],
    slide_name: str,
    leading_comma: bool,
    compresslevel: int = 6,
) -> int:
    """One gzip member of comma-separated features (ids given), for :func:`assemble_gzip_collection`.
    Returns the number of features written."""
    texts = [
        _compact(nucleus_feature(record, nucleus_id, slide_name, where=str(path)))
        for nucleus_id, record in numbered_records
    ]
    body = ",\n".join(texts)
    Path(path).write_bytes(gzip.compress(((",\n" if leading_comma and texts else "") + body).encode(), compresslevel))
    return len(texts)


class QuPathGeoJsonWriter:
    """Context manager writing nucleus detections to a gzip GeoJSON FeatureCollection.

    ``path``: the output file (name ending in ``.geojson.gz`` or ``.json.gz``); ``slide_name`` seeds the
    feature UUIDs; ``class_name`` / ``class_color`` are the QuPath classification (name and [r, g, b]).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        slide_name: str,
        class_name: str = "Nucleus",
        class_color: tuple[int, int, int] = (255, 200, 0),
        compresslevel: int = 6,
    ) -> None:
        self.path = Path(path)
        if not (self.path.name.endswith(".geojson.gz") or self.path.name.endswith(".json.gz")):
            raise OutputError(
                f"{self.path}: QuPath reads gzip GeoJSON only from names ending in .geojson.gz or .json.gz"
            )
        color = [int(c) for c in class_color]
        if len(color) != 3 or any(not 0 <= c <= 255 for c in color):
            raise OutputError(f"{self.path}: classification colour must be three integers 0..255, got {class_color!r}")
        self.slide_name = slide_name
        self.classification = {"name": str(class_name), "color": color}
        self.compresslevel = compresslevel
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._file: typing.TextIO | None = None
        self._count = 0

    @property
    def count(self) -> int:
        """Number of features written so far."""
        return self._count

    def __enter__(self) -> QuPathGeoJsonWriter:
        try:
            self._file = gzip.open(self._partial, "wt", encoding="utf-8", compresslevel=self.compresslevel)
            self._file.write(_HEADER)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write GeoJSON ({exc.strerror or exc})") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is None:
            return
        if exc_type is None:
            self.close()
        else:
            self._file.close()
            self._file = None
            self._partial.unlink(missing_ok=True)

    def close(self) -> None:
        """Finish the collection and move the file to its final name."""
        if self._file is None:
            return
        try:
            self._file.write(_FOOTER)
            self._file.close()
            os.replace(self._partial, self.path)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write GeoJSON ({exc.strerror or exc})") from None
        finally:
            self._file = None

    def feature(self, record: NucleusRecord, nucleus_id: int) -> dict:
        """The GeoJSON Feature dict of one nucleus (what :meth:`write` serialises)."""
        return nucleus_feature(record, nucleus_id, self.slide_name, self.classification, where=str(self.path))

    def feature_text(self, record: NucleusRecord, nucleus_id: int) -> str:
        """One feature serialised as compact JSON (what :meth:`write` appends)."""
        return _compact(self.feature(record, nucleus_id))

    def write(self, record: NucleusRecord, nucleus_id: int) -> None:
        """Append one nucleus. ``nucleus_id`` is its slide-wide id (also stored as a measurement)."""
        if self._file is None:
            raise OutputError(f"{self.path}: writer is not open (use it as a context manager)")
        text = self.feature_text(record, nucleus_id)
        self._file.write(text if self._count == 0 else ",\n" + text)
        self._count += 1


def assemble_gzip_collection(path: str | os.PathLike, pieces: Iterable[Path], compresslevel: int = 6) -> None:
    """Join gzip members, each holding comma-separated features (the first without a leading comma),
    into one FeatureCollection file. Concatenated gzip members are one valid gzip stream (RFC 1952),
    which Python and Java (QuPath) read as a whole; pieces are copied, never held in memory together.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as out:
            out.write(gzip.compress(_HEADER.encode(), compresslevel))
            for piece in pieces:
                with open(piece, "rb") as handle:
                    shutil.copyfileobj(handle, out)
            out.write(gzip.compress(_FOOTER.encode(), compresslevel))
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write GeoJSON ({exc.strerror or exc})") from None
