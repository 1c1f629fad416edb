"""The selection protocol: whether a candidate (weights, head, post-processing, TTA) may replace the default.

Every validation image of every dataset is scored for both; each dataset is judged on its own:

* **Guarded metrics**: Dice everywhere, and AJI where the labels keep touching nuclei apart (not
  TNBC, whose labels merge them: AJI there punishes correct splits).
* **Noise**: the 95% bootstrap interval of the mean paired difference (candidate - default) over the
  dataset's images, resampling images with replacement (seeded). Pairing removes what the images
  share (how hard each one is), so what is left is how much the change itself varies between images.
* **Loses** on a dataset when a guarded metric's whole interval lies below zero: a drop larger than
  that dataset's image-to-image noise.
* **Wins** when the primary score (AJI, or Dice where labels merge nuclei) rises on the dataset the
  default does worst on (by Dice, the one metric fair to every dataset), or its mean over datasets rises.
* **Adopt** only when it loses nowhere and wins. Among adoptable candidates the one whose smallest
  primary gain over the datasets is largest is preferred: the best in the worst case, not on average.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# Datasets whose labels merge touching nuclei: judged by pixel Dice only.
MERGED_LABEL_DATASETS = ("tnbc",)
REPORTED = ("dice", "aji", "pq")
BOOTSTRAP_SAMPLES = 10_000


def guarded_metrics(dataset: str) -> tuple[str, ...]:
    return ("dice",) if dataset in MERGED_LABEL_DATASETS else ("dice", "aji")


def primary_metric(dataset: str) -> str:
    return "dice" if dataset in MERGED_LABEL_DATASETS else "aji"


def bootstrap_interval(differences: Sequence[float], seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``differences`` over resamples of the images."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no paired images to compare")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(BOOTSTRAP_SAMPLES, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class MetricComparison:
    default: float  # mean over the dataset's images
    candidate: float
    difference: float  # mean paired difference, candidate - default
    interval: tuple[float, float]  # its 95% bootstrap interval

    @property
    def loses(self) -> bool:
        return self.interval[1] < 0


@dataclass(frozen=True)
class DatasetComparison:
    dataset: str
    images: int
    metrics: dict[str, MetricComparison]

    @property
    def primary(self) -> MetricComparison:
        return self.metrics[primary_metric(self.dataset)]

    @property
    def losses(self) -> list[str]:
        return [m for m in guarded_metrics(self.dataset) if self.metrics[m].loses]


@dataclass(frozen=True)
class Verdict:
    adopt: bool
    datasets: list[DatasetComparison]
    worst_dataset: str  # where the default's Dice is lowest
    worst_case_gain: float  # the smallest primary gain over the datasets
    mean_gain: float  # the mean over datasets of the primary gain
    reasons: list[str] = field(default_factory=list)


PerImage = Mapping[str, Mapping[str, object]]  # image -> {"dataset": name, metric: value, ...}


def compare_datasets(default: PerImage, candidate: PerImage, seed: int = 0) -> list[DatasetComparison]:
    """Per-dataset means and paired differences of ``REPORTED`` metrics over the images both scored."""
    if set(default) != set(candidate):
        missing = sorted(set(default) ^ set(candidate))
        raise ValueError(f"the default and the candidate were scored on different images: {missing[:5]}")
    names = list(dict.fromkeys(str(row["dataset"]) for row in default.values()))
    comparisons = []
    for name in names:
        images = sorted(image for image, row in default.items() if row["dataset"] == name)
        metrics = {}
        for metric in REPORTED:
            base = np.array([float(default[i][metric]) for i in images])  # type: ignore[arg-type]
            cand = np.array([float(candidate[i][metric]) for i in images])  # type: ignore[arg-type]
            diff = cand - base
            metrics[metric] = MetricComparison(
                float(base.mean()), float(cand.mean()), float(diff.mean()), bootstrap_interval(diff, seed)
            )
        comparisons.append(DatasetComparison(name, len(images), metrics))
    return comparisons


def verdict(default: PerImage, candidate: PerImage, seed: int = 0) -> Verdict:
    """Adopt or not, by the rules in the module docstring."""
    datasets = compare_datasets(default, candidate, seed)
    worst = min(datasets, key=lambda d: d.metrics["dice"].default)
    gains = [d.primary.difference for d in datasets]
    mean_gain = float(np.mean(gains))
    reasons = [
        f"loses on {d.dataset}: {m} {d.metrics[m].difference:+.4f} "
        f"(95% interval {d.metrics[m].interval[0]:+.4f} .. {d.metrics[m].interval[1]:+.4f})"
        for d in datasets
        for m in d.losses
    ]
    wins = worst.primary.difference > 0 or mean_gain > 0
    if not wins:
        reasons.append(
            f"no win: {primary_metric(worst.dataset)} on the worst dataset ({worst.dataset}) "
            f"{worst.primary.difference:+.4f}, primary mean over datasets {mean_gain:+.4f}"
        )
    return Verdict(not reasons, datasets, worst.dataset, float(min(gains)), mean_gain, reasons)


def preferred(verdicts: Mapping[str, Verdict]) -> str | None:
    """Among the adoptable candidates, the one best in its worst dataset (None when none is adoptable)."""
    adoptable = {name: v for name, v in verdicts.items() if v.adopt}
    if not adoptable:
        return None
    return max(adoptable, key=lambda name: (adoptable[name].worst_case_gain, adoptable[name].mean_gain))


def format_verdict(name: str, result: Verdict) -> str:
    """The per-dataset table (default -> candidate, paired difference and its interval) and the verdict."""
    lines = [f"candidate {name} against the default"]
    lines.append(f"{'dataset':20s} {'n':>3s}  " + "  ".join(f"{m:>36s}" for m in REPORTED))
    for d in result.datasets:
        cells = []
        for m in REPORTED:
            c = d.metrics[m]
            cells.append(
                f"{c.default:.3f}->{c.candidate:.3f} {c.difference:+.3f} [{c.interval[0]:+.3f},{c.interval[1]:+.3f}]"
            )
        lines.append(f"{d.dataset:20s} {d.images:3d}  " + "  ".join(f"{cell:>36s}" for cell in cells))
    lines.append(
        f"worst dataset {result.worst_dataset}; smallest primary gain {result.worst_case_gain:+.4f}, "
        f"mean over datasets {result.mean_gain:+.4f}"
    )
    lines.append("verdict: " + ("ADOPT" if result.adopt else "do not adopt: " + "; ".join(result.reasons)))
    return "\n".join(lines)


def verdict_to_dict(result: Verdict) -> dict[str, object]:
    return {
        "adopt": result.adopt,
        "reasons": result.reasons,
        "worst_dataset": result.worst_dataset,
        "worst_case_gain": result.worst_case_gain,
        "mean_gain": result.mean_gain,
        "datasets": {
            d.dataset: {
                "images": d.images,
                **{
                    m: {
                        "default": c.default,
                        "candidate": c.candidate,
                        "difference": c.difference,
                        "interval": list(c.interval),
                    }
                    for m, c in d.metrics.items()
                },
            }
            for d in result.datasets
        },
    }


@dataclass(frozen=True)
class CrossCheck:
    """A post-processing value chosen on each half of the images and checked on the other."""

    parameter: str
    principled: float
    best: dict[str, float]  # half -> the value with the highest mean-over-datasets primary score there
    scores: dict[str, dict[float, float]]  # half -> value -> that score
    chosen: float
    reason: str


def primary_mean(per_image: PerImage, images: Sequence[str]) -> float:
    """Mean over datasets of each dataset's mean primary score on ``images``."""
    by_dataset: dict[str, list[float]] = {}
    for image in images:
        row = per_image[image]
        dataset = str(row["dataset"])
        by_dataset.setdefault(dataset, []).append(float(row[primary_metric(dataset)]))  # type: ignore[arg-type]
    return float(np.mean([np.mean(values) for values in by_dataset.values()]))


