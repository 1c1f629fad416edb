"""Metric definitions checked on hand-computed label images and against a naive reference."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from wsi_grunet.errors import WsiGrunetError
from wsi_grunet.evaluate.metrics import (
    EvaluationError,
    aji,
    aji_plus,
    evaluate_pair,
    pair_counts,
    panoptic_quality,
    pixel_dice,
    pixel_iou,
    remap_label,
    soft_dice,
    soft_iou,
)


def approx(frac: Fraction):
    return pytest.approx(float(frac), rel=1e-12, abs=1e-12)


# Case A (6x6): two true nuclei, three predictions.
#   truth                 prediction
#   1 1 1 . . .           1 1 2 2 . .
#   1 1 1 . . .           1 1 2 2 . .
#   1 1 1 . . .           1 1 . . . .
#   . . . 2 2 .           . . . . 3 3
#   . . . 2 2 .           . . . . 3 3
#   . . . . . .           . . . . . .
# Areas: T1 9, T2 4; P1 6, P2 4, P3 4.
# Overlaps: T1∩P1 6 (IoU 6/9 = 2/3), T1∩P2 2 (IoU 2/11), T2∩P3 2 (IoU 2/6 = 1/3).
CASE_A_TRUE = np.array(
    [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 2, 2, 0],
        [0, 0, 0, 2, 2, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=np.uint16,
)
CASE_A_PRED = np.array(
    [
        [1, 1, 2, 2, 0, 0],
        [1, 1, 2, 2, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 3, 3],
        [0, 0, 0, 0, 3, 3],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=np.int32,
)

# Case B (4x6): one prediction is the best match of both true nuclei, so AJI and AJI+ differ.
#   truth          prediction
#   1 1 1 2 2 2    1 1 1 1 1 2
#   1 1 1 2 2 2    1 1 1 1 1 2
#   1 1 1 2 2 2    1 1 1 1 1 2
#   . . . . . .    . . . . . 2
# Areas: T1 9, T2 9; P1 15, P2 4.
# T1∩P1 9 (IoU 9/15 = 3/5), T2∩P1 6 (IoU 6/18 = 1/3), T2∩P2 3 (IoU 3/10).
CASE_B_TRUE = np.zeros((4, 6), dtype=np.uint16)
CASE_B_TRUE[0:3, 0:3] = 1
CASE_B_TRUE[0:3, 3:6] = 2
CASE_B_PRED = np.zeros((4, 6), dtype=np.uint16)
CASE_B_PRED[0:3, 0:5] = 1
CASE_B_PRED[0:4, 5] = 2


def test_case_a_pixel_metrics():
    # foreground: truth 13, prediction 14, shared 6 + 2 + 2 = 10
    assert pixel_dice(CASE_A_TRUE, CASE_A_PRED) == approx(Fraction(20, 27))
    assert pixel_iou(CASE_A_TRUE, CASE_A_PRED) == approx(Fraction(10, 17))


def test_case_a_aji_and_aji_plus():
    # T1 -> P1 (I 6, U 9), T2 -> P3 (I 2, U 6), P2 unused adds 4 to the union: 8 / 19.
    # The unique pairing is the same here, so AJI+ is 8 / 19 too.
    assert aji(CASE_A_TRUE, CASE_A_PRED) == approx(Fraction(8, 19))
    assert aji_plus(CASE_A_TRUE, CASE_A_PRED) == approx(Fraction(8, 19))


def test_case_a_panoptic_quality_at_half():
    # Only T1-P1 has IoU > 0.5: TP 1, FP 2, FN 1. DQ = 1 / (1 + 1 + 0.5) = 2/5, SQ = 2/3.
    dq, sq, pq, tp, fp, fn = panoptic_quality(CASE_A_TRUE, CASE_A_PRED)
    assert (tp, fp, fn) == (1, 2, 1)
    assert dq == approx(Fraction(2, 5))
    assert sq == approx(Fraction(2, 3))
    assert pq == approx(Fraction(4, 15))


def test_case_a_panoptic_quality_at_lower_threshold():
    # At 0.3, T2-P3 (1/3) also qualifies: TP 2, FP 1, FN 0. DQ = 2 / 2.5 = 4/5,
    # SQ = (2/3 + 1/3) / 2 = 1/2, PQ = 2/5.
    dq, sq, pq, tp, fp, fn = panoptic_quality(CASE_A_TRUE, CASE_A_PRED, match_iou=0.3)
    assert (tp, fp, fn) == (2, 1, 0)
    assert dq == approx(Fraction(4, 5))
    assert sq == approx(Fraction(1, 2))
    assert pq == approx(Fraction(2, 5))


def test_case_b_aji_counts_a_shared_prediction_twice():
    # AJI: T1 -> P1 (3/5; I 9, U 15), T2 -> P1 (1/3 beats 3/10; I 6, U 18), P2 unused (+4).
    # AJI = 15 / 37. AJI+ pairs T1-P1 and T2-P2 (3/5 + 3/10 > 1/3): I 9 + 3, U 15 + 10 = 12/25.
    assert aji(CASE_B_TRUE, CASE_B_PRED) == approx(Fraction(15, 37))
    assert aji_plus(CASE_B_TRUE, CASE_B_PRED) == approx(Fraction(12, 25))
    # PQ: only T1-P1 exceeds 0.5: TP 1, FP 1, FN 1, DQ 1/2, SQ 3/5, PQ 3/10
    dq, sq, pq, tp, fp, fn = panoptic_quality(CASE_B_TRUE, CASE_B_PRED)
    assert (tp, fp, fn) == (1, 1, 1)
    assert (dq, sq, pq) == (approx(Fraction(1, 2)), approx(Fraction(3, 5)), approx(Fraction(3, 10)))


# Case C (1x20), a strip: the best pair of T1 would block a better global matching.
#   columns   0-3  4-9  10-13 14-19
#   truth      1    1     2     2        T1 = 0-9 (10 px), T2 = 10-19 (10 px)
#   pred       2    1     1     .        P1 = 4-13 (10 px), P2 = 0-3 (4 px)
# T1∩P1 6 (IoU 6/14 = 3/7), T2∩P1 4 (IoU 4/16 = 1/4), T1∩P2 4 (IoU 4/10 = 2/5).
CASE_C_TRUE = np.zeros((1, 20), dtype=np.int32)
CASE_C_TRUE[0, 0:10] = 1
CASE_C_TRUE[0, 10:20] = 2
CASE_C_PRED = np.zeros((1, 20), dtype=np.int32)
CASE_C_PRED[0, 4:14] = 1
CASE_C_PRED[0, 0:4] = 2


def test_case_c_hungarian_beats_greedy():
    # AJI: T1 -> P1 (I 6, U 14), T2 -> P1 (I 4, U 16), P2 unused (+4): 10 / 34 = 5/17.
    assert aji(CASE_C_TRUE, CASE_C_PRED) == approx(Fraction(5, 17))
    # AJI+: {T1-P2, T2-P1} sums 2/5 + 1/4 = 13/20 > 3/7: I 4 + 4, U 10 + 16 = 8/26 = 4/13.
    assert aji_plus(CASE_C_TRUE, CASE_C_PRED) == approx(Fraction(4, 13))
    # PQ at 0.2 uses the same unique pairing: TP 2, DQ 1, SQ = 13/40, PQ 13/40.
    dq, sq, pq, tp, fp, fn = panoptic_quality(CASE_C_TRUE, CASE_C_PRED, match_iou=0.2)
    assert (tp, fp, fn) == (2, 0, 0)
    assert (dq, sq, pq) == (1.0, approx(Fraction(13, 40)), approx(Fraction(13, 40)))
    # at 0.5 nothing qualifies: no TP means SQ 0 and PQ 0
    assert panoptic_quality(CASE_C_TRUE, CASE_C_PRED) == (0.0, 0.0, 0.0, 0, 2, 2)


def test_pq_threshold_is_strict():
    # a 2-px prediction inside a 4-px nucleus has IoU exactly 1/2
    true = np.array([[1, 1, 1, 1]])
    pred = np.array([[0, 7, 7, 0]])
    assert panoptic_quality(true, pred, 0.5)[3:] == (0, 1, 1)
    assert panoptic_quality(true, pred, 0.49)[3:] == (1, 0, 0)


def test_soft_dice_and_iou_by_hand():
    y = np.array([[1, 1, 0, 0]])
    p = np.array([[1.0, 0.5, 0.5, 0.0]])
    # Σyp = 1.5, Σy = 2, Σp = 2: Dice 3/4, IoU 1.5 / 2.5 = 3/5
    assert soft_dice(y, p, eps=0.0) == approx(Fraction(3, 4))
    assert soft_iou(y, p, eps=0.0) == approx(Fraction(3, 5))
    # the default eps only moves the value by ~1e-8 here
    assert soft_dice(y, p) == pytest.approx(0.75, abs=1e-7)
    # nothing true, nothing predicted: eps / eps
    zeros = np.zeros((3, 3))
    assert soft_dice(zeros, zeros) == 1.0
    assert soft_iou(zeros, zeros) == 1.0


def test_evaluate_pair_with_probabilities():
    prob = np.zeros(CASE_A_TRUE.shape)
    prob[0:3, 0:3] = 0.9  # covers T1 exactly
    prob[3, 3] = 0.5  # not above the threshold
    prob[5, 5] = 0.75  # a false positive pixel
    m = evaluate_pair(CASE_A_TRUE, CASE_A_PRED, prob=prob, threshold=0.5)
    # thresholded mask: 9 px of T1 + 1 stray px; truth 13 px; shared 9: Dice 18/23, IoU 9/14
    assert m["dice_thresholded"] == approx(Fraction(18, 23))
    assert m["iou_thresholded"] == approx(Fraction(9, 14))
    # Σyp = 8.1 + 0.5 = 8.6, Σy = 13, Σp = 8.1 + 0.5 + 0.75 = 9.35
    assert m["soft_dice"] == pytest.approx((17.2 + 1e-7) / (22.35 + 1e-7), rel=1e-12)
    assert m["soft_iou"] == pytest.approx((8.6 + 1e-7) / (13.75 + 1e-7), rel=1e-12)
    assert m["soft_dice"] == pytest.approx(soft_dice(CASE_A_TRUE, prob), rel=1e-12)
    # the pixel metrics still describe the predicted instances, not the probability map
    assert m["dice"] == approx(Fraction(20, 27))
    assert "soft_dice" not in evaluate_pair(CASE_A_TRUE, CASE_A_PRED)


def test_evaluate_pair_keys_and_types():
    m = evaluate_pair(CASE_A_TRUE, CASE_A_PRED)
    assert list(m) == [
        "dice", "iou", "aji", "aji_plus", "dq", "sq", "pq", "tp", "fp", "fn", "n_true", "n_pred",
    ]  # fmt: skip
    assert (m["n_true"], m["n_pred"]) == (2, 3)
    assert all(type(v) in (int, float) for v in m.values())


def test_empty_prediction():
    m = evaluate_pair(CASE_A_TRUE, np.zeros_like(CASE_A_PRED))
    for key in ("dice", "iou", "aji", "aji_plus", "dq", "sq", "pq"):
        assert m[key] == 0.0, key
    assert (m["tp"], m["fp"], m["fn"], m["n_pred"]) == (0, 0, 2, 0)


def test_empty_truth():
    m = evaluate_pair(np.zeros_like(CASE_A_TRUE), CASE_A_PRED)
    for key in ("dice", "iou", "aji", "aji_plus", "dq", "sq", "pq"):
        assert m[key] == 0.0, key
    assert (m["tp"], m["fp"], m["fn"], m["n_true"]) == (0, 3, 0, 0)


def test_both_empty_is_perfect_and_never_nan():
    zeros = np.zeros((5, 7), dtype=np.uint16)
    m = evaluate_pair(zeros, zeros, prob=np.zeros((5, 7)))
    for key in ("dice", "iou", "dice_thresholded", "iou_thresholded", "soft_dice", "soft_iou",
                "aji", "aji_plus", "dq", "sq", "pq"):  # fmt: skip
        assert m[key] == 1.0, key
    assert panoptic_quality(zeros, zeros) == (1.0, 1.0, 1.0, 0, 0, 0)


def test_perfect_prediction_with_other_ids():
    rng = np.random.default_rng(3)
    true = _random_labels(rng, shape=(48, 40), n=12)
    ids = np.unique(true[true > 0])
    new_ids = rng.permutation(ids.size) * 1000 + 70_000  # scattered, shuffled ids
    lut = np.zeros(true.max() + 1, dtype=np.int64)
    lut[ids] = new_ids
    pred = lut[true]
    m = evaluate_pair(true, pred)
    for key in ("dice", "iou", "aji", "aji_plus", "dq", "sq", "pq"):
        assert m[key] == 1.0, key
    assert m["tp"] == m["n_true"] == m["n_pred"] == ids.size


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_permutation_invariance(seed):
    rng = np.random.default_rng(seed)
    true = _random_labels(rng, shape=(64, 64), n=25)
    pred = _random_labels(rng, shape=(64, 64), n=25)
    before = evaluate_pair(true, pred)
    after = evaluate_pair(_shuffle_ids(true, rng), _shuffle_ids(pred, rng).astype(np.uint32))
    assert after == pytest.approx(before, rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("match_iou", [0.5, 0.3, 0.1])
def test_matches_naive_reference(seed, match_iou):
    rng = np.random.default_rng(100 + seed)
    true = _random_labels(rng, shape=(50, 60), n=20)
    pred = _random_labels(rng, shape=(50, 60), n=22)
    ref = _naive_metrics(true, pred, match_iou)
    dq, sq, pq, tp, fp, fn = panoptic_quality(true, pred, match_iou)
    assert (tp, fp, fn) == ref["counts"]
    assert (dq, sq, pq) == pytest.approx(ref["pq"], rel=1e-12)
    assert aji(true, pred) == pytest.approx(ref["aji"], rel=1e-12)
    assert aji_plus(true, pred) == pytest.approx(ref["aji_plus"], rel=1e-12)


def test_remap_label_is_contiguous_and_keeps_order():
    labels = np.array([[0, 4_000_000_000, 7], [7, 0, 12]], dtype=np.uint32)
    out = remap_label(labels)
    assert out.tolist() == [[0, 3, 1], [1, 0, 2]]
    assert out.dtype == np.int32
    # no background at all still starts at 1
    assert remap_label(np.array([[5, 9]])).tolist() == [[1, 2]]
    assert remap_label(np.zeros((2, 2), dtype=np.int64)).tolist() == [[0, 0], [0, 0]]


def test_counts_add_up_to_dataset_level_metrics():
    total = pair_counts(CASE_A_TRUE, CASE_A_PRED) + pair_counts(CASE_B_TRUE, CASE_B_PRED)
    m = total.metrics()
    # AJI (8 + 15) / (19 + 37); Dice 2 (10 + 18) / (13 + 14 + 18 + 19)
    assert m["aji"] == approx(Fraction(23, 56))
    assert m["dice"] == approx(Fraction(7, 8))
    # PQ: TP 2, FP 3, FN 2, ΣIoU 2/3 + 3/5 = 19/15: DQ 4/9, SQ 19/30
    assert (m["tp"], m["fp"], m["fn"]) == (2, 3, 2)
    assert m["pq"] == approx(Fraction(4, 9) * Fraction(19, 30))
    with_prob = pair_counts(CASE_A_TRUE, CASE_A_PRED, prob=np.zeros(CASE_A_TRUE.shape))
    with pytest.raises(EvaluationError, match="probability"):
        total + with_prob


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: evaluate_pair(np.zeros((4, 4), int), np.zeros((4, 5), int)), "shapes differ"),
        (lambda: aji(np.zeros((4, 4), int), np.zeros((5, 4), int)), "shapes differ"),
        (lambda: evaluate_pair(np.zeros((4, 4)), np.zeros((4, 4), int)), "integer"),
        (lambda: evaluate_pair(-np.ones((4, 4), int), np.zeros((4, 4), int)), ">= 0"),
        (lambda: evaluate_pair(np.zeros((2, 4, 4), int), np.zeros((2, 4, 4), int)), "2-D"),
        (lambda: soft_dice(np.zeros((2, 2)), np.full((2, 2), 1.5)), r"\[0, 1\]"),
        (lambda: soft_dice(np.zeros((2, 2)), np.full((2, 2), np.nan)), "finite"),
        (lambda: soft_dice(np.zeros((2, 2)), np.full((2, 2), 200, np.uint8)), "floating"),
        (lambda: evaluate_pair(CASE_A_TRUE, CASE_A_PRED, prob=np.zeros((3, 3))), "shapes differ"),
        (lambda: panoptic_quality(CASE_A_TRUE, CASE_A_PRED, match_iou=1.5), "match_iou"),
    ],
)
def test_bad_input_raises_project_error(call, message):
    with pytest.raises(EvaluationError, match=message) as info:
        call()
    assert isinstance(info.value, WsiGrunetError)


# --------------------------------------------------------------------------- helpers


def _random_labels(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Overlapping random rectangles painted in order: later ones cover earlier ones."""
    labels = np.zeros(shape, dtype=np.int32)
    for i in range(1, n + 1):
        h, w = rng.integers(3, 12, size=2)
        y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        labels[y : y + h, x : x + w] = i
    return labels


