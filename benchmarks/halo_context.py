"""How much context the network needs: stitched tiles against one pass, for several halos, on real H&E.

A window of the slide is predicted once whole and once in tiles (each tile reads real slide pixels
around its core). The difference is measured only in the window's centre, at least ``--margin``
pixels from its edge, so the window's own edge (white fill in a tile, zero padding in the single pass)
plays no part: what remains comes from the tile borders alone. fp32, no TTA.

    python benchmarks/halo_context.py --slide wsi_grunet/examples/CMU-1-Small-Region.svs \\
        --window 1536 --tiles 1152/64 1152/96 1152/128 --out benchmarks/results/halo_context_cmu1.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from wsi_grunet.geometry import Box
from wsi_grunet.model.checkpoint import resolve_weights
from wsi_grunet.model.predictor import Predictor, predict_image
from wsi_grunet.segment import predict_tiled
from wsi_grunet.slide.reader import SlideReader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, required=True)
    parser.add_argument("--weights", default=None, help="checkpoint; default: the packaged weights")
    parser.add_argument("--window", type=int, default=1536, help="model pixels a side (multiple of 16)")
    parser.add_argument("--origin", type=int, nargs=2, default=(300, 500), help="window's top-left (y x), model px")
    parser.add_argument("--margin", type=int, default=256, help="pixels of the window edge left out")
    parser.add_argument("--tiles", nargs="+", default=["1152/64", "1152/96", "1152/128"], help="TILE/HALO ...")
    parser.add_argument("--threshold", type=float, default=0.5, help="for the count of flipped pixels")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    bundle = resolve_weights(args.weights)
    predictor = Predictor(bundle, "cpu", amp="fp32", tta="none")
    reader = SlideReader(args.slide, bundle.mpp)
    y0, x0 = args.origin
    image = reader.read(Box(y0, x0, y0 + args.window, x0 + args.window))
    single = predict_image(predictor, image)["prob"]
    centre = (slice(args.margin, -args.margin), slice(args.margin, -args.margin))
    rows = []
    for spec in args.tiles:
        tile, halo = (int(v) for v in spec.split("/"))
        start = time.perf_counter()
        tiled = predict_tiled(predictor, image, tile, halo, batch_size=1)["prob"]
        diff = np.abs(tiled - single)[centre]
        flipped = (tiled > args.threshold) != (single > args.threshold)
        rows.append(
            {
                "tile": tile,
                "halo": halo,
                "max_abs_diff": float(diff.max()),
                "p99_9_abs_diff": float(np.quantile(diff, 0.999)),
                "mean_abs_diff": float(diff.mean()),
                "flipped_pixels": int(flipped[centre].sum()),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    report = {
        "slide": str(args.slide),
        "weights": str(bundle.source),
        "window": [y0, x0, args.window],
        "margin": args.margin,
        "compared_pixels": int(single[centre].size),
        "threshold": args.threshold,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
