"""Segmentation metrics (pixel Dice/IoU, soft Dice/IoU, AJI, AJI+, PQ) and folder evaluation."""

from wsi_grunet.evaluate.evaluate import (
    evaluate_dirs,
    format_table,
    read_label_image,
    read_prob_map,
    write_json,
)
from wsi_grunet.evaluate.metrics import (
    EvaluationError,
    PairCounts,
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

__all__ = [
    "EvaluationError",
    "PairCounts",
    "aji",
    "aji_plus",
    "evaluate_dirs",
    "evaluate_pair",
    "format_table",
    "pair_counts",
    "panoptic_quality",
    "pixel_dice",
    "pixel_iou",
    "read_label_image",
    "read_prob_map",
    "remap_label",
    "soft_dice",
    "soft_iou",
    "write_json",
]
