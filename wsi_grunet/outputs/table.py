"""Streamed per-nucleus table (``nuclei.parquet``): one row per nucleus, written in row groups.

Columns: ``id`` (int64, slide-wide nucleus id), centroid and half-open bounding box in level-0 pixels, then
the measurements of :data:`wsi_grunet.outputs.polygons.MEASUREMENTS` in micrometres or unitless. Each
column's unit is stored in its Arrow field metadata under ``unit``. Rows are buffered and flushed every
``rows_per_group`` rows, so memory does not grow with the nucleus count. The file appears under its final
name only when the writer closes without error; a table with zero rows is still a valid file with the schema.

Files are opened by Python and handed to Arrow as open files: Arrow takes a path as UTF-8 text, which a
folder name that is not UTF-8 (a share mounted from another system) is not.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from ..display import display_text
from ..errors import OutputError
from .polygons import MEASUREMENTS, NucleusRecord

_UNITS = {
    "area_um2": "um^2",
    "perimeter_um": "um",
    "major_axis_um": "um",
    "minor_axis_um": "um",
}
POSITION_COLUMNS = ("centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")
ROWS_PER_GROUP = 50_000
COLUMNS = ("id",) + POSITION_COLUMNS + tuple(attr for attr, _ in MEASUREMENTS)


def nucleus_schema() -> pa.Schema:
    """Arrow schema of the nucleus table, with units in field metadata."""
    fields = [pa.field("id", pa.int64(), nullable=False, metadata={"unit": "slide-wide nucleus id"})]
    fields += [pa.field(name, pa.float64(), False, metadata={"unit": "level-0 px"}) for name in POSITION_COLUMNS]
    fields += [
        pa.field(attr, pa.float64(), False, metadata={"unit": _UNITS.get(attr, "1")}) for attr, _ in MEASUREMENTS
    ]
    return pa.schema(fields, metadata={"frame": "level-0 pixels, x right, y down, pixel (0,0) covers [0,1)^2"})


class NucleusTableWriter:
    """Context manager streaming :class:`NucleusRecord` rows to a Parquet file."""

    def __init__(
        self, path: str | os.PathLike, rows_per_group: int = ROWS_PER_GROUP, compression: str = "zstd"
    ) -> None:
        if rows_per_group < 1:
            raise ValueError(f"rows_per_group must be >= 1, got {rows_per_group}")
        self.path = Path(path)
        self.rows_per_group = rows_per_group
        self.compression = compression
        self.schema = nucleus_schema()
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._writer: pq.ParquetWriter | None = None
        self._file: BinaryIO | None = None
        self._buffer: dict[str, list] = {name: [] for name in COLUMNS}
        self._count = 0

    @property
    def count(self) -> int:
        """Number of rows written so far (flushed or buffered)."""
        return self._count

    def __enter__(self) -> NucleusTableWriter:
        try:
            self._file = open(self._partial, "wb")  # noqa: SIM115 - closed by close() or __exit__
            self._writer = pq.ParquetWriter(self._file, self.schema, compression=self.compression)
        except OSError as exc:
            self._close_file()
            raise OutputError(f"{display_text(self.path)}: cannot write nucleus table ({exc})") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is None:
            return
        if exc_type is None:
            self.close()
        else:
            self._writer.close()
            self._writer = None
            self._close_file()
            self._partial.unlink(missing_ok=True)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, record: NucleusRecord, nucleus_id: int) -> None:
        """Append one nucleus with its slide-wide id."""
        if self._writer is None:
            raise OutputError(f"{display_text(self.path)}: writer is not open (use it as a context manager)")
        self._buffer["id"].append(int(nucleus_id))
        for name in COLUMNS[1:]:
            self._buffer[name].append(float(getattr(record, name)))
        self._count += 1
        if len(self._buffer["id"]) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer["id"]:
            return
        if self._writer is None:
            raise OutputError(f"{display_text(self.path)}: writer is not open (use it as a context manager)")
        batch = pa.RecordBatch.from_pydict(self._buffer, schema=self.schema)
        try:
            self._writer.write_batch(batch, row_group_size=self.rows_per_group)
        except OSError as exc:
            raise OutputError(f"{display_text(self.path)}: cannot write nucleus table ({exc})") from None
        self._buffer = {name: [] for name in COLUMNS}

    def close(self) -> None:
        """Flush buffered rows, finish the file and move it to its final name."""
        if self._writer is None:
            return
        try:
            self._flush()
            self._writer.close()
            self._close_file()
            os.replace(self._partial, self.path)
        except OSError as exc:
            self._close_file()
            self._partial.unlink(missing_ok=True)
            raise OutputError(f"{display_text(self.path)}: cannot write nucleus table ({exc})") from None
        finally:
            self._writer = None


def assemble_table(path: str | os.PathLike, pieces: Iterable[Path], rows_per_group: int = ROWS_PER_GROUP) -> None:
    """Join Parquet pieces written by :class:`NucleusTableWriter`, in order, into one table file.

    Pieces are read one at a time and written in row groups of about ``rows_per_group`` rows; the file
    appears under its final name only when complete.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as out, pq.ParquetWriter(out, nucleus_schema(), compression="zstd") as writer:
            batch, rows = [], 0
            for piece in pieces:
                with open(piece, "rb") as handle:
                    table = pq.read_table(handle)
                batch.append(table)
                rows += table.num_rows
                if rows >= rows_per_group:
                    writer.write_table(pa.concat_tables(batch))
                    batch, rows = [], 0
            if batch:
                writer.write_table(pa.concat_tables(batch))
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(f"{display_text(path)}: cannot write the nucleus table ({exc.strerror or exc})") from None
