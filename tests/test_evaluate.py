"""Folder evaluation on label images written to disk by the tests (and MoNuSeg when present)."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_grunet.errors import OutputError, WsiGrunetError
from wsi_grunet.evaluate import (
    EvaluationError,
    evaluate_dirs,
    evaluate_pair,
    format_table,
    read_label_image,
    soft_dice,
    write_json,
)

# The two hand-computed cases of test_metrics.py (see the drawings and fractions there).
CASE_A_TRUE = np.zeros((6, 6), dtype=np.uint16)
CASE_A_TRUE[0:3, 0:3] = 1
CASE_A_TRUE[3:5, 3:5] = 2
CASE_A_PRED = np.zeros((6, 6), dtype=np.uint16)
CASE_A_PRED[0:3, 0:2] = 1
CASE_A_PRED[0:2, 2:4] = 2
CASE_A_PRED[3:5, 4:6] = 3
CASE_B_TRUE = np.zeros((4, 6), dtype=np.uint16)
CASE_B_TRUE[0:3, 0:3] = 1
CASE_B_TRUE[0:3, 3:6] = 2
CASE_B_PRED = np.zeros((4, 6), dtype=np.uint16)
CASE_B_PRED[0:3, 0:5] = 1
CASE_B_PRED[0:4, 5] = 2

STEM_A = "TCGA-AA-0001-01Z-00-DX1"
STEM_B = "TCGA-BB-0002-01Z-00-DX1"


def approx(frac: Fraction):
    return pytest.approx(float(frac), rel=1e-12, abs=1e-12)


def _png16(path: Path, labels: np.ndarray) -> Path:
    Image.fromarray(labels.astype(np.uint16)).save(path)
    return path


def _tif32(path: Path, labels: np.ndarray) -> Path:
    tifffile.imwrite(path, labels.astype(np.int32))
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Truth as uint16 PNG; predictions as one uint16 PNG and one int32 TIFF."""
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir()
    pred.mkdir()
    _png16(truth / f"{STEM_A}.png", CASE_A_TRUE)
    _png16(truth / f"{STEM_B}.png", CASE_B_TRUE)
    _png16(pred / f"{STEM_A}.png", CASE_A_PRED)
    _tif32(pred / f"{STEM_B}.tif", CASE_B_PRED)
    (pred / "notes.txt").write_text("not an image, ignored")
    return pred, truth


def test_label_images_round_trip_through_disk(tmp_path):
    big = np.array([[0, 70_000], [3, 2**31 - 1]], dtype=np.int32)
    assert np.array_equal(read_label_image(_tif32(tmp_path / "a.tiff", big)), big)
    assert np.array_equal(read_label_image(_png16(tmp_path / "b.png", CASE_A_TRUE)), CASE_A_TRUE)


def test_per_image_mean_and_aggregate(dirs):
    pred, truth = dirs
    result = evaluate_dirs(pred, truth)
    assert list(result["images"]) == [STEM_A, STEM_B]
    a, b = result["images"][STEM_A], result["images"][STEM_B]
    assert a == evaluate_pair(CASE_A_TRUE, CASE_A_PRED)
    # hand values (see test_metrics): image A AJI 8/19, image B AJI 15/37, AJI+ 12/25
    assert a["aji"] == approx(Fraction(8, 19))
    assert b["aji"] == approx(Fraction(15, 37))
    assert b["aji_plus"] == approx(Fraction(12, 25))

    mean = result["mean"]
    assert mean["aji"] == pytest.approx((8 / 19 + 15 / 37) / 2, rel=1e-12)
    assert mean["n_pred"] == 2.5  # (3 + 2) / 2

    agg = result["aggregate"]
    # Dice over all pixels: 2 (10 + 18) / (13 + 14 + 18 + 19) = 7/8
    assert agg["dice"] == approx(Fraction(7, 8))
    # AJI from summed intersections and unions: (8 + 15) / (19 + 37)
    assert agg["aji"] == approx(Fraction(23, 56))
    # AJI+: (8 + 12) / (19 + 25)
    assert agg["aji_plus"] == approx(Fraction(20, 44))
    # PQ from summed TP 2, FP 3, FN 2 and ΣIoU 2/3 + 3/5: DQ 4/9, SQ 19/30
    assert (agg["tp"], agg["fp"], agg["fn"], agg["n_true"], agg["n_pred"]) == (2, 3, 2, 4, 5)
    assert agg["dq"] == approx(Fraction(4, 9))
    assert agg["sq"] == approx(Fraction(19, 30))
    assert agg["pq"] == approx(Fraction(4, 9) * Fraction(19, 30))
    # the dataset-level value is not the mean of the per-image values
    assert agg["aji"] != pytest.approx(mean["aji"])


