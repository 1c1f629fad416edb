"""Accuracy and CPU time of test-time augmentation, of labelling at the input's resolution, and of the
fast CPU path (bf16 autocast, channels-last) against float32, on the validation images.

For every validation image of ``configs/datasets.yaml`` (MoNuSeg, TNBC, CPM-15; read at their own
pixel size, scored against their own ground truth), the packaged model runs the eight dihedral
transforms once each (fast path, timed one by one); the TTA modes are the means of their subsets,
so each mode's model time is the sum of its passes. Each mode is labelled twice: at the input's
resolution from the upsampled probability (``segment`` today) and at model resolution with the
labels upsampled (before). A float32 NCHW pass of the layers as trained (the previous CPU default,
unfused) gives the equivalence
figures: Dice between the two foreground masks, nucleus counts and AJI against ground truth.

    python benchmarks/tta_and_resolution.py --data ../shared/data --out benchmarks/results/tta_and_resolution.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wsi_grunet.evaluate.metrics import evaluate_pair, pixel_dice
from wsi_grunet.model.checkpoint import ModelBundle, load_checkpoint, packaged_weights
from wsi_grunet.model.predictor import TTA_TRANSFORMS, Predictor
from wsi_grunet.postprocess import PostprocessParams
from wsi_grunet.segment import label_maps
from wsi_grunet.train.data import IMAGE_SUFFIXES, dataset_spec, read_labels, read_rgb, resample_image

DATASETS = ("monuseg2018-train", "cpm15", "tnbc")
METRICS = ("dice", "aji", "aji_plus", "pq", "n_pred", "n_true")


def validation_images(data: Path, names: tuple[str, ...] = DATASETS, limit: int | None = None):
    """(dataset, stem, rgb, labels, mpp) at each image's own resolution, taking the datasets in
    turn (so a run stopped early still covers every dataset)."""
    queues = []
    for name in names:
        spec = dataset_spec(data / name)
        queues.append([(data / name, spec, stem) for stem in list(spec.validation)[:limit]])
    for round_ in range(max(len(q) for q in queues)):
        for queue in queues:
            if round_ >= len(queue):
                continue
            folder, spec, stem = queue[round_]
            image_path = next(
                p for p in (folder / "images").iterdir() if p.stem == stem and p.suffix.lower() in IMAGE_SUFFIXES
            )
            label_path = next(
                folder / spec.labels_dir / (stem + s)
                for s in (".png", ".tif", ".tiff")
                if (folder / spec.labels_dir / (stem + s)).exists()
            )
            yield spec.name, stem, read_rgb(image_path), read_labels(label_path), spec.mpp_per_image.get(stem, spec.mpp)


def stored_params(bundle: ModelBundle) -> PostprocessParams:
    return PostprocessParams.from_dict({**(bundle.metadata.get("postprocess") or {}), "threshold": bundle.threshold})


def _pad16(image: np.ndarray) -> np.ndarray:
    pad_h, pad_w = (-image.shape[0]) % 16, (-image.shape[1]) % 16
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=255)


def dihedral_passes(predictor: Predictor, scaled: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
    """Probability of each dihedral transform (undone, cropped) and the seconds each pass took."""
    padded = torch.from_numpy(_pad16(scaled)).permute(2, 0, 1)  # (3, H, W): transforms act on the last two axes
    probs, seconds = [], []
    for transform in TTA_TRANSFORMS["dihedral"]:
        moved = np.ascontiguousarray(transform.apply(padded).permute(1, 2, 0).numpy())[None]
        start = time.perf_counter()
        prob = predictor.predict(moved)["prob"]
        seconds.append(time.perf_counter() - start)
        back = transform.undo(torch.from_numpy(prob)).numpy()[0]
        probs.append(back[: scaled.shape[0], : scaled.shape[1]])
    return probs, seconds


def _scores(truth: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    metrics = evaluate_pair(truth, labels)
    return {k: float(metrics[k]) for k in METRICS}


def parse_validation_args(doc: str | None) -> argparse.Namespace:
    """--data, --out and --limit, shared by the benchmarks over the validation images."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, help="at most this many validation images per dataset")
    return parser.parse_args()


