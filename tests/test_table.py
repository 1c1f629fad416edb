"""Streamed Parquet nucleus table (wsi_grunet.outputs.table)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from skimage.draw import disk

from wsi_grunet.errors import OutputError
from wsi_grunet.outputs.polygons import MEASUREMENTS, nuclei_records
from wsi_grunet.outputs.table import NucleusTableWriter

EXPECTED_COLUMNS = [
    "id",
    "centroid_x",
    "centroid_y",
    "bbox_x0",
    "bbox_y0",
    "bbox_x1",
    "bbox_y1",
    "area_um2",
    "perimeter_um",
    "circularity",
    "mean_probability",
]


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(7)
    labels = np.zeros((120, 120), np.int32)
    k = 0
    for cy in range(8, 120, 24):
        for cx in range(8, 120, 24):
            k += 1
            rr, cc = disk((cy, cx), rng.uniform(3, 7), shape=labels.shape)
            labels[rr, cc] = k
    return nuclei_records(labels, rng.random(labels.shape).astype(np.float32), (40, 60), 0.5, 2.0)


def test_rows_round_trip_in_row_groups(tmp_path, records):
    path = tmp_path / "nuclei.parquet"
    with NucleusTableWriter(path, rows_per_group=7) as writer:
        for i, rec in enumerate(records):
            writer.write(rec, 1000 + i)
    assert writer.count == len(records) == 25
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 25 and meta.num_row_groups == 4  # 7 + 7 + 7 + 4
    table = pq.read_table(path)
    assert table.column_names[: len(EXPECTED_COLUMNS)] == EXPECTED_COLUMNS
    assert {a for a, _ in MEASUREMENTS} <= set(table.column_names)
    assert table.schema.field("id").type == pa.int64()
    rows = table.to_pylist()
    for i, (rec, row) in enumerate(zip(records, rows)):
        assert row["id"] == 1000 + i
        for name in table.column_names[1:]:
            assert row[name] == getattr(rec, name)


def test_units_are_recorded(tmp_path, records):
    path = tmp_path / "nuclei.parquet"
    with NucleusTableWriter(path) as writer:
        writer.write(records[0], 1)
    schema = pq.read_schema(path)
    assert schema.field("centroid_x").metadata[b"unit"] == b"level-0 px"
    assert schema.field("area_um2").metadata[b"unit"] == b"um^2"
    assert schema.field("circularity").metadata[b"unit"] == b"1"


def test_zero_rows_give_a_valid_file_with_schema(tmp_path):
    path = tmp_path / "nuclei.parquet"
    with NucleusTableWriter(path):
        pass
    table = pq.read_table(path)
    assert table.num_rows == 0
    assert table.column_names[: len(EXPECTED_COLUMNS)] == EXPECTED_COLUMNS


def test_failure_leaves_no_file(tmp_path, records):
    path = tmp_path / "nuclei.parquet"
    with pytest.raises(RuntimeError):
        with NucleusTableWriter(path, rows_per_group=2) as writer:
            for i, rec in enumerate(records[:5]):
                writer.write(rec, i)
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_location_is_reported(tmp_path):
    with pytest.raises(OutputError, match="missing"):
        with NucleusTableWriter(tmp_path / "missing" / "nuclei.parquet"):
            pass
    with pytest.raises(ValueError):
        NucleusTableWriter(tmp_path / "nuclei.parquet", rows_per_group=0)