def test_probability_maps_png_and_npy(dirs, tmp_path):
    pred, truth = dirs
    prob_dir = tmp_path / "prob"
    prob_dir.mkdir()
    prob_a = np.zeros(CASE_A_TRUE.shape, dtype=np.uint8)
    prob_a[CASE_A_PRED > 0] = 255  # certain wherever an instance was predicted
    Image.fromarray(prob_a).save(prob_dir / f"{STEM_A}_prob.png")
    prob_b = np.where(CASE_B_TRUE > 0, 0.75, 0.25)
    np.save(prob_dir / f"{STEM_B}_prob.npy", prob_b)

    result = evaluate_dirs(pred, truth, prob_dir=prob_dir)
    a, b = result["images"][STEM_A], result["images"][STEM_B]
    # a probability of exactly 1 on the predicted mask makes soft and hard Dice agree
    assert a["soft_dice"] == pytest.approx(a["dice"], abs=1e-7)
    assert a["dice_thresholded"] == a["dice"]
    assert b["soft_dice"] == pytest.approx(soft_dice(CASE_B_TRUE, prob_b), rel=1e-12)
    assert b["dice_thresholded"] == 1.0  # 0.75 > 0.5 exactly on the true foreground
    # aggregate soft Dice over all pixels: Σyp = 10 + 13.5, Σy = 13 + 18, Σp = 14 + 13.5 + 1.5
    assert result["aggregate"]["soft_dice"] == pytest.approx(47 / 60, abs=1e-7)


def test_probability_maps_next_to_predictions(dirs):
    pred, truth = dirs
    np.save(pred / f"{STEM_A}_prob.npy", np.zeros(CASE_A_TRUE.shape))
    Image.fromarray(np.zeros(CASE_B_TRUE.shape, np.uint8)).save(pred / f"{STEM_B}_prob.png")
    result = evaluate_dirs(pred, truth, prob_dir=pred)
    assert list(result["images"]) == [STEM_A, STEM_B]
    assert result["images"][STEM_B]["dice_thresholded"] == 0.0


def test_missing_files_are_listed_both_ways(dirs):
    pred, truth = dirs
    _png16(pred / "extra-pred.png", CASE_A_PRED)
    _png16(truth / "extra-truth.tif", CASE_A_TRUE)
    with pytest.raises(EvaluationError) as info:
        evaluate_dirs(pred, truth)
    message = str(info.value)
    assert "predictions without ground truth" in message and "extra-pred" in message
    assert "ground truth without predictions" in message and "extra-truth" in message
    assert STEM_A not in message


def test_shape_mismatch_names_both_files(dirs):
    pred, truth = dirs
    _png16(pred / f"{STEM_A}.png", np.zeros((6, 7), np.uint16))
    with pytest.raises(EvaluationError, match="shape mismatch") as info:
        evaluate_dirs(pred, truth)
    assert str(pred / f"{STEM_A}.png") in str(info.value)
    assert str(truth / f"{STEM_A}.png") in str(info.value)


def test_missing_and_ambiguous_probability_maps(dirs, tmp_path):
    pred, truth = dirs
    prob_dir = tmp_path / "prob"
    prob_dir.mkdir()
    np.save(prob_dir / f"{STEM_A}_prob.npy", np.zeros(CASE_A_TRUE.shape))
    with pytest.raises(EvaluationError, match=STEM_B):
        evaluate_dirs(pred, truth, prob_dir=prob_dir)
    np.save(prob_dir / f"{STEM_B}_prob.npy", np.zeros(CASE_B_TRUE.shape))
    Image.fromarray(np.zeros(CASE_B_TRUE.shape, np.uint8)).save(prob_dir / f"{STEM_B}_prob.png")
    with pytest.raises(EvaluationError, match="keep one"):
        evaluate_dirs(pred, truth, prob_dir=prob_dir)
    (prob_dir / f"{STEM_B}_prob.png").unlink()
    np.save(prob_dir / f"{STEM_B}_prob.npy", np.full(CASE_B_TRUE.shape, 2.0))
    with pytest.raises(EvaluationError, match=r"\[0, 1\]"):
        evaluate_dirs(pred, truth, prob_dir=prob_dir)
    np.save(prob_dir / f"{STEM_B}_prob.npy", np.zeros((2, 2)))
    with pytest.raises(EvaluationError, match="shape mismatch"):
        evaluate_dirs(pred, truth, prob_dir=prob_dir)


def test_bad_label_files(dirs):
    pred, truth = dirs
    target = pred / f"{STEM_B}.tif"
    target.unlink()
    rgb = pred / f"{STEM_B}.png"
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(rgb)
    with pytest.raises(EvaluationError, match="single-channel") as info:
        evaluate_dirs(pred, truth)
    assert str(rgb) in str(info.value)

    rgb.unlink()
    tifffile.imwrite(target, np.zeros((4, 6), np.float32))
    with pytest.raises(EvaluationError, match="integers"):
        evaluate_dirs(pred, truth)

    target.write_bytes(b"not a tiff at all")
    with pytest.raises(EvaluationError, match="cannot read") as info:
        evaluate_dirs(pred, truth)
    assert str(target) in str(info.value)


