"""Independent checker of the GeoJSON that QuPath (0.4+) imports as detections.

Rules (from QuPath's GeoJSON reader): gzip files must be named ``*.geojson.gz`` or ``*.json.gz``; the top
level is a FeatureCollection; each feature has ``"type": "Feature"``, a UUID string ``id`` (unique in the
file), a Polygon or MultiPolygon geometry with finite coordinates and closed rings of at least four points
that shapely accepts as valid; ``properties.objectType == "detection"``; no ``properties.type`` (QuPath
would read it as the object type); a classification object with a ``name`` string and a ``color`` of three
integers 0..255; ``measurements`` a map of name -> finite number.
"""

from __future__ import annotations

import gzip
import json
import math
import uuid
from pathlib import Path

from shapely.geometry import shape


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ring_problems(ring, where: str) -> list[str]:
    if not isinstance(ring, list) or len(ring) < 4:
        return [f"{where}: a ring needs at least 4 positions"]
    problems = []
    for pos in ring:
        if not (isinstance(pos, list) and len(pos) == 2 and all(_is_number(v) and math.isfinite(v) for v in pos)):
            problems.append(f"{where}: position {pos!r} is not two finite numbers")
            return problems
    if ring[0] != ring[-1]:
        problems.append(f"{where}: ring is not closed")
    return problems


def _geometry_problems(geometry, where: str) -> list[str]:
    if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
        return [f"{where}: geometry must be a Polygon or MultiPolygon"]
    coords = geometry.get("coordinates")
    polygons = [coords] if geometry["type"] == "Polygon" else coords
    if not isinstance(polygons, list) or not polygons:
        return [f"{where}: geometry has no coordinates"]
    problems = []
    for p, rings in enumerate(polygons):
        if not isinstance(rings, list) or not rings:
            problems.append(f"{where}: polygon {p} has no rings")
            continue
        for r, ring in enumerate(rings):
            problems += _ring_problems(ring, f"{where} polygon {p} ring {r}")
    if problems:
        return problems
    geom = shape(geometry)
    if geom.is_empty or not geom.is_valid:
        from shapely.validation import explain_validity

        problems.append(f"{where}: geometry is not valid ({explain_validity(geom)})")
    return problems


def _classification_problems(value, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: classification must be an object with name and color"]
    problems = []
    if not isinstance(value.get("name"), str) or not value["name"]:
        problems.append(f"{where}: classification.name must be a non-empty string")
    color = value.get("color")
    if not (
        isinstance(color, list)
        and len(color) == 3
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
    ):
        problems.append(f"{where}: classification.color must be [r, g, b] integers 0..255, got {color!r}")
    return problems


def _feature_problems(feature, index: int, seen_ids: set[str]) -> list[str]:
    where = f"feature {index}"
    if not isinstance(feature, dict):
        return [f"{where}: not an object"]
    problems = []
    if feature.get("type") != "Feature":
        problems.append(f"{where}: type must be 'Feature'")
    fid = feature.get("id")
    try:
        if not isinstance(fid, str):
            raise ValueError
        uuid.UUID(fid)
    except ValueError:
        problems.append(f"{where}: id {fid!r} is not a UUID string")
    else:
        if fid in seen_ids:
            problems.append(f"{where}: id {fid} is used twice")
        seen_ids.add(fid)
    problems += _geometry_problems(feature.get("geometry"), where)
    props = feature.get("properties")
    if not isinstance(props, dict):
        return problems + [f"{where}: properties must be an object"]
    if props.get("objectType") != "detection":
        problems.append(f"{where}: properties.objectType must be 'detection', got {props.get('objectType')!r}")
    if "type" in props:
        problems.append(f"{where}: properties must not contain 'type'")
    problems += _classification_problems(props.get("classification"), where)
    measurements = props.get("measurements")
    if not isinstance(measurements, dict):
        problems.append(f"{where}: measurements must be a name -> number object")
    else:
        for name, value in measurements.items():
            if not (_is_number(value) and math.isfinite(value)):
                problems.append(f"{where}: measurement {name!r} = {value!r} is not a finite number")
    return problems


def check_qupath_feature_collection(path) -> list[str]:
    """Every way the file at ``path`` breaks the QuPath detection contract (empty list: it complies)."""
    path = Path(path)
    problems = []
    if path.suffix == ".gz" and not (path.name.endswith(".geojson.gz") or path.name.endswith(".json.gz")):
        problems.append(f"{path.name}: QuPath ignores .gz files not named *.geojson.gz or *.json.gz")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return problems + [f"{path.name}: not readable JSON ({exc})"]
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        return problems + ["top level must be a FeatureCollection"]
    features = data.get("features")
    if not isinstance(features, list):
        return problems + ["FeatureCollection.features must be a list"]
    seen: set[str] = set()
    for index, feature in enumerate(features):
        problems += _feature_problems(feature, index, seen)
    return problems
