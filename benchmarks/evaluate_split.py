"""Tune post-processing on the "select" validation images and score a checkpoint on the "report" ones.

The split is defined in configs/datasets.yaml (``report`` names; the other validation images are
"select"). Checkpoints are chosen and post-processing is tuned on select images only; the numbers
this script prints for ``--split report`` come from images that neither training, selection nor
tuning saw.

Protocols (``--protocol``, comma-separated):
  model        nuclei found at the model's resolution (0.5 um/px) against the truth resampled to it
               (nearest neighbour): the protocol of checkpoint selection during training.
  input        nuclei found at each image's own resolution from the resampled probability map
               (``segment.label_maps(at="input")``) against the original truth.
  input+<tta>  as ``input`` with test-time augmentation (flips, rot4, dihedral) in the predictor.

Tuning (``--tune``, on the select images, under ``--tune-protocol``, default input+flips): the
foreground threshold by the mean foreground Dice over all select images, then the instance
parameters (marker spacing, relief levels, minimum area) by the mean AJI over the select images of
MoNuSeg and CPM-15 (``tune.tune_threshold_then_instances``).

Usage:
  python benchmarks/evaluate_split.py --data DIR... --weights CKPT|packaged --tune [--write-params]
  python benchmarks/evaluate_split.py --data DIR... --weights CKPT|packaged --split report \\
      --protocol model,input,input+flips [--params-from JSON] --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from wsi_grunet.config import load_train_config
from wsi_grunet.evaluate.metrics import pair_counts
from wsi_grunet.model.checkpoint import checkpoint_paths, load_checkpoint, packaged_weights
from wsi_grunet.model.predictor import Predictor
from wsi_grunet.postprocess import PostprocessParams, label_nuclei
from wsi_grunet.segment import predict_tiled, resize_map
from wsi_grunet.train.data import dataset_spec, read_labels
from wsi_grunet.train.loop import load_training_data
from wsi_grunet.train.tune import ValidationItem, summarise, tune_threshold_then_instances

METRICS = ("dice", "iou", "soft_dice", "aji", "aji_plus", "dq", "sq", "pq")


def weights_path(text: str) -> Path:
    path = packaged_weights() if text == "packaged" else Path(text)
    if path is None:
        raise SystemExit("--weights packaged: this installation has no packaged weights")
    return checkpoint_paths(path)[0]


def model_maps(predictor: Predictor, image: np.ndarray, cache: Path | None) -> dict[str, np.ndarray]:
    """Maps at model resolution, cached as 16-bit npz (keyed by the caller)."""
    if cache is not None and cache.exists():
        with np.load(cache) as stored:
            return {k: stored[k].astype(np.float32) / 65535 for k in stored.files}
    maps = predict_tiled(predictor, image)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + ".partial.npz")
        np.savez_compressed(tmp, **{k: np.round(v * 65535).astype(np.uint16) for k, v in maps.items()})
        os.replace(tmp, cache)
    return maps


def protocol_items(
    args: argparse.Namespace, bundle: Any, protocol: str, samples: list, cache_root: Path
) -> list[ValidationItem]:
    """Truth and maps of each image at the resolution the protocol finds nuclei at."""
    tta = protocol.split("+", 1)[1] if "+" in protocol else "none"
    at = protocol.split("+", 1)[0]
    predictor = Predictor(bundle, "cpu", tta=tta)
    items = []
    for s in samples:
        maps = model_maps(predictor, s.image, cache_root / f"{bundle.sha256[:12]}_{tta}" / f"{s.dataset}__{s.name}.npz")
        if at == "model":
            items.append(ValidationItem(s.name, s.dataset, s.labels, maps["prob"], maps.get("distance"), bundle.mpp))
            continue
        folder = next(Path(d) for d in args.data if Path(d).name == s.dataset)
        spec = dataset_spec(folder)
        label_path = next(p for p in (folder / spec.labels_dir).iterdir() if p.stem == s.name)
        truth = read_labels(label_path)
        # label_maps(at="input"): the maps resampled to the image, nuclei found there
        resized = {k: resize_map(v, truth.shape) for k, v in maps.items()}
        image_mpp = spec.mpp_per_image.get(s.name, spec.mpp)
        items.append(ValidationItem(s.name, s.dataset, truth, resized["prob"], resized.get("distance"), image_mpp))
    return items


def evaluate(
    args: argparse.Namespace, bundle: Any, params: PostprocessParams, protocol: str, samples: list, cache_root: Path
) -> dict[str, Any]:
    start = time.monotonic()
    per_image: dict[str, dict[str, Any]] = {}
    for item in protocol_items(args, bundle, protocol, samples, cache_root):
        labels = label_nuclei(item.prob, item.mpp, params, item.distance)
        counts = pair_counts(item.truth, labels, item.prob, params.threshold)
        per_image[item.name] = {"dataset": item.dataset, **{k: float(v) for k, v in counts.metrics().items()}}
    return {
        "protocol": protocol,
        "tta": protocol.split("+", 1)[1] if "+" in protocol else "none",
        "labels_at": protocol.split("+", 1)[0],
        "seconds": time.monotonic() - start,
        "summary": summarise(per_image),
        "images": per_image,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="dataset folders (names as in configs/datasets.yaml)")
    parser.add_argument("--weights", required=True, help="checkpoint path or 'packaged'")
    parser.add_argument("--split", choices=("select", "report"), default="report")
    parser.add_argument("--tune", action="store_true", help="grid-search post-processing on the select images")
    parser.add_argument("--write-params", action="store_true", help="store the tuned values in the checkpoint JSON")
    parser.add_argument("--params-from", help="JSON written by --tune: use its best parameters")
    parser.add_argument("--protocol", default="model,input")
    parser.add_argument(
        "--tune-protocol", default="input+flips", help="protocol the tuning scores (default input+flips)"
    )
    parser.add_argument("--workers", type=int, default=2, help="processes for the tuning grid")
    parser.add_argument("--cache", default=".scratch/eval_maps")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()

    tensor_path = weights_path(args.weights)
    bundle = load_checkpoint(tensor_path)
    data = load_training_data([Path(d) for d in args.data], load_train_config(None, [{"mpp": bundle.mpp}]))
    cache_root = Path(args.cache)
    result: dict[str, Any] = {
        "weights": str(tensor_path),
        "sha256": bundle.sha256,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
    }
    stored = PostprocessParams.from_dict(bundle.metadata.get("postprocess") or {})
    if args.tune:
        # The threshold by foreground Dice over all select images, then the instance parameters by
        # AJI over the select images whose labels separate touching nuclei (tune.INSTANCE_OBJECTIVE_EXCLUDES).
        items = protocol_items(args, bundle, args.tune_protocol, data.select, cache_root)
        tuned = tune_threshold_then_instances(items, bundle.mpp, stored, workers=args.workers)
        best = tuned["best"]
        result.update(
            split="select",
            tuned={
                "protocol": args.tune_protocol,
                "params": best["params"],
                "summary": best["summary"],
                "thresholds": tuned["thresholds"],
                "images": [f"{i.dataset}/{i.name}" for i in items],
                "grid": tuned["grid"],
            },
        )
        print(json.dumps({"best_params": best["params"], "select_objective": best["summary"]["objective"]}))
        if args.write_params:
            json_path = checkpoint_paths(tensor_path)[1]
            meta = json.loads(json_path.read_text())
            meta["postprocess"] = best["params"]
            meta["threshold"] = best["params"]["threshold"]
            meta.setdefault("training", {})["postprocess_tuning"] = {
                "split": "select",
                "images": result["tuned"]["images"],
                "protocol": args.tune_protocol,
                "result_file": args.out,
                "objective": "threshold: mean foreground Dice (all select images); the rest: mean AJI (MoNuSeg + CPM-15)",
                "summary": best["summary"],
            }
            tmp = json_path.with_name(json_path.name + ".tmp")
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, json_path)
    else:
        params = stored
        if args.params_from:
            params = PostprocessParams.from_dict(json.loads(Path(args.params_from).read_text())["tuned"]["params"])
        samples = data.select if args.split == "select" else data.report
        result.update(
            split=args.split,
            params=params.to_dict(),
            images=[f"{s.dataset}/{s.name}" for s in samples],
            protocols=[evaluate(args, bundle, params, p, samples, cache_root) for p in args.protocol.split(",")],
        )
        for entry in result["protocols"]:
            for name, row in entry["summary"].items():
                print(
                    f"{entry['protocol']:14s} {name:18s} "
                    + " ".join(f"{k} {row[k]:.4f}" for k in ("dice", "aji", "pq", "soft_dice") if k in row)
                    + f" (n={row['images']})"
                )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