def _shuffle_ids(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ids = np.unique(labels[labels > 0])
    lut = np.zeros(labels.max() + 1, dtype=np.int64)
    # distinct, scattered ids in random order
    lut[ids] = rng.choice(10**6, size=ids.size, replace=False) + 1
    return lut[labels]


def _naive_metrics(true: np.ndarray, pred: np.ndarray, match_iou: float) -> dict:
    """Textbook versions with one boolean mask per instance and dense matrices."""
    t_masks = [true == i for i in np.unique(true) if i]
    p_masks = [pred == j for j in np.unique(pred) if j]
    inter = np.array([[np.sum(a & b) for b in p_masks] for a in t_masks], dtype=float)
    union = np.array([[np.sum(a | b) for b in p_masks] for a in t_masks], dtype=float)
    iou = inter / union
    t_area = np.array([a.sum() for a in t_masks])
    p_area = np.array([b.sum() for b in p_masks])

    # AJI: best prediction of each true nucleus, unused predictions join the union
    num = den = 0.0
    used = set()
    for i in range(len(t_masks)):
        if iou[i].max() > 0:
            j = int(np.argmax(iou[i]))
            num, den = num + inter[i, j], den + union[i, j]
            used.add(j)
        else:
            den += t_area[i]
    den += sum(p_area[j] for j in range(len(p_masks)) if j not in used)
    result = {"aji": num / den}

    # AJI+: dense Hungarian on IoU
    rows, cols = linear_sum_assignment(iou, maximize=True)
    keep = iou[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    num = inter[rows, cols].sum()
    den = union[rows, cols].sum() + np.delete(t_area, rows).sum() + np.delete(p_area, cols).sum()
    result["aji_plus"] = num / den

    # PQ: dense Hungarian on the qualifying IoUs only
    eligible = np.where(iou > match_iou, iou, 0.0)
    rows, cols = linear_sum_assignment(eligible, maximize=True)
    matched = eligible[rows, cols][eligible[rows, cols] > 0]
    tp = matched.size
    fp, fn = len(p_masks) - tp, len(t_masks) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = matched.sum() / tp if tp else 0.0
    result["counts"] = (tp, fp, fn)
    result["pq"] = (dq, sq, dq * sq)
    return result
