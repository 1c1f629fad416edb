"""Tune post-processing parameters on validation images by grid search (mean AJI)."""

from __future__ import annotations

import itertools
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..evaluate.metrics import pair_counts
from ..evaluate.protocol import MERGED_LABEL_DATASETS
from ..postprocess import PostprocessParams, label_nuclei

# Datasets whose labels merge touching nuclei (TNBC) would reward under-segmentation: they are
# reported but do not steer the instance parameters.
INSTANCE_OBJECTIVE_EXCLUDES = MERGED_LABEL_DATASETS


# Foreground thresholds tried by ``tune_threshold_then_instances``.
THRESHOLDS = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)


@dataclass
class ValidationItem:
    name: str
    dataset: str
    truth: np.ndarray  # int32 labels at the resolution of ``prob``
    prob: np.ndarray  # float32
    distance: np.ndarray | None
    mpp: float | None = None  # microns per pixel of ``prob`` when it differs from the tuner's ``mpp``


def instance_grid(with_distance: bool) -> list[dict[str, float]]:
    """Values of the parameters that split and filter instances (everything but the threshold)."""
    areas = (4.0, 8.0, 16.0)
    if with_distance:
        second = [{"marker_threshold": m} for m in (0.3, 0.4, 0.5, 0.6, 0.7)]
    else:
        second = [
            {"marker_min_distance_um": d, "relief_levels": levels}
            for d in (1.5, 2.5, 3.5, 5.0)
            for levels in (1, 2, 3, 4)
        ]
    return [{"min_area_um2": a, **s} for a, s in itertools.product(areas, second)]


def default_grid(with_distance: bool) -> list[dict[str, float]]:
    """Threshold and instance parameters together (``tune_postprocess``'s single search)."""
    return [{"threshold": t, **s} for t in (0.4, 0.5, 0.6) for s in instance_grid(with_distance)]


def score_setting(items: list[ValidationItem], mpp: float, values: dict[str, float]) -> dict[str, Any]:
    """Label every item with the default parameters overridden by ``values``; the metrics per image."""
    params = PostprocessParams().with_overrides(**values)
    per_image = {}
    for item in items:
        labels = label_nuclei(item.prob, item.mpp or mpp, params, item.distance)
        counts = pair_counts(item.truth, labels, item.prob, params.threshold)
        per_image[item.name] = {"dataset": item.dataset, **counts.metrics()}
    return {"params": params.to_dict(), "images": per_image}


def _score(job: tuple[list[ValidationItem], float, dict[str, float]]) -> dict[str, Any]:
    return score_setting(*job)


def mean_dice(per_image: dict[str, dict[str, Any]]) -> float:
    """Mean foreground Dice over every image, TNBC included (the threshold's objective)."""
    return float(np.mean([m["dice"] for m in per_image.values()]))


def _run(jobs: list[tuple[list[ValidationItem], float, dict[str, float]]], workers: int) -> list[dict[str, Any]]:
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(_score, jobs))
    return [_score(job) for job in jobs]


def summarise(per_image: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of each metric per dataset and over the datasets that steer tuning ("objective")."""
    keys = ("dice", "iou", "soft_dice", "aji", "aji_plus", "dq", "sq", "pq")
    groups: dict[str, list[dict[str, Any]]] = {}
    for metrics in per_image.values():
        groups.setdefault(metrics["dataset"], []).append(metrics)
        if metrics["dataset"] not in INSTANCE_OBJECTIVE_EXCLUDES:
            groups.setdefault("objective", []).append(metrics)
    return {
        name: {k: float(np.mean([m[k] for m in rows])) for k in keys if k in rows[0]} | {"images": len(rows)}
        for name, rows in groups.items()
    }


def tune_postprocess(
    items: list[ValidationItem], mpp: float, grid: list[dict[str, float]] | None = None, workers: int = 1
) -> dict[str, Any]:
    """Score every grid point; return the best (highest objective AJI) with all results."""
    grid = grid or default_grid(items[0].distance is not None)
    results = _run([(items, mpp, values) for values in grid], workers)
    for result in results:
        result["summary"] = summarise(result["images"])
    key = "objective" if "objective" in results[0]["summary"] else next(iter(results[0]["summary"]))
    best = max(results, key=lambda r: r["summary"][key]["aji"])
    return {"best": best, "grid": [{"params": r["params"], "summary": r["summary"]} for r in results]}


def tune_threshold_then_instances(
    items: list[ValidationItem],
    mpp: float,
    base: PostprocessParams,
    thresholds: tuple[float, ...] = THRESHOLDS,
    grid: list[dict[str, float]] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Two searches, each steered by the images that measure it.

    1. The threshold decides the foreground: it is chosen by the mean foreground Dice over *all*
       images (TNBC's merged labels still outline the right pixels), with ``base``'s other values.
    2. At that threshold, the instance parameters (``grid``, default ``instance_grid``) are chosen
       by the mean AJI over the images whose labels separate touching nuclei (not TNBC).

    Half as many images steer the AJI as the Dice, and the AJI of a few images moves with the
    threshold by more than the spread between good settings: choosing both by AJI picked
    thresholds that did not carry over to other images.
    """
    base_values = base.to_dict()
    stage1 = _run([(items, mpp, {**base_values, "threshold": t}) for t in thresholds], workers)
    for result in stage1:
        result["dice_all"] = mean_dice(result["images"])
    threshold = max(stage1, key=lambda r: r["dice_all"])["params"]["threshold"]
    grid = grid or instance_grid(items[0].distance is not None)
    stage2 = tune_postprocess(
        items, mpp, [{**base_values, **values, "threshold": threshold} for values in grid], workers
    )
    return {
        "threshold": threshold,
        "thresholds": [{"threshold": r["params"]["threshold"], "dice_all": r["dice_all"]} for r in stage1],
        **stage2,
    }
