"""Re-tune the post-processing of a checkpoint on the validation split (CPU is enough).

Predicts the validation images once (cached as compressed npz), scores a grid of post-processing
parameters by mean AJI over the MoNuSeg and CPM-15 validation images, and prints the best. With
--write the best values are stored in the checkpoint's JSON (the tensor file, and its hash, are
unchanged).

Usage: python benchmarks/tune_postprocess.py --data DIR... [--weights CKPT] [--cache DIR] [--write]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from wsi_grunet.config import load_train_config
from wsi_grunet.model.checkpoint import checkpoint_paths, packaged_weights, resolve_weights
from wsi_grunet.model.predictor import Predictor
from wsi_grunet.segment import predict_tiled
from wsi_grunet.train.loop import load_training_data
from wsi_grunet.train.tune import ValidationItem, tune_postprocess


def validation_items(weights: str | None, folders: list[str], cache: Path) -> tuple[float, list[ValidationItem]]:
    bundle = resolve_weights(weights)
    data = load_training_data([Path(f) for f in folders], load_train_config(None, [{"mpp": bundle.mpp}]))
    predictor = Predictor(bundle, "auto")
    cache.mkdir(parents=True, exist_ok=True)
    items = []
    for sample in data.val:
        path = cache / f"{sample.dataset}__{sample.name}.npz"
        if path.exists():
            with np.load(path) as stored:
                maps = {k: stored[k].astype(np.float32) / 65535 for k in stored.files}
        else:
            maps = predict_tiled(predictor, sample.image)
            np.savez_compressed(path, **{k: np.round(v * 65535).astype(np.uint16) for k, v in maps.items()})
        items.append(ValidationItem(sample.name, sample.dataset, sample.labels, maps["prob"], maps.get("distance")))
    return bundle.mpp, items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--weights")
    parser.add_argument("--cache", default=".scratch/val_probs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    mpp, items = validation_items(args.weights, args.data, Path(args.cache))
    with_distance = items[0].distance is not None
    second = (
        [{"marker_threshold": m} for m in (0.3, 0.4, 0.5, 0.6)]
        if with_distance
        else [{"marker_min_distance_um": d} for d in (0.75, 1.0, 1.5, 2.0)]
    )
    grid = [
        {"threshold": t, "min_area_um2": a, **s}
        for t, a, s in itertools.product((0.5, 0.6, 0.7, 0.8), (1.0, 2.0, 4.0), second)
    ]
    tuned = tune_postprocess(items, mpp, grid, workers=args.workers)
    best = tuned["best"]
    for row in sorted(tuned["grid"], key=lambda r: -r["summary"]["objective"]["aji"])[:5]:
        print(
            json.dumps(row["params"]),
            round(row["summary"]["objective"]["aji"], 4),
            round(row["summary"]["objective"]["pq"], 4),
        )
    print(json.dumps({"best": best["params"], "summary": best["summary"]}, indent=1))
    if args.write:
        _, json_path = checkpoint_paths(args.weights or packaged_weights())
        meta = json.loads(json_path.read_text())
        meta["postprocess"] = best["params"]
        meta["threshold"] = best["params"]["threshold"]
        meta.setdefault("validation", {})["summary"] = best["summary"]
        json_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
        print(f"wrote post-processing parameters to {json_path}")


if __name__ == "__main__":
    main()
