"""Outputs of a slide run: nucleus polygons and measurements, QuPath GeoJSON, Parquet table, OME-Zarr, preview."""

from .geojson import QuPathGeoJsonWriter, nucleus_uuid
from .polygons import MEASUREMENTS, NucleusRecord, nuclei_records
from .preview import render_preview
from .table import NucleusTableWriter
from .zarr_store import OmeZarrWriter

__all__ = [
    "MEASUREMENTS",
    "NucleusRecord",
    "NucleusTableWriter",
    "OmeZarrWriter",
    "QuPathGeoJsonWriter",
    "nuclei_records",
    "nucleus_uuid",
    "render_preview",
]
