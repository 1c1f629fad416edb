"""Stitched nuclei against one pass over the whole slide, per post-processing setting, on real H&E.

The slide's probability is predicted once in a single pass over the whole slide (fp32, no TTA), and
the slide is run through the pipeline in tiles (``wsi-grunet run``, fp32, no TTA) once per setting.
For each setting the pipeline's label image is compared with the single pass labelled by the same
post-processing: a nucleus is *kept* when the other side has a nucleus with exactly its pixels.
Nuclei with a pixel within ``--edge`` pixels of the slide's edge are left out: there a tile (white
glass beyond the edge) and the single pass (white padding to a multiple of 16) see different things.
What differs elsewhere comes from the tile borders: groups of touching nuclei wider than the halo
(``nuclei_in_cut_groups`` in report.json) and float rounding at pixels next to the threshold.

    python benchmarks/border_instances.py --slide wsi_grunet/examples/CMU-1-Small-Region.svs \\
        --settings 0.5:1 0.3:3 --out benchmarks/results/border_instances_cmu1.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from wsi_grunet.geometry import Box
from wsi_grunet.model.checkpoint import resolve_weights
from wsi_grunet.model.predictor import Predictor, predict_image
from wsi_grunet.postprocess import PostprocessParams, label_nuclei
from wsi_grunet.slide.reader import SlideReader


def pixel_sets(labels: np.ndarray, edge: int) -> set[bytes]:
    """Each nucleus away from the edge as the bytes of its sorted flat pixel indices (label-free)."""
    height, width = labels.shape
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    ids, starts = np.unique(flat[order], return_index=True)
    bounds = np.append(starts, flat.size)
    rows, cols = np.divmod(order, width)
    out = set()
    for k, label in enumerate(ids):
        if label == 0:
            continue
        members = slice(bounds[k], bounds[k + 1])
        r, c = rows[members], cols[members]
        if r.min() < edge or c.min() < edge or r.max() >= height - edge or c.max() >= width - edge:
            continue
        out.add(np.sort(order[members]).tobytes())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, required=True)
    parser.add_argument("--weights", default=None, help="checkpoint; default: the packaged weights")
    parser.add_argument("--settings", nargs="+", default=["0.5:1", "0.3:3"], help="THRESHOLD:RELIEF_LEVELS ...")
    parser.add_argument("--edge", type=int, default=192, help="model pixels at the slide's edge left out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    bundle = resolve_weights(args.weights)
    stored = PostprocessParams.from_dict(bundle.metadata.get("postprocess") or {})
    reader = SlideReader(args.slide, bundle.mpp)
    height, width = reader.model_shape
    start = time.monotonic()
    single = predict_image(Predictor(bundle, "cpu", amp="fp32", tta="none"), reader.read(Box(0, 0, height, width)))
    single_s = time.monotonic() - start
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            threshold, levels = setting.split(":")
            params = stored.with_overrides(threshold=float(threshold), relief_levels=float(levels))
            out = Path(tmp) / setting.replace(":", "_")
            command = [sys.executable, "-m", "wsi_grunet.cli", "run", str(args.slide), "--out", str(out), "--quiet"]
            command += ["--outputs", "zarr", "--set", "model.amp=fp32", "model.tta=none"]
            command += [f"postprocess.{k}={int(v) if k == 'relief_levels' else v}" for k, v in params.to_dict().items()]
            if args.weights:
                command += ["--weights", args.weights]
            subprocess.run(command, check=True)
            report = json.loads(next(out.rglob("report.json")).read_text())
            stitched = np.asarray(zarr.open_array(next(out.rglob("labels/nuclei/0")), mode="r")[:])
            one_pass = label_nuclei(single["prob"], bundle.mpp, params)
            a, b = pixel_sets(stitched, args.edge), pixel_sets(one_pass, args.edge)
            near = np.abs(single["prob"] - params.threshold) < 1e-3
            rows.append(
                {
                    "threshold": params.threshold,
                    "relief_levels": params.relief_levels,
                    "nuclei_stitched": int(stitched.max()),
                    "nuclei_in_cut_groups": report["counts"]["nuclei_in_cut_groups"],
                    "compared_stitched": len(a),
                    "compared_single_pass": len(b),
                    "stitched_not_in_single_pass": len(a - b),
                    "single_pass_not_stitched": len(b - a),
                    "pixels_within_1e-3_of_threshold": int(near.sum()),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "slide": str(args.slide),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "model_shape": [height, width],
        "edge": args.edge,
        "single_pass_s": single_s,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
