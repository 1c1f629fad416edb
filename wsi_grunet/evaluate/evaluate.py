"""Evaluate a folder of predicted label images against a folder of ground truth.

Files are paired by stem: ``pred_dir/TCGA-xx.png`` is compared with ``truth_dir/TCGA-xx.png``
(or ``.tif`` / ``.tiff``). Label images are single-channel integer images (uint8, uint16, int32,
...), 0 = background. Optional probability maps live in ``prob_dir`` as ``<stem>_prob.png``
(uint8, 0..255 read as /255; uint16 read as /65535) or ``<stem>_prob.npy`` (float in [0, 1]).

The result has three parts: per-image metrics, their unweighted mean over images, and the
dataset-level aggregate computed from counts summed over all images (pixel Dice over all
pixels, AJI from summed intersections and unions, PQ from summed TP/FP/FN and IoU, as CoNIC).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from wsi_grunet.errors import OutputError
from wsi_grunet.evaluate.metrics import EvaluationError, PairCounts, pair_counts

LABEL_SUFFIXES = (".png", ".tif", ".tiff")
PROB_SUFFIX = "_prob"


# --------------------------------------------------------------------------- reading


def _index_dir(directory: Path, what: str, skip_prob: bool = False) -> dict[str, Path]:
    """Map stem -> label image path for the label images directly inside ``directory``."""
    if not directory.is_dir():
        raise EvaluationError(f"{what} folder {directory} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix.lower() not in LABEL_SUFFIXES:
            continue
        if path.name.startswith("."):
            continue
        if skip_prob and path.stem.endswith(PROB_SUFFIX):
            continue
        if path.stem in found:
            raise EvaluationError(
                f"{what} folder {directory}: two images share the stem {path.stem!r}: "
                f"{found[path.stem].name} and {path.name}"
            )
        found[path.stem] = path
    if not found:
        raise EvaluationError(f"{what} folder {directory} holds no label images ({', '.join(LABEL_SUFFIXES)})")
    return found


def _squeeze_2d(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    if arr.ndim > 2:
        arr = arr.squeeze()
    if arr.ndim != 2:
        raise EvaluationError(f"{path}: expected a single-channel 2-D {what}, got shape {arr.shape}")
    return arr


def read_label_image(path: Path) -> np.ndarray:
    """Read a single-channel integer label image (PNG or TIFF); 0 = background."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".png":
            with Image.open(path) as im:
                if im.mode not in ("1", "L", "P", "I;16", "I;16B", "I;16L", "I"):
                    raise EvaluationError(f"{path}: expected a single-channel label image, got PNG mode {im.mode}")
                arr = np.array(im)
        else:
            arr = tifffile.imread(path)
    except EvaluationError:
        raise
    except Exception as exc:  # PIL and tifffile raise many unrelated types for bad files
        raise EvaluationError(f"{path}: cannot read label image ({exc})") from exc
    arr = _squeeze_2d(np.asarray(arr), path, "label image")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise EvaluationError(f"{path}: label image must hold integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.size and arr.min() < 0:
        raise EvaluationError(f"{path}: label image has negative values (min {arr.min()})")
    return arr


def read_prob_map(path: Path) -> np.ndarray:
    """Read a foreground probability map as float64 in [0, 1] (PNG uint8/uint16 or .npy float)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as im:
                arr = np.array(im)
    except Exception as exc:
        raise EvaluationError(f"{path}: cannot read probability map ({exc})") from exc
    arr = _squeeze_2d(np.asarray(arr), path, "probability map")
    if arr.dtype == np.uint8:
        return arr / 255.0
    if arr.dtype == np.uint16:
        return arr / 65535.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise EvaluationError(f"{path}: probability map must be uint8, uint16 or float, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
        raise EvaluationError(f"{path}: probabilities must be finite and within [0, 1]")
    return arr


def _find_prob(prob_dir: Path, stem: str) -> Path | None:
    candidates = [prob_dir / f"{stem}{PROB_SUFFIX}{ext}" for ext in (".png", ".npy")]
    present = [c for c in candidates if c.is_file()]
    if len(present) > 1:
        raise EvaluationError(f"{prob_dir}: both {present[0].name} and {present[1].name} exist; keep one")
    return present[0] if present else None


def _pair_files(pred_dir: Path, truth_dir: Path, skip_prob: bool) -> list[tuple[str, Path, Path]]:
    preds = _index_dir(pred_dir, "prediction", skip_prob=skip_prob)
    truths = _index_dir(truth_dir, "ground-truth")
    no_truth = sorted(set(preds) - set(truths))
    no_pred = sorted(set(truths) - set(preds))
    if no_truth or no_pred:
        parts = []
        if no_truth:
            parts.append(f"predictions without ground truth in {truth_dir}: {', '.join(no_truth)}")
        if no_pred:
            parts.append(f"ground truth without predictions in {pred_dir}: {', '.join(no_pred)}")
        raise EvaluationError("; ".join(parts))
    return [(stem, preds[stem], truths[stem]) for stem in sorted(preds)]


# --------------------------------------------------------------------------- evaluation


def evaluate_dirs(
    pred_dir: str | os.PathLike,
    truth_dir: str | os.PathLike,
    prob_dir: str | os.PathLike | None = None,
    threshold: float = 0.5,
    match_iou: float = 0.5,
) -> dict:
    """Evaluate every prediction in ``pred_dir`` against the same-stem image in ``truth_dir``.

    Every prediction needs a ground truth and vice versa; with ``prob_dir`` every image also
    needs ``<stem>_prob.png`` or ``<stem>_prob.npy``; ``threshold`` binarises those maps for
    ``dice_thresholded`` (prob > threshold) and ``match_iou`` is the PQ pairing IoU. Returns::

        {"images": {stem: metrics}, "mean": {metric: mean over images},
         "aggregate": {metric: dataset-level value}}

    with the metric keys of :func:`wsi_grunet.evaluate.metrics.evaluate_pair`. Raises
    EvaluationError naming the files when something is missing, unreadable or mis-shaped.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    prob_path = Path(prob_dir) if prob_dir is not None else None
    if prob_path is not None and not prob_path.is_dir():
        raise EvaluationError(f"probability folder {prob_path} does not exist or is not a folder")
    # probability maps may sit next to the predictions; they are not predictions themselves
    skip_prob = prob_path is not None and prob_path.resolve() == pred_dir.resolve()
    pairs = _pair_files(pred_dir, truth_dir, skip_prob)

    probs: dict[str, Path] = {}
    if prob_path is not None:
        missing = []
        for stem, _, _ in pairs:
            found = _find_prob(prob_path, stem)
            if found is None:
                missing.append(stem)
            else:
                probs[stem] = found
        if missing:
            raise EvaluationError(
                f"probability folder {prob_path} lacks <stem>{PROB_SUFFIX}.png/.npy for: " + ", ".join(missing)
            )

    per_image: dict[str, dict] = {}
    total: PairCounts | None = None
    for stem, pred_file, truth_file in pairs:
        truth = read_label_image(truth_file)
        pred = read_label_image(pred_file)
        if truth.shape != pred.shape:
            raise EvaluationError(
                f"shape mismatch: prediction {pred_file} is {pred.shape}, ground truth {truth_file} is {truth.shape}"
            )
        prob = None
        if stem in probs:
            prob = read_prob_map(probs[stem])
            if prob.shape != truth.shape:
                raise EvaluationError(
                    f"shape mismatch: probability map {probs[stem]} is {prob.shape}, "
                    f"ground truth {truth_file} is {truth.shape}"
                )
        counts = pair_counts(truth, pred, prob, threshold, match_iou)
        per_image[stem] = counts.metrics()
        total = counts if total is None else total + counts

    keys = next(iter(per_image.values())).keys()
    mean = {k: float(np.mean([m[k] for m in per_image.values()])) for k in keys}
    assert total is not None  # at least one image was scored above
    return {"images": per_image, "mean": mean, "aggregate": total.metrics()}


# --------------------------------------------------------------------------- reporting

_INT_KEYS = ("n_true", "n_pred", "tp", "fp", "fn")
_TABLE_KEYS = (
    "n_true", "n_pred", "dice", "iou", "dice_thresholded", "soft_dice", "soft_iou",
    "aji", "aji_plus", "dq", "sq", "pq",
)  # fmt: skip
_HEADERS = {"dice_thresholded": "dice@thr", "aji_plus": "aji+"}


def _cell(key: str, value: float | int, is_mean: bool) -> str:
    if key in _INT_KEYS:
        return f"{value:.1f}" if is_mean else f"{int(value)}"
    return f"{value:.4f}"


def format_table(result: dict) -> str:
    """A fixed-width text table: one row per image, then the mean and aggregate rows."""
    rows = [(stem, m, False) for stem, m in result["images"].items()]
    rows += [("mean", result["mean"], True), ("aggregate", result["aggregate"], False)]
    keys = [k for k in _TABLE_KEYS if k in result["aggregate"]]
    cells = [[name] + [_cell(k, m[k], is_mean) for k in keys] for name, m, is_mean in rows]
    header = ["image"] + [_HEADERS.get(k, k) for k in keys]
    widths = [max(len(col) for col in column) for column in zip(header, *cells)]

    def line(values: list[str]) -> str:
        first = values[0].ljust(widths[0])
        rest = (v.rjust(w) for v, w in zip(values[1:], widths[1:]))
        return "  ".join([first, *rest])

    rule = "-" * len(line(header))
    body = [line(c) for c in cells]
    # separate the summary rows from the per-image rows
    return "\n".join([line(header), rule, *body[:-2], rule, *body[-2:]])


def write_json(result: dict, path: str | os.PathLike) -> None:
    """Write ``result`` as JSON atomically (temporary file in the same folder, then rename).

    Raises OutputError naming the path when it cannot be written; NaN is refused, never written.
    """
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=2, allow_nan=False)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as fh:
            tmp_name = fh.name
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: cannot write evaluation JSON ({exc})") from exc
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
