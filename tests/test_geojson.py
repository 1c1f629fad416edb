"""Streamed QuPath GeoJSON writer, checked against the QuPath import contract (tests/qupath_contract.py)."""

from __future__ import annotations

import copy
import dataclasses
import gzip
import json
import re
import uuid

import geojson
import numpy as np
import pytest
from shapely.geometry import shape
from skimage.draw import disk

from wsi_grunet.errors import OutputError
from wsi_grunet.outputs.geojson import QuPathGeoJsonWriter
from wsi_grunet.outputs.polygons import MEASUREMENTS, nuclei_records

from qupath_contract import check_qupath_feature_collection


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(3)
    labels = np.zeros((96, 96), np.int32)
    k = 0
    for cy in range(10, 96, 20):
        for cx in range(10, 96, 20):
            k += 1
            rr, cc = disk((cy + rng.uniform(-2, 2), cx + rng.uniform(-2, 2)), rng.uniform(3, 8), shape=labels.shape)
            labels[rr, cc] = k
    rr, cc = disk((50, 50), 2)
    labels[rr, cc] = 0  # one nucleus with a hole
    prob = rng.random(labels.shape).astype(np.float32)
    # A non-integer level-0 scale puts vertices off the 0.01 grid, so rounding is exercised.
    return nuclei_records(labels, prob, (517, 1033), model_mpp=0.5, level0_per_model=0.5 / 0.2433)


def write_file(path, records, slide="slide-A", first_id=1, **kwargs):
    with QuPathGeoJsonWriter(path, slide, **kwargs) as writer:
        for offset, rec in enumerate(records):
            writer.write(rec, first_id + offset)
    return writer


def load(path):
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def test_written_file_meets_the_qupath_contract(tmp_path, records):
    path = tmp_path / "nuclei.geojson.gz"
    writer = write_file(path, records)
    assert writer.count == len(records) == 25
    assert check_qupath_feature_collection(path) == []
    data = load(path)
    assert len(data["features"]) == len(records)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        collection = geojson.load(fh)
    assert collection.is_valid, collection.errors()
    assert len(collection["features"]) == len(records)


def test_features_carry_geometry_classification_and_measurements(tmp_path, records):
    path = tmp_path / "nuclei.geojson.gz"
    write_file(path, records, class_name="Tumor nucleus", class_color=(10, 20, 30), first_id=100)
    for offset, (rec, feature) in enumerate(zip(records, load(path)["features"])):
        props = feature["properties"]
        assert props["objectType"] == "detection" and "type" not in props
        assert props["classification"] == {"name": "Tumor nucleus", "color": [10, 20, 30]}
        expected = {label: getattr(rec, attr) for attr, label in MEASUREMENTS}
        expected["Nucleus id"] = 100 + offset
        assert props["measurements"] == pytest.approx(expected, abs=1e-4)
        geom = shape(feature["geometry"])
        # Written geometry is the record's polygon up to QuPath's 0.01 px grid.
        assert geom.symmetric_difference(rec.polygon).area < 0.01 * rec.polygon.length
        assert len(feature["geometry"]["coordinates"]) == 1 + len(rec.polygon.interiors)
        assert geom.exterior.is_ccw and all(not ring.is_ccw for ring in geom.interiors)
    assert any(len(f["geometry"]["coordinates"]) == 2 for f in load(path)["features"])  # the hole survived


def test_coordinates_have_at_most_two_decimals(tmp_path, records):
    path = tmp_path / "nuclei.geojson.gz"
    write_file(path, records)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    coordinate_text = re.findall(r'"coordinates":(\[.*?\]\]\])', text)
    numbers = re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", " ".join(coordinate_text))
    assert numbers and all(len(n.split(".")[1]) <= 2 for n in numbers if "." in n)
    assert any("." in n for n in numbers)


def test_ids_are_stable_uuids_per_slide(tmp_path, records):
    a, b, c = (tmp_path / f"{n}.geojson.gz" for n in "abc")
    write_file(a, records[:5], slide="slide-A")
    write_file(b, records[:5], slide="slide-A")
    write_file(c, records[:5], slide="slide-B")
    ids_a = [f["id"] for f in load(a)["features"]]
    assert ids_a == [f["id"] for f in load(b)["features"]]
    assert not set(ids_a) & {f["id"] for f in load(c)["features"]}
    assert len(set(ids_a)) == 5 and all(uuid.UUID(i).version == 5 for i in ids_a)


def test_zero_features_is_still_a_valid_collection(tmp_path):
    path = tmp_path / "nuclei.geojson.gz"
    assert write_file(path, []).count == 0
    assert load(path) == {"type": "FeatureCollection", "features": []}
    assert check_qupath_feature_collection(path) == []


