"""Open a SQLiteStore written by ``wsi-grunet export`` with TIAToolbox and report what it holds (JSON).

Runs inside the TIAToolbox environment. Prints one JSON object: the number of annotations, per
annotation its key, nucleus id, stored area (level-0 px^2), properties and bounds, and the store's own
spatial query over the whole slide.
"""

from __future__ import annotations

import json
import sys

from shapely.geometry import box
from tiatoolbox.annotation.storage import SQLiteStore

from wsi_grunet.interop.tiatoolbox_store import open_store


def main() -> None:
    path, width, height = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = open_store(path)
    assert isinstance(store, SQLiteStore)
    rows = []
    for key, annotation in store.items():
        geom = annotation.geometry
        rows.append(
            {
                "key": key,
                "nucleus_id": annotation.properties["nucleus_id"],
                "area_px": geom.area,
                "bounds": list(geom.bounds),
                "valid": geom.is_valid,
                "type": geom.geom_type,
                "properties": annotation.properties,
            }
        )
    in_slide = len(store.query(box(0, 0, width, height)))
    print(json.dumps({"count": len(store), "in_slide_query": in_slide, "rows": rows}))
    store.close()


if __name__ == "__main__":
    main()
