"""The selection protocol's verdicts on synthetic per-image scores where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_grunet.evaluate.protocol import bootstrap_interval, cross_check, format_verdict, preferred, verdict

SIZES = {"monuseg": 6, "tnbc": 10, "cpm15": 4}
LEVELS = {"monuseg": 0.55, "tnbc": 0.50, "cpm15": 0.70}  # the default's typical AJI per dataset


def scores(shift: dict[str, float] | None = None, noise: float = 0.0, seed: int = 0) -> dict[str, dict[str, object]]:
    """Per-image Dice / AJI / PQ: image difficulty shared by every candidate (seed 0), plus a shift per
    dataset and, optionally, per-image noise of the change (its own seed)."""
    difficulty = np.random.default_rng(0)
    change = np.random.default_rng(seed)
    rows: dict[str, dict[str, object]] = {}
    for dataset, n in SIZES.items():
        for k in range(n):
            hard = difficulty.normal(0, 0.08)
            delta = (
                (shift or {}).get(dataset, 0.0) + change.normal(0, noise) if noise else (shift or {}).get(dataset, 0.0)
            )
            rows[f"{dataset}/{k}"] = {
                "dataset": dataset,
                "aji": LEVELS[dataset] + hard + delta,
                "dice": LEVELS[dataset] + 0.25 + hard / 2 + delta,
                "pq": LEVELS[dataset] - 0.05 + hard + delta,
            }
    return rows


DEFAULT = scores()


def test_a_change_that_wins_on_one_dataset_and_loses_on_another_is_rejected():
    result = verdict(DEFAULT, scores({"monuseg": 0.05, "cpm15": -0.03}, noise=0.005, seed=1))
    assert not result.adopt
    assert any("loses on cpm15" in reason for reason in result.reasons)
    assert result.mean_gain > 0  # the average would have said yes


def test_small_consistent_gains_everywhere_are_adopted():
    result = verdict(DEFAULT, scores({"monuseg": 0.01, "tnbc": 0.01, "cpm15": 0.01}, noise=0.005, seed=2))
    assert result.adopt and result.reasons == []
    assert result.worst_dataset == "tnbc"  # the default's lowest Dice
    assert result.worst_case_gain == pytest.approx(0.01, abs=0.006)


def test_a_drop_within_the_image_to_image_noise_is_not_a_loss():
    # cpm15 falls by 0.005 on average, but its 4 images disagree by 0.03: not a loss beyond noise
    result = verdict(DEFAULT, scores({"monuseg": 0.02, "tnbc": 0.02, "cpm15": -0.005}, noise=0.03, seed=3))
    cpm = next(d for d in result.datasets if d.dataset == "cpm15")
    assert cpm.primary.interval[0] < 0 < cpm.primary.interval[1]
    assert result.adopt


def test_tnbc_is_judged_by_dice_only():
    # AJI falls on TNBC (its labels merge touching nuclei, so correct splits lower it); Dice rises
    candidate = scores({"monuseg": 0.01, "cpm15": 0.01})
    for row in candidate.values():
        if row["dataset"] == "tnbc":
            row["aji"] = float(row["aji"]) - 0.05  # type: ignore[arg-type]
            row["dice"] = float(row["dice"]) + 0.01  # type: ignore[arg-type]
    assert verdict(DEFAULT, candidate).adopt


def test_no_change_is_not_adopted_and_the_worst_case_is_preferred():
    assert not verdict(DEFAULT, DEFAULT).adopt
    steady = verdict(DEFAULT, scores({"monuseg": 0.01, "tnbc": 0.01, "cpm15": 0.01}))
    lopsided = verdict(DEFAULT, scores({"monuseg": 0.06, "tnbc": 0.002, "cpm15": 0.04}))
    assert steady.adopt and lopsided.adopt and lopsided.mean_gain > steady.mean_gain
    assert preferred({"steady": steady, "lopsided": lopsided}) == "steady"
    assert preferred({"none": verdict(DEFAULT, DEFAULT)}) is None


def test_the_table_names_every_dataset_and_the_verdict():
    text = format_verdict("x", verdict(DEFAULT, scores({"cpm15": -0.05})))
    for name in SIZES:
        assert name in text
    assert "do not adopt" in text and "loses on cpm15" in text


def test_bootstrap_interval_covers_the_mean_and_needs_images():
    low, high = bootstrap_interval([0.1, 0.2, 0.3, 0.4])
    assert low < 0.25 < high and low >= 0.1 and high <= 0.4
    assert bootstrap_interval([0.2] * 5) == (pytest.approx(0.2), pytest.approx(0.2))
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_images_must_be_the_same_for_both():
    partial = dict(list(DEFAULT.items())[:-1])
    with pytest.raises(ValueError, match="different images"):
        verdict(DEFAULT, partial)


def _halves(rows: dict[str, dict[str, object]]) -> dict[str, str]:
    return {image: ("select" if int(image.split("/")[1]) % 2 == 0 else "report") for image in rows}


def test_a_value_best_on_both_halves_is_taken():
    per_value = {0.5: DEFAULT, 0.4: scores({"monuseg": 0.02, "tnbc": 0.02, "cpm15": 0.02})}
    check = cross_check("threshold", 0.5, per_value, _halves(DEFAULT))
    assert check.chosen == 0.4 and check.best == {"select": 0.4, "report": 0.4}


def test_values_best_on_different_halves_that_both_beat_the_principled_one_give_the_best_worse_half():
    per_value = {
        0.5: DEFAULT,
        0.4: scores({"monuseg": 0.02, "tnbc": 0.02, "cpm15": 0.02}),
        0.3: {  # best on select, but on report only a little better than 0.5
            image: {**row, "aji": float(row["aji"]) + (0.04 if int(image.split("/")[1]) % 2 == 0 else 0.005)}  # type: ignore[arg-type]
            for image, row in DEFAULT.items()
        },
    }
    check = cross_check("threshold", 0.5, per_value, _halves(DEFAULT))
    assert check.best == {"select": 0.3, "report": 0.4}
    assert check.chosen == 0.4


def test_a_value_best_on_one_half_and_worse_on_the_other_keeps_the_principled_value():
    better_on_even = {
        image: {**row, "aji": float(row["aji"]) + (0.05 if int(image.split("/")[1]) % 2 == 0 else -0.05)}  # type: ignore[arg-type]
        for image, row in DEFAULT.items()
    }
    better_on_odd = {
        image: {**row, "aji": float(row["aji"]) + (-0.05 if int(image.split("/")[1]) % 2 == 0 else 0.05)}  # type: ignore[arg-type]
        for image, row in DEFAULT.items()
    }
    check = cross_check("threshold", 0.5, {0.5: DEFAULT, 0.3: better_on_even, 0.4: better_on_odd}, _halves(DEFAULT))
    assert check.best == {"select": 0.3, "report": 0.4}
    assert check.chosen == 0.5 and "does not beat 0.5" in check.reason
    with pytest.raises(ValueError):
        cross_check("threshold", 0.6, {0.5: DEFAULT}, _halves(DEFAULT))