def main() -> None:
    args = parse_validation_args(__doc__)
    bundle = load_checkpoint(packaged_weights())
    params = stored_params(bundle)
    fast = Predictor(bundle, device="cpu")  # auto: bf16 + channels-last on this CPU
    # a model of its own: a predictor converts its model's memory layout in place
    reference = Predictor(
        load_checkpoint(packaged_weights()), device="cpu", amp="fp32", channels_last=False, fuse=False
    )
    index = {t: i for i, t in enumerate(TTA_TRANSFORMS["dihedral"])}
    modes = {mode: [index[t] for t in TTA_TRANSFORMS[mode]] for mode in ("none", "flips", "rot4", "dihedral")}
    rows = []
    for dataset, stem, rgb, truth, mpp in validation_images(args.data, limit=args.limit):
        load = os.getloadavg()
        scaled = resample_image(rgb, mpp / bundle.mpp)
        probs, seconds = dihedral_passes(fast, scaled)
        row: dict = {
            "dataset": dataset,
            "image": stem,
            "mpp": mpp,
            "shape": list(rgb.shape[:2]),
            "model_shape": list(scaled.shape[:2]),
            "pass_s": seconds,
            "loadavg_before": load,
            "modes": {},
        }
        for mode, members in modes.items():
            prob = np.mean([probs[i] for i in members], axis=0)
            entry = {"model_s": float(sum(seconds[i] for i in members))}
            for at in ("input", "model"):
                start = time.perf_counter()
                labels, _ = label_maps({"prob": prob}, rgb.shape[:2], mpp, bundle.mpp, params, at=at)
                entry[f"post_{at}_s"] = time.perf_counter() - start
                entry[at] = _scores(truth, labels)
                if mode == "none":
                    row.setdefault("fast_labels", {})[at] = labels
            row["modes"][mode] = entry
        start = time.perf_counter()
        ref_prob = reference.predict(_pad16(scaled)[None])["prob"][0][: scaled.shape[0], : scaled.shape[1]]
        ref_s = time.perf_counter() - start
        equivalence = {
            "fp32_nchw_s": ref_s,
            "fast_s": seconds[0],
            "prob_max_abs_diff": float(np.abs(ref_prob - probs[0]).max()),
            "prob_mean_abs_diff": float(np.abs(ref_prob - probs[0]).mean()),
        }
        for at in ("input", "model"):
            ref_labels, _ = label_maps({"prob": ref_prob}, rgb.shape[:2], mpp, bundle.mpp, params, at=at)
            fast_labels = row["fast_labels"][at]
            ref_scores = _scores(truth, ref_labels)
            equivalence[at] = {
                "fg_dice_fast_vs_fp32": pixel_dice(ref_labels, fast_labels > 0),
                "nuclei_fp32": int(ref_labels.max()),
                "nuclei_fast": int(fast_labels.max()),
                "aji_fp32": ref_scores["aji"],
                "aji_fast": row["modes"]["none"][at]["aji"],
                "dice_fp32": ref_scores["dice"],
                "dice_fast": row["modes"]["none"][at]["dice"],
            }
        del row["fast_labels"]
        row["equivalence"] = equivalence
        rows.append(row)
        none, dihedral = row["modes"]["none"], row["modes"]["dihedral"]
        print(
            f"{dataset:18s} {stem:26s} {rgb.shape[0]}x{rgb.shape[1]} pass {np.mean(seconds):.2f} s  "
            f"AJI none {none['input']['aji']:.3f}/{none['model']['aji']:.3f} (input/model labels)  "
            f"dihedral {dihedral['input']['aji']:.3f}  fp32 {equivalence['model']['aji_fp32']:.3f}  "
            f"fg Dice fast/fp32 {equivalence['model']['fg_dice_fast_vs_fp32']:.4f}",
            flush=True,
        )

        write_result(args.out, rows, fast, reference, params, complete=False)
    summary = write_result(args.out, rows, fast, reference, params, complete=True)
    print(json.dumps(summary, indent=2))


def write_result(
    out: Path, rows: list[dict], fast: Predictor, reference: Predictor, params: PostprocessParams, complete: bool
) -> dict:
    """Rewritten after every image, so a run stopped early keeps what it measured."""
    summary = summarise(rows)
    result = {
        "command": "python benchmarks/tta_and_resolution.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cores_available": len(os.sched_getaffinity(0)),
            "note": "shared 2-core machine: other processes ran at the same time (see loadavg_before)",
        },
        "fast_path": fast.describe(),
        "reference_path": reference.describe(),
        "postprocess": params.to_dict(),
        "complete": complete,
        "summary": summary,
        "images": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    return summary


def summarise(rows: list[dict]) -> dict:
    """Means over images, per dataset and over all images."""
    groups: dict[str, list[dict]] = {"all": rows}
    for row in rows:
        groups.setdefault(row["dataset"], []).append(row)
    out: dict = {}
    for group, members in groups.items():
        entry: dict = {"images": len(members), "tta": {}, "equivalence": {}}
        for mode in members[0]["modes"]:
            stats = {"model_s": float(np.mean([r["modes"][mode]["model_s"] for r in members]))}
            for at in ("input", "model"):
                stats[f"post_{at}_s"] = float(np.mean([r["modes"][mode][f"post_{at}_s"] for r in members]))
                for key in ("dice", "aji", "pq"):
                    stats[f"{key}_{at}"] = float(np.mean([r["modes"][mode][at][key] for r in members]))
            entry["tta"][mode] = stats
        for at in ("input", "model"):
            eq = [r["equivalence"][at] for r in members]
            entry["equivalence"][at] = {
                "fg_dice_mean": float(np.mean([e["fg_dice_fast_vs_fp32"] for e in eq])),
                "fg_dice_min": float(np.min([e["fg_dice_fast_vs_fp32"] for e in eq])),
                "nuclei_abs_diff_mean": float(np.mean([abs(e["nuclei_fast"] - e["nuclei_fp32"]) for e in eq])),
                "nuclei_rel_diff_total": float(
                    sum(e["nuclei_fast"] - e["nuclei_fp32"] for e in eq) / max(1, sum(e["nuclei_fp32"] for e in eq))
                ),
                "aji_fp32": float(np.mean([e["aji_fp32"] for e in eq])),
                "aji_fast": float(np.mean([e["aji_fast"] for e in eq])),
            }
        entry["equivalence"]["fp32_nchw_s"] = float(np.mean([r["equivalence"]["fp32_nchw_s"] for r in members]))
        entry["equivalence"]["fast_s"] = float(np.mean([r["equivalence"]["fast_s"] for r in members]))
        out[group] = entry
    return out


if __name__ == "__main__":
    main()