def cross_check(
    parameter: str, principled: float, per_value: Mapping[float, PerImage], halves: Mapping[str, str]
) -> CrossCheck:
    """Tune ``parameter`` only where the evidence is consistent, by choosing on one half of the images
    (``halves``: image -> half name) and checking on the other, both ways round: the value best on
    each half must beat the principled value on the other half. If it does, the value whose worse
    half scores highest is taken (one value for both halves); if not, the principled value stands."""
    names = sorted(set(halves.values()))
    if len(names) != 2 or principled not in per_value:
        raise ValueError("cross_check needs two halves and the principled value among the values tried")
    scores = {
        h: {v: primary_mean(s, [i for i, half in halves.items() if half == h]) for v, s in per_value.items()}
        for h in names
    }
    best = {h: max(scores[h], key=lambda v: scores[h][v]) for h in names}
    for chosen_on, checked_on in (names, names[::-1]):
        value = best[chosen_on]
        if value != principled and scores[checked_on][value] <= scores[checked_on][principled]:
            reason = (
                f"{parameter} {value:g}, best on {chosen_on}, does not beat {principled:g} on {checked_on}: "
                f"the principled value stands"
            )
            return CrossCheck(parameter, principled, best, scores, principled, reason)
    chosen = max(per_value, key=lambda v: min(scores[h][v] - scores[h][principled] for h in names))
    reason = (
        f"chosen on either half, {parameter} beats {principled:g} on the other "
        f"(best: {', '.join(f'{h} {best[h]:g}' for h in names)}); {chosen:g} gains most in its worse half"
    )
    return CrossCheck(parameter, principled, best, scores, chosen, reason)