def test_file_appears_only_after_a_clean_close(tmp_path, records):
    path = tmp_path / "nuclei.geojson.gz"
    with pytest.raises(RuntimeError):
        with QuPathGeoJsonWriter(path, "s") as writer:
            writer.write(records[0], 1)
            assert not path.exists()
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_bad_outputs_are_refused(tmp_path, records):
    with pytest.raises(OutputError, match=r"nuclei\.gz.*\.geojson\.gz"):
        QuPathGeoJsonWriter(tmp_path / "nuclei.gz", "s")
    with pytest.raises(OutputError, match="colour"):
        QuPathGeoJsonWriter(tmp_path / "n.geojson.gz", "s", class_color=(0, 300, 0))
    with pytest.raises(OutputError, match="missing"):
        with QuPathGeoJsonWriter(tmp_path / "missing" / "n.geojson.gz", "s"):
            pass
    bad = dataclasses.replace(records[0], circularity=float("nan"))
    with pytest.raises(OutputError, match="Circularity"):
        with QuPathGeoJsonWriter(tmp_path / "n.geojson.gz", "s") as writer:
            writer.write(bad, 1)


# --- the checker itself must catch each broken rule -------------------------------------------------------

GOOD_FEATURE = {
    "type": "Feature",
    "id": "0f8fad5b-d9cb-469f-a165-70867728950e",
    "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]},
    "properties": {
        "objectType": "detection",
        "classification": {"name": "Nucleus", "color": [255, 200, 0]},
        "measurements": {"Area um^2": 4.0},
    },
}


def _set(path, value):
    def mutate(feature):
        node = feature
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return mutate


_DELETE = object()
BREAKAGES = {
    "not a Feature": (_set(["type"], "Point"), "type must be 'Feature'"),
    "non-UUID id": (_set(["id"], "nucleus-1"), "not a UUID"),
    "missing id": (_set(["id"], _DELETE), "not a UUID"),
    "annotation": (_set(["properties", "objectType"], "annotation"), "objectType"),
    "type in properties": (_set(["properties", "type"], "detection"), "must not contain 'type'"),
    "class without colour": (_set(["properties", "classification"], {"name": "Nucleus"}), "color"),
    "class as string": (_set(["properties", "classification"], "Nucleus"), "classification"),
    "colour out of range": (_set(["properties", "classification", "color"], [0, 256, 0]), "color"),
    "float colour": (_set(["properties", "classification", "color"], [0.5, 1, 0]), "color"),
    "measurement list": (_set(["properties", "measurements"], [{"name": "a", "value": 1}]), "measurements"),
    "string measurement": (_set(["properties", "measurements", "x"], "1.0"), "finite"),
    "nan measurement": (_set(["properties", "measurements", "x"], float("nan")), "finite"),
    "point geometry": (_set(["geometry"], {"type": "Point", "coordinates": [1, 2]}), "Polygon"),
    "open ring": (_set(["geometry", "coordinates"], [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 1]]]), "not closed"),
    "short ring": (_set(["geometry", "coordinates"], [[[0, 0], [4, 0], [0, 0]]]), "at least 4"),
    "bow tie": (_set(["geometry", "coordinates"], [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]), "not valid"),
    "infinite coordinate": (_set(["geometry", "coordinates"], [[[0, 0], [1e400, 0], [4, 4], [0, 0]]]), "finite"),
}


def write_raw(path, features):
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump({"type": "FeatureCollection", "features": features}, fh)


def test_checker_accepts_the_minimal_detection(tmp_path):
    write_raw(tmp_path / "ok.geojson.gz", [GOOD_FEATURE])
    assert check_qupath_feature_collection(tmp_path / "ok.geojson.gz") == []


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_checker_catches_each_broken_rule(tmp_path, name):
    mutate, message = BREAKAGES[name]
    feature = copy.deepcopy(GOOD_FEATURE)
    mutate(feature)
    path = tmp_path / "broken.geojson.gz"
    write_raw(path, [feature])
    problems = check_qupath_feature_collection(path)
    assert problems, name
    assert any(message in p for p in problems), problems


def test_checker_catches_file_level_problems(tmp_path):
    write_raw(tmp_path / "dup.geojson.gz", [GOOD_FEATURE, GOOD_FEATURE])
    assert any("used twice" in p for p in check_qupath_feature_collection(tmp_path / "dup.geojson.gz"))
    write_raw(tmp_path / "slide.gz", [GOOD_FEATURE])
    assert any("ignores" in p for p in check_qupath_feature_collection(tmp_path / "slide.gz"))
    with gzip.open(tmp_path / "array.geojson.gz", "wt") as fh:
        json.dump({"type": "GeometryCollection", "geometries": []}, fh)
    assert check_qupath_feature_collection(tmp_path / "array.geojson.gz") == ["top level must be a FeatureCollection"]
    with gzip.open(tmp_path / "cut.geojson.gz", "wt") as fh:
        fh.write('{"type":"FeatureCollection","features":[')
    assert any("not readable JSON" in p for p in check_qupath_feature_collection(tmp_path / "cut.geojson.gz"))
