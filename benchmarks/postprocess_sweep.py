"""Score every post-processing setting of a grid on both halves of the validation images.

For each point of threshold x instance grid (``tune.THRESHOLDS`` x ``tune.instance_grid``), the
select and the report images are labelled under one protocol (default input+flips, as
``evaluate_split.py``) and scored. The result shows how far the choice made on the select images
carries over to the report images, for each way of choosing (a rule): the output lists, per rule,
the setting it picks on one half and that setting's score on the other, both ways round (two-fold
cross-validation of the rule). It is a study of the tuning protocol, not a way to choose: reading
the report columns to pick a setting would make them no longer held out.

Usage: python benchmarks/postprocess_sweep.py --data DIR... [--weights CKPT|packaged]
       [--protocol input+flips] [--workers 2] --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from evaluate_split import protocol_items, weights_path

from wsi_grunet.config import load_train_config
from wsi_grunet.model.checkpoint import load_checkpoint
from wsi_grunet.postprocess import PostprocessParams
from wsi_grunet.train.loop import load_training_data
from wsi_grunet.train.tune import THRESHOLDS, ValidationItem, instance_grid, mean_dice, score_setting, summarise

ITEMS: dict[str, list[ValidationItem]] = {}
MODEL_MPP: list[float] = []  # the model's microns per pixel, for items at model resolution


def _score(values: dict[str, float]) -> dict[str, Any]:
    """Both halves scored with one setting: the AJI objective (per image, MoNuSeg + CPM-15), the
    threshold's objective (Dice over every image) and each dataset's means."""
    out: dict[str, Any] = {}
    for split, items in ITEMS.items():
        scored = score_setting(items, MODEL_MPP[0], values)
        out["params"] = scored["params"]
        summary = summarise(scored["images"])
        out[split] = {
            "aji_per_image": summary["objective"]["aji"],
            "dice_all": mean_dice(scored["images"]),
            **{d: {"aji": m["aji"], "dice": m["dice"]} for d, m in summary.items() if d != "objective"},
        }
    return out


def _pick(candidates: list[dict[str, Any]], split: str, key: str) -> dict[str, Any]:
    return max(candidates, key=lambda p: p[split][key])


def _two_stage(points: list[dict[str, Any]], split: str, base: PostprocessParams) -> dict[str, Any]:
    """``tune.tune_threshold_then_instances`` on the scored grid: the threshold by Dice over all
    images (the other values as in ``base``), then the rest by AJI at that threshold."""
    others = {k: v for k, v in base.to_dict().items() if k != "threshold"}
    at_base = [p for p in points if all(p["params"][k] == v for k, v in others.items())]
    threshold = _pick(at_base, split, "dice_all")["params"]["threshold"]
    return _pick([p for p in points if p["params"]["threshold"] == threshold], split, "aji_per_image")


def _init(items: dict[str, list[ValidationItem]], model_mpp: float) -> None:
    ITEMS.update(items)
    MODEL_MPP.append(model_mpp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--weights", default="packaged")
    parser.add_argument("--protocol", default="input+flips")
    parser.add_argument("--cache", default=".scratch/eval_maps")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    bundle = load_checkpoint(weights_path(args.weights))
    data = load_training_data([Path(d) for d in args.data], load_train_config(None, [{"mpp": bundle.mpp}]))
    items = {
        split: protocol_items(args, bundle, args.protocol, samples, Path(args.cache))
        for split, samples in (("select", data.select), ("report", data.report))
    }
    grid = [{"threshold": t, **values} for t in THRESHOLDS for values in instance_grid(False)]
    start = time.monotonic()
    with ProcessPoolExecutor(args.workers, initializer=_init, initargs=(items, bundle.mpp)) as pool:
        points = list(pool.map(_score, grid, chunksize=4))

    base = PostprocessParams.from_dict(bundle.metadata.get("postprocess") or {})
    rules = {
        "one search, all parameters by AJI": lambda split: _pick(points, split, "aji_per_image"),
        "threshold by Dice (all images), then the rest by AJI": lambda split: _two_stage(points, split, base),
        **{
            f"one search with relief_levels fixed at {n}": (
                lambda split, n=n: _pick(
                    [p for p in points if p["params"]["relief_levels"] == n], split, "aji_per_image"
                )
            )
            for n in (1, 2, 3, 4)
        },
    }
    # Each rule chooses on one half and is scored on the other, both ways round (two-fold cross-validation).
    outcomes = {}
    for name, rule in rules.items():
        outcomes[name] = {}
        for chosen_on, scored_on in (("select", "report"), ("report", "select")):
            point = rule(chosen_on)
            outcomes[name][f"chosen on {chosen_on}"] = {
                "params": point["params"],
                f"{chosen_on} aji_per_image": point[chosen_on]["aji_per_image"],
                f"{scored_on} aji_per_image": point[scored_on]["aji_per_image"],
            }
            print(
                f"{name}, chosen on {chosen_on}: {json.dumps(point['params'])}: "
                f"{scored_on} AJI {point[scored_on]['aji_per_image']:.4f}"
            )
    result = {
        "weights": str(weights_path(args.weights)),
        "protocol": args.protocol,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "seconds": time.monotonic() - start,
        "images": {split: [f"{i.dataset}/{i.name}" for i in its] for split, its in items.items()},
        "rules": outcomes,
        "points": points,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