def test_duplicate_stems_and_empty_folders(dirs, tmp_path):
    pred, truth = dirs
    _tif32(truth / f"{STEM_A}.tiff", CASE_A_TRUE)
    with pytest.raises(EvaluationError, match="share the stem"):
        evaluate_dirs(pred, truth)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvaluationError, match="no label images"):
        evaluate_dirs(empty, truth)
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate_dirs(tmp_path / "nowhere", truth)


def test_json_and_table_with_an_empty_image(dirs):
    pred, truth = dirs
    blank = np.zeros((5, 5), np.uint16)
    _png16(pred / "blank.png", blank)
    _png16(truth / "blank.png", blank)
    result = evaluate_dirs(pred, truth)
    assert result["images"]["blank"]["pq"] == 1.0

    out = pred.parent / "reports" / "metrics.json"
    write_json(result, out)
    write_json(result, out)  # overwriting goes through the same rename
    assert json.loads(out.read_text()) == result
    assert sorted(os.listdir(out.parent)) == ["metrics.json"]  # no temporary files left behind

    table = format_table(result)
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # fixed width
    names = [line.split()[0] for line in lines if not line.startswith("-")]
    assert names == ["image", STEM_A, STEM_B, "blank", "mean", "aggregate"]
    assert f"{result['aggregate']['pq']:.4f}" in lines[-1]


def test_write_json_reports_unwritable_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write") as info:
        write_json({"images": {}}, blocker / "metrics.json")
    assert isinstance(info.value, WsiGrunetError)
    assert str(blocker / "metrics.json") in str(info.value)
    with pytest.raises(OutputError):
        write_json({"bad": float("nan")}, tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.shared
def test_monuseg_instances_inside_filled_instances(shared_dir, tmp_path):
    """masks_instance_filled grows every masks_instance nucleus, keeping its id.

    Then each grown nucleus pairs with its own core, so AJI = AJI+ = |core pixels| / |grown
    pixels| and Dice = 2|core| / (|core| + |grown|), computed here directly from the pixels.
    """
    root = shared_dir / "data" / "monuseg2018-train"
    names = sorted(p.name for p in (root / "masks_instance").glob("*.png"))[:2]
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    core_px = grown_px = 0
    for name in names:
        core = read_label_image(root / "masks_instance" / name)
        grown = read_label_image(root / "masks_instance_filled" / name)
        inside = core > 0
        assert np.array_equal(grown[inside], core[inside])  # the premise of this check
        core_px += int(inside.sum())
        grown_px += int((grown > 0).sum())
        (pred / name).symlink_to(root / "masks_instance" / name)
        (truth / name).symlink_to(root / "masks_instance_filled" / name)

    result = evaluate_dirs(pred, truth)
    agg = result["aggregate"]
    assert agg["aji"] == pytest.approx(core_px / grown_px, rel=1e-12)
    assert agg["aji_plus"] == pytest.approx(core_px / grown_px, rel=1e-12)
    assert agg["dice"] == pytest.approx(2 * core_px / (core_px + grown_px), rel=1e-12)
    assert agg["n_true"] == agg["n_pred"] > 500
    assert 0.8 < agg["aji"] < 1.0


def test_evaluate_images_scores_at_the_images_resolution(tmp_path):
    """``evaluate --images`` segments at the images' own pixel size (0.25 um/px, model 0.5) and
    scores against truth of that size: synthetic discs are found one for one."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from wsi_grunet.cli import main

    from synthetic import synthetic_rgb

    images, truth_dir = tmp_path / "images", tmp_path / "truth"
    images.mkdir()
    truth_dir.mkdir()
    rgb, truth = synthetic_rgb(512, 384, mpp=0.25, seed=1)
    Image.fromarray(rgb).save(images / "discs.png")
    yy, xx = np.mgrid[: rgb.shape[0], : rgb.shape[1]] + 0.5
    labels = np.zeros(rgb.shape[:2], np.uint16)
    for k, ((cy, cx), r) in enumerate(zip(truth["centres"], truth["radii"]), start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    _png16(truth_dir / "discs.png", labels)
    out = tmp_path / "metrics.json"
    assert (
        main(
            [
                "evaluate",
                "--images",
                str(images),
                "--truth",
                str(truth_dir),
                "--mpp",
                "0.25",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    agg = json.loads(out.read_text())["aggregate"]
    assert agg["n_true"] == agg["n_pred"] == len(truth["radii"]) >= 5
    assert agg["tp"] == agg["n_true"]
    assert agg["dice"] > 0.95 and agg["aji"] > 0.9
