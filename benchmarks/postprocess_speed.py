"""Per-tile post-processing cost, step by step, on one thread.

Probability maps are realistic: the null model (haematoxylin colour deconvolution) on real H&E images
(MoNuSeg 2018 training images resampled to 0.5 um/px), mirrored into a mosaic of tile size. Each step of
the CPU-worker path is timed per tile (CPU seconds of this process, one thread; wall seconds too) and
reported as ms per tile and model megapixels per second per core.

    python benchmarks/postprocess_speed.py --data ../shared/data --tiles 4 --out result.json
"""

# ruff: noqa: E402  (thread limits must be set before numpy is imported)
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one core: the figure is per core

import argparse
import json
import platform
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import shapely
from PIL import Image

from wsi_grunet.config import DEFAULT_HALO, DEFAULT_TILE_SIZE
from wsi_grunet.geometry import Box
from wsi_grunet.model.null_model import NullModel
from wsi_grunet.outputs.polygons import nuclei_records
from wsi_grunet.ownership import owned_instances
from wsi_grunet.postprocess import PostprocessParams, label_nuclei

MODEL_MPP = 0.5
SOURCE_MPP = 0.25  # MoNuSeg is 40x


def source_images(data: Path) -> list[np.ndarray]:
    """Real H&E images at model resolution (MoNuSeg 2018 training set, 1000 px at 0.25 -> 500 px)."""
    paths = sorted((data / "monuseg2018-train" / "images").glob("*.tif"))
    if not paths:
        sys.exit(f"error: no MoNuSeg images under {data / 'monuseg2018-train' / 'images'}")
    out = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        size = (round(image.width * SOURCE_MPP / MODEL_MPP), round(image.height * SOURCE_MPP / MODEL_MPP))
        out.append(np.asarray(image.resize(size, Image.BILINEAR)))
    return out


def mosaic(images: list[np.ndarray], size: int, start: int) -> np.ndarray:
    """A size x size RGB tile of images placed side by side, every other one mirrored (no seams of
    content jumps larger than at real tissue edges)."""
    tile = np.empty((size, size, 3), np.uint8)
    k = start
    for y in range(0, size, 500):
        for x in range(0, size, 500):
            image = images[k % len(images)]
            if (y // 500) % 2:
                image = image[::-1]
            if (x // 500) % 2:
                image = image[:, ::-1]
            h, w = min(500, size - y), min(500, size - x)
            tile[y : y + h, x : x + w] = image[:h, :w]
            k += 1
    return tile


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, time.process_time() - cpu, time.perf_counter() - wall


def serialise(records) -> int:
    """What a worker writes per nucleus (one JSON line, WKT polygon), as in tile_work.process_tile."""
    total = 0
    for record in records:
        row = {f.name: getattr(record, f.name) for f in fields(record)}
        row["polygon"] = shapely.to_wkt(record.polygon, rounding_precision=3)
        total += len(json.dumps(row))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE)
    parser.add_argument("--halo", type=int, default=DEFAULT_HALO)
    parser.add_argument("--tiles", type=int, default=4)
    # The null model's own post-processing; the packaged weights' is --threshold 0.3 --relief-levels 3.
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--relief-levels", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    images = source_images(args.data)
    model = NullModel(MODEL_MPP)
    params = PostprocessParams(
        threshold=args.threshold, min_area_um2=4.0, marker_min_distance_um=1.5, relief_levels=args.relief_levels
    )
    size, halo = args.tile_size, args.halo
    # The tile is the whole slide: a mosaic has no tissue beyond it, so its borders are slide edges.
    read = Box(0, 0, size, size)
    core = Box(halo, halo, size - halo, size - halo)
    slide_shape = (size, size)
    steps = ["null_model", "label_nuclei", "owned_instances", "nuclei_records", "serialise"]
    cpu = {s: [] for s in steps}
    wall = {s: [] for s in steps}
    nuclei = []
    for t in range(args.tiles):
        rgb = mosaic(images, size, start=7 * t)
        out, c, w = timed(model.predict, rgb[None])
        prob = out["prob"][0]
        cpu["null_model"].append(c), wall["null_model"].append(w)
        labels, c, w = timed(label_nuclei, prob, MODEL_MPP, params)
        cpu["label_nuclei"].append(c), wall["label_nuclei"].append(w)
        owned, c, w = timed(owned_instances, labels, read, core, slide_shape, halo, mpp=MODEL_MPP)
        cpu["owned_instances"].append(c), wall["owned_instances"].append(w)
        try:
            records, c, w = timed(
                nuclei_records, owned.labels, prob, (read.y0, read.x0), MODEL_MPP, 2.0, threshold=params.threshold
            )
        except TypeError:  # an older nuclei_records without the threshold argument
            records, c, w = timed(nuclei_records, owned.labels, prob, (read.y0, read.x0), MODEL_MPP, 2.0)
        cpu["nuclei_records"].append(c), wall["nuclei_records"].append(w)
        _, c, w = timed(serialise, records)
        cpu["serialise"].append(c), wall["serialise"].append(w)
        nuclei.append(len(records))
        print(
            f"tile {t}: {len(records)} nuclei, " + ", ".join(f"{s} {cpu[s][-1] * 1e3:.0f} ms" for s in steps),
            flush=True,
        )

    mpx = size * size / 1e6
    post = ["label_nuclei", "owned_instances", "nuclei_records", "serialise"]
    summary = {
        s: {
            "cpu_ms_per_tile": round(1e3 * float(np.median(cpu[s])), 1),
            "wall_ms_per_tile": round(1e3 * float(np.median(wall[s])), 1),
            "mpx_per_s_per_core": round(mpx / float(np.median(cpu[s])), 2),
        }
        for s in steps
    }
    post_cpu = float(np.median(np.sum([cpu[s] for s in post], axis=0)))
    summary["post_process_total"] = {
        "cpu_ms_per_tile": round(1e3 * post_cpu, 1),
        "mpx_per_s_per_core": round(mpx / post_cpu, 2),
    }
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared), one thread",
        "tile_size": size,
        "halo": halo,
        "tiles": args.tiles,
        "nuclei_per_tile": nuclei,
        "params": params.to_dict(),
        "steps": summary,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
