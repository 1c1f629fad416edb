"""GRU-Net forward passes on CPU per tile shape, with glibc's default allocator or the retained heap.

    python benchmarks/forward_time.py --heap default|retain [--amp bf16] [--layout channels_last|nchw]
        [--layers inference-form|as-trained] [--repeats 2] [--json OUT] 1152x1152 1152x320 512x512 ...

One process per heap mode (the setting cannot be undone in a process). Each shape gets two warm-up
passes (oneDNN picks kernels per shape), then the fastest of ``--repeats`` passes is reported, with
microseconds per model pixel and the process's peak RSS after the shape.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from wsi_grunet.model.checkpoint import resolve_weights
from wsi_grunet.model.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", nargs="+", help="HEIGHTxWIDTH, multiples of 16")
    parser.add_argument("--heap", choices=("default", "retain"), default="retain")
    parser.add_argument("--amp", default="bf16")
    parser.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last")
    parser.add_argument("--layers", choices=("inference-form", "as-trained"), default="inference-form")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    predictor = Predictor(
        resolve_weights(None),
        "cpu",
        amp=args.amp,
        channels_last=args.layout == "channels_last",
        tta="none",
        retain_heap=args.heap == "retain",
        fuse=args.layers == "inference-form",
    )
    rows = []
    for spec in args.shapes:
        height, width = (int(v) for v in spec.lower().split("x"))
        tile = (np.random.default_rng(0).random((1, height, width, 3)) * 255).astype(np.uint8)
        for _ in range(2):
            predictor.predict(tile)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            predictor.predict(tile)
            times.append(time.perf_counter() - start)
        row = {
            "shape": [height, width],
            "seconds": round(min(times), 3),
            "us_per_px": round(min(times) / (height * width) * 1e6, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "heap": args.heap,
        "predictor": predictor.describe(),
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
