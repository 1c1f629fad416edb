"""The default CPU path (inference form + bf16 autocast + channels-last) against the network as
trained in float32 NCHW, and against the previous default (unfused bf16 + channels-last), on the
validation images: foreground Dice between the label masks, nucleus counts, AJI and Dice against
ground truth, the largest probability difference, and the time of one pass.

Labels are found as ``segment`` finds them (at the input's resolution, no TTA, the packaged weights'
post-processing), so the comparison isolates the model path.

    python benchmarks/fused_equivalence.py --data ../shared/data --out benchmarks/results/fused_equivalence.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from wsi_grunet.evaluate.metrics import pixel_dice
from wsi_grunet.model.checkpoint import load_checkpoint, packaged_weights
from wsi_grunet.model.predictor import Predictor
from wsi_grunet.segment import label_maps
from wsi_grunet.train.data import resample_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tta_and_resolution import (  # noqa: E402
    _pad16,
    _scores,
    parse_validation_args,
    stored_params,
    validation_images,
)

PATHS = {  # name: Predictor settings
    "fp32_nchw_as_trained": {"amp": "fp32", "channels_last": False, "fuse": False},
    "bf16_cl_unfused": {"amp": "bf16", "channels_last": True, "fuse": False},
    "bf16_cl_fused": {"amp": "bf16", "channels_last": True, "fuse": True},  # the default on this CPU
    "fp32_nchw_fused": {"amp": "fp32", "channels_last": False, "fuse": True},
}
REFERENCE, DEFAULT = "fp32_nchw_as_trained", "bf16_cl_fused"


def main() -> None:
    args = parse_validation_args(__doc__)
    bundle = load_checkpoint(packaged_weights())
    params = stored_params(bundle)
    # each predictor gets a model of its own: an unfused predictor converts its model's layout in place
    predictors = {
        name: Predictor(load_checkpoint(packaged_weights()), device="cpu", **settings)
        for name, settings in PATHS.items()
    }
    rows = []
    for dataset, stem, rgb, truth, mpp in validation_images(args.data, limit=args.limit):
        resampled = resample_image(rgb, mpp / bundle.mpp)
        height, width = resampled.shape[:2]
        scaled = _pad16(resampled)
        row: dict = {"dataset": dataset, "image": stem, "shape": list(rgb.shape[:2]), "paths": {}}
        probs, labels = {}, {}
        for name, predictor in predictors.items():
            predictor.predict(scaled[None, :64, :64])  # warm this path's kernels
            start = time.perf_counter()
            probs[name] = predictor.predict(scaled[None])["prob"][0][:height, :width]
            seconds = time.perf_counter() - start
            labels[name], _ = label_maps({"prob": probs[name]}, rgb.shape[:2], mpp, bundle.mpp, params, at="input")
            row["paths"][name] = {"pass_s": seconds, "nuclei": int(labels[name].max()), **_scores(truth, labels[name])}
        for name in PATHS:
            if name == REFERENCE:
                continue
            row["paths"][name]["vs_reference"] = {
                "fg_dice": pixel_dice(labels[REFERENCE], labels[name] > 0),
                "prob_max_abs_diff": float(np.abs(probs[name] - probs[REFERENCE]).max()),
                "prob_mean_abs_diff": float(np.abs(probs[name] - probs[REFERENCE]).mean()),
            }
        rows.append(row)
        got, ref = row["paths"][DEFAULT], row["paths"][REFERENCE]
        print(
            f"{dataset:18s} {stem:26s} fg Dice default/fp32 {got['vs_reference']['fg_dice']:.4f}  nuclei "
            f"{got['nuclei']}/{ref['nuclei']}  AJI {got['aji']:.3f}/{ref['aji']:.3f}  pass "
            f"{got['pass_s']:.2f}/{ref['pass_s']:.2f} s  fused fp32 max diff "
            f"{row['paths']['fp32_nchw_fused']['vs_reference']['prob_max_abs_diff']:.1e}",
            flush=True,
        )
    result = {
        "command": "python benchmarks/fused_equivalence.py " + " ".join(sys.argv[1:]),
        "cores_available": len(os.sched_getaffinity(0)),
        "paths": {name: p.describe() for name, p in predictors.items()},
        "postprocess": params.to_dict(),
        "summary": summarise(rows),
        "images": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


def summarise(rows: list[dict]) -> dict:
    """Per path, over all images: means against ground truth and against the reference."""
    out: dict = {}
    for name in PATHS:
        entries = [r["paths"][name] for r in rows]
        reference = [r["paths"][REFERENCE] for r in rows]
        entry = {key: float(np.mean([e[key] for e in entries])) for key in ("pass_s", "aji", "dice", "pq")}
        entry["nuclei_total"] = int(sum(e["nuclei"] for e in entries))
        entry["nuclei_abs_diff_mean"] = float(
            np.mean([abs(e["nuclei"] - r["nuclei"]) for e, r in zip(entries, reference)])
        )
        if name != REFERENCE:
            entry["fg_dice_vs_reference_mean"] = float(np.mean([e["vs_reference"]["fg_dice"] for e in entries]))
            entry["fg_dice_vs_reference_min"] = float(np.min([e["vs_reference"]["fg_dice"] for e in entries]))
            entry["prob_max_abs_diff"] = float(np.max([e["vs_reference"]["prob_max_abs_diff"] for e in entries]))
        out[name] = entry
    return out


if __name__ == "__main__":
    main()
