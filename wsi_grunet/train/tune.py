"""Tune post-processing parameters on validation images by grid search (mean AJI)."""

from __future__ import annotations

import itertools
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..evaluate.metrics import pair_counts
from ..postprocess import PostprocessParams, label_nuclei

# Datasets whose labels merge touching nuclei (TNBC) would reward under-segmentation: they are
# reported but do not steer the instance parameters.
INSTANCE_OBJECTIVE_EXCLUDES = ("tnbc",)


@dataclass
class ValidationItem:
    name: str
    dataset: str
    truth: np.ndarray  # int32 labels at model resolution
    prob: np.ndarray  # float32
    distance: np.ndarray | None


def default_grid(with_distance: bool) -> list[dict[str, float]]:
    thresholds = (0.4, 0.5, 0.6)
    areas = (4.0, 8.0, 16.0)
    if with_distance:
        second = [{"marker_threshold": m} for m in (0.3, 0.4, 0.5, 0.6, 0.7)]
    else:
        second = [{"marker_min_distance_um": d} for d in (1.5, 2.5, 3.5, 5.0)]
    return [{"threshold": t, "min_area_um2": a, **s} for t, a, s in itertools.product(thresholds, areas, second)]


def _score(args: tuple[list[ValidationItem], float, dict[str, float]]) -> dict[str, Any]:
    items, mpp, values = args
    params = PostprocessParams().with_overrides(**values)
    per_image = {}
    for item in items:
        labels = label_nuclei(item.prob, mpp, params, item.distance)
        counts = pair_counts(item.truth, labels, item.prob, params.threshold)
        per_image[item.name] = {"dataset": item.dataset, **counts.metrics()}
    return {"params": params.to_dict(), "images": per_image}


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
    jobs = [(items, mpp, values) for values in grid]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_score, jobs))
    else:
        results = [_score(job) for job in jobs]
    for result in results:
        result["summary"] = summarise(result["images"])
    key = "objective" if "objective" in results[0]["summary"] else next(iter(results[0]["summary"]))
    best = max(results, key=lambda r: r["summary"][key]["aji"])
    return {"best": best, "grid": [{"params": r["params"], "summary": r["summary"]} for r in results]}
