"""Segmentation metrics for nucleus instance label images (pure numpy/scipy).

Conventions shared by every function here:

* Label images are 2-D integer (or bool) arrays in the same pixel frame, 0 = background, each
  nucleus one positive id. Ids need not be contiguous: they are remapped internally.
* Pixel metrics compare the foregrounds ``labels > 0``.
* Instance metrics work from the sparse table of (true, pred) pairs that share at least one pixel,
  built from one sort of the overlapping pixels. Nothing is done per instance over the whole image,
  so the cost grows with the pixel count, not with pixels x nuclei.
* Empty images never produce NaN: when neither image has foreground (or instances) every
  similarity is 1.0 (nothing to find, nothing found); when exactly one is empty it is 0.0.

Every metric can be derived from additive counts (:class:`PairCounts`), so a dataset-level
("aggregate") score is the same formula applied to counts summed over images, as in CoNIC.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from wsi_grunet.errors import WsiGrunetError


class EvaluationError(WsiGrunetError):
    """Inputs to an evaluation are missing, malformed or inconsistent."""


# --------------------------------------------------------------------------- input checks


def _as_labels(labels: np.ndarray, name: str) -> np.ndarray:
    """Validate a 2-D label image with non-negative integer ids; bool is accepted as one id."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise EvaluationError(f"{name}: expected a 2-D label image, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise EvaluationError(f"{name}: expected integer instance labels, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.size and arr.min() < 0:
        raise EvaluationError(f"{name}: labels must be >= 0 (0 = background), found {arr.min()}")
    return arr


def _as_prob(prob: np.ndarray, name: str = "prob") -> np.ndarray:
    """Validate a foreground probability map with finite values in [0, 1]; returns float64."""
    arr = np.asarray(prob)
    if arr.ndim != 2:
        raise EvaluationError(f"{name}: expected a 2-D probability map, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool):
        raise EvaluationError(f"{name}: expected floating-point probabilities in [0, 1], got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
        raise EvaluationError(f"{name}: probabilities must be finite and within [0, 1]")
    return arr


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise EvaluationError(f"{what}: shapes differ, {a.shape} vs {b.shape}")


def _ratio(num: float, den: float) -> float:
    """num / den, with the empty case 0/0 read as perfect agreement (1.0)."""
    return 1.0 if den == 0 else float(num) / float(den)


# --------------------------------------------------------------------------- pixel metrics


def pixel_dice(true_labels: np.ndarray, pred_mask_or_labels: np.ndarray) -> float:
    """Binary Dice 2|A∩B| / (|A|+|B|) of the foregrounds (values > 0); 1.0 when both are empty."""
    t = np.asarray(true_labels) > 0
    p = np.asarray(pred_mask_or_labels) > 0
    _same_shape(t, p, "pixel_dice")
    return _ratio(2 * np.count_nonzero(t & p), np.count_nonzero(t) + np.count_nonzero(p))


def pixel_iou(true_labels: np.ndarray, pred_mask_or_labels: np.ndarray) -> float:
    """Binary Jaccard |A∩B| / |A∪B| of the foregrounds (values > 0); 1.0 when both are empty."""
    t = np.asarray(true_labels) > 0
    p = np.asarray(pred_mask_or_labels) > 0
    _same_shape(t, p, "pixel_iou")
    return _ratio(np.count_nonzero(t & p), np.count_nonzero(t | p))


def _soft_sums(true_binary: np.ndarray, prob: np.ndarray) -> tuple[float, float, float]:
    """(Σ y·p, Σ y, Σ p) with y = (true_binary > 0) and p validated in [0, 1]."""
    y = np.asarray(true_binary) > 0
    p = _as_prob(prob)
    _same_shape(y, p, "soft metric")
    return float(p[y].sum()), float(np.count_nonzero(y)), float(p.sum())


def soft_dice(true_binary: np.ndarray, prob: np.ndarray, eps: float = 1e-7) -> float:
    """Soft Dice on probabilities, no threshold: (2·Σyp + eps) / (Σy + Σp + eps).

    This is the GRU-Net training metric (all pixels of the input flattened together).
    ``true_binary`` is read as ``> 0``; ``prob`` must lie in [0, 1].
    """
    yp, y, p = _soft_sums(true_binary, prob)
    return (2.0 * yp + eps) / (y + p + eps)


def soft_iou(true_binary: np.ndarray, prob: np.ndarray, eps: float = 1e-7) -> float:
    """Soft Jaccard on probabilities: (Σyp + eps) / (Σy + Σp − Σyp + eps)."""
    yp, y, p = _soft_sums(true_binary, prob)
    return (yp + eps) / (y + p - yp + eps)


# --------------------------------------------------------------------------- instance pairing


def remap_label(labels: np.ndarray) -> np.ndarray:
    """Relabel instances to 1..n in increasing order of their original ids; 0 stays background.

    Returns an int32 array (int64 if there are 2**31 or more instances).
    """
    arr = _as_labels(labels, "labels")
    ids, inverse = np.unique(arr, return_inverse=True)
    # inverse indexes `ids`; shift so background maps to 0 and the first positive id to 1
    offset = 0 if (ids.size and ids[0] == 0) else 1
    out_dtype = np.int32 if ids.size < 2**31 - 1 else np.int64
    return (inverse.reshape(arr.shape) + offset).astype(out_dtype, copy=False)


@dataclass(frozen=True)
class Overlaps:
    """Areas of all instances and the sparse table of overlapping (true, pred) pairs.

    Instance indices are 0-based positions in the remapped label order. Pair arrays are parallel
    and sorted by (true, pred); pixel counts are int64, ``iou`` is float64.
    """

    true_area: np.ndarray  # (n_true,)
    pred_area: np.ndarray  # (n_pred,)
    true_idx: np.ndarray  # (n_pairs,)
    pred_idx: np.ndarray  # (n_pairs,)
    inter: np.ndarray  # (n_pairs,) shared pixels
    union: np.ndarray  # (n_pairs,) |T| + |P| - shared

    @property
    def n_true(self) -> int:
        return int(self.true_area.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_area.size)

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union


def instance_overlaps(true: np.ndarray, pred: np.ndarray) -> Overlaps:
    """Build the pair table of two label images of the same shape."""
    _same_shape(np.asarray(true), np.asarray(pred), "instance metrics")
    t = remap_label(true).ravel()
    p = remap_label(pred).ravel()
    n_t = int(t.max(initial=0))
    n_p = int(p.max(initial=0))
    true_area = np.bincount(t, minlength=n_t + 1)[1:].astype(np.int64)
    pred_area = np.bincount(p, minlength=n_p + 1)[1:].astype(np.int64)

    both = (t > 0) & (p > 0)
    # one integer key per (true, pred) pair; counting keys gives every intersection at once
    keys = (t[both].astype(np.int64) - 1) * n_p + (p[both].astype(np.int64) - 1)
    pair_keys, inter = np.unique(keys, return_counts=True)
    true_idx = pair_keys // max(n_p, 1)
    pred_idx = pair_keys % max(n_p, 1)
    inter = inter.astype(np.int64)
    union = true_area[true_idx] + pred_area[pred_idx] - inter
    return Overlaps(true_area, pred_area, true_idx, pred_idx, inter, union)


def _max_weight_matching(rows: np.ndarray, cols: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Indices into the edge arrays of a one-to-one matching maximising the summed weight.

    The bipartite graph is split into connected components so the Hungarian algorithm
    (``linear_sum_assignment``) only ever sees the few instances that touch each other; the
    optimum of the whole graph is the union of the per-component optima. Zero-weight edges are
    never returned.
    """
    keep = np.flatnonzero(weight > 0)
    if keep.size == 0:
        return keep
    rows, cols, weight = rows[keep], cols[keep], weight[keep]
    r_ids, r_loc = np.unique(rows, return_inverse=True)
    c_ids, c_loc = np.unique(cols, return_inverse=True)
    n_r = r_ids.size
    graph = coo_matrix((np.ones(keep.size), (r_loc, n_r + c_loc)), shape=(n_r + c_ids.size,) * 2)
    _, node_comp = connected_components(graph, directed=False)
    edge_comp = node_comp[r_loc]

    # components made of a single edge are matched as they are (the common case)
    comp_edges = np.bincount(edge_comp)
    single = comp_edges[edge_comp] == 1
    chosen = [keep[single]]

    multi = np.flatnonzero(~single)
    order = multi[np.argsort(edge_comp[multi], kind="stable")]
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    groups = np.split(order, bounds) if order.size else []
    for group in groups:
        gr, gr_loc = np.unique(r_loc[group], return_inverse=True)
        gc, gc_loc = np.unique(c_loc[group], return_inverse=True)
        dense = np.zeros((gr.size, gc.size))
        dense[gr_loc, gc_loc] = weight[group]
        edge_at = np.full((gr.size, gc.size), -1, dtype=np.int64)
        edge_at[gr_loc, gc_loc] = group
        r_sel, c_sel = linear_sum_assignment(dense, maximize=True)
        picked = edge_at[r_sel, c_sel]
        chosen.append(keep[picked[picked >= 0]])
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------- AJI / AJI+ / PQ counts


def _aji_counts(ov: Overlaps) -> tuple[int, int]:
    """(Σ intersection, Σ union) of AJI (Kumar et al. 2017).

    Each true instance is paired with the overlapping prediction of highest IoU (ties: the
    lowest predicted id). A prediction may serve several true instances; its area then enters
    the union once per pairing. True instances without any overlap, and predictions never used,
    add their areas to the union.
    """
    if ov.true_idx.size == 0:
        return 0, int(ov.true_area.sum() + ov.pred_area.sum())
    iou = ov.iou
    # sort by true id, then IoU descending, then pred id: first row of each true id wins
    order = np.lexsort((ov.pred_idx, -iou, ov.true_idx))
    first = order[np.unique(ov.true_idx[order], return_index=True)[1]]
    inter = int(ov.inter[first].sum())
    union = int(ov.union[first].sum())
    union += int(ov.true_area.sum() - ov.true_area[ov.true_idx[first]].sum())
    used_pred = np.zeros(ov.n_pred, dtype=bool)
    used_pred[ov.pred_idx[first]] = True
    union += int(ov.pred_area[~used_pred].sum())
    return inter, union


def _matched_counts(ov: Overlaps, pairs: np.ndarray) -> tuple[int, int]:
    """(Σ intersection, Σ union) for a one-to-one pairing; unpaired instances add their areas."""
    inter = int(ov.inter[pairs].sum())
    union = int(ov.union[pairs].sum())
    union += int(ov.true_area.sum() - ov.true_area[ov.true_idx[pairs]].sum())
    union += int(ov.pred_area.sum() - ov.pred_area[ov.pred_idx[pairs]].sum())
    return inter, union


def _aji_plus_counts(ov: Overlaps) -> tuple[int, int]:
    """(Σ intersection, Σ union) of AJI+: unique pairing maximising the summed IoU."""
    pairs = _max_weight_matching(ov.true_idx, ov.pred_idx, ov.iou)
    return _matched_counts(ov, pairs)


def _pq_counts(ov: Overlaps, match_iou: float) -> tuple[int, int, int, float]:
    """(TP, FP, FN, Σ IoU of TPs) of panoptic quality.

    Pairs qualify when IoU > match_iou. For match_iou >= 0.5 qualifying pairs are already
    one-to-one (two instances of one label image cannot each cover more than half of a third),
    otherwise the unique pairing maximising the summed IoU of qualifying pairs is used.
    """
    if not 0.0 <= match_iou <= 1.0:
        raise EvaluationError(f"match_iou must be within [0, 1], got {match_iou}")
    iou = ov.iou
    eligible = np.flatnonzero(iou > match_iou)
    if match_iou >= 0.5:
        pairs = eligible
    else:
        sub = _max_weight_matching(ov.true_idx[eligible], ov.pred_idx[eligible], iou[eligible])
        pairs = eligible[sub]
    tp = int(pairs.size)
    return tp, ov.n_pred - tp, ov.n_true - tp, float(iou[pairs].sum())


def _pq_from_counts(tp: int, fp: int, fn: int, iou_sum: float) -> tuple[float, float, float]:
    """(DQ, SQ, PQ); both images without instances gives (1, 1, 1), no TP otherwise gives SQ 0."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0
    return dq, sq, dq * sq


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017), max-IoU pairing per true instance.

    1.0 when neither image has an instance, 0.0 when exactly one has none.
    """
    inter, union = _aji_counts(instance_overlaps(true, pred))
    return _ratio(inter, union)


def aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI+ : AJI with a unique (Hungarian, max summed IoU) pairing; zero-IoU pairs dropped.

    Same empty conventions as :func:`aji`.
    """
    inter, union = _aji_plus_counts(instance_overlaps(true, pred))
    return _ratio(inter, union)


def panoptic_quality(
    true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5
) -> tuple[float, float, float, int, int, int]:
    """Panoptic quality: returns (dq, sq, pq, tp, fp, fn).

    DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the TPs (0.0 without TPs), PQ = DQ·SQ.
    A pair is a TP when its IoU is strictly greater than ``match_iou``. When neither image has an
    instance, dq = sq = pq = 1.0 (nothing to find, nothing found) so results never contain NaN.
    """
    tp, fp, fn, iou_sum = _pq_counts(instance_overlaps(true, pred), match_iou)
    dq, sq, pq = _pq_from_counts(tp, fp, fn, iou_sum)
    return dq, sq, pq, tp, fp, fn


# --------------------------------------------------------------------------- additive counts


@dataclass(frozen=True)
class PairCounts:
    """Additive sufficient statistics of one image pair (or of several, summed with ``+``).

    Pixel counts are in pixels; ``soft_*`` and ``iou_sum`` are float sums. The probability fields
    are None when no probability map was given; counts with and without them cannot be summed.
    """

    n_true: int
    n_pred: int
    true_area: int  # foreground pixels of the truth
    pred_area: int  # foreground pixels of the predicted labels
    pixel_inter: int
    aji_inter: int
    aji_union: int
    aji_plus_inter: int
    aji_plus_union: int
    tp: int
    fp: int
    fn: int
    iou_sum: float
    thr_area: int | None = None  # pixels with prob > threshold
    thr_inter: int | None = None  # ... that are also true foreground
    soft_inter: float | None = None  # Σ y·p
    soft_pred: float | None = None  # Σ p

    @property
    def has_prob(self) -> bool:
        return self.soft_pred is not None

    def __add__(self, other: PairCounts) -> PairCounts:
        if not isinstance(other, PairCounts):
            return NotImplemented
        if self.has_prob != other.has_prob:
            raise EvaluationError("cannot sum counts with and without a probability map")
        values = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            values[f.name] = None if a is None else a + b
        return PairCounts(**values)

    def metrics(self, eps: float = 1e-7) -> dict[str, float | int]:
        """Metric dictionary (see :func:`evaluate_pair` for the keys)."""
        out: dict[str, float | int] = {
            "dice": _ratio(2 * self.pixel_inter, self.true_area + self.pred_area),
            "iou": _ratio(self.pixel_inter, self.true_area + self.pred_area - self.pixel_inter),
        }
        if self.has_prob:
            out["dice_thresholded"] = _ratio(2 * self.thr_inter, self.true_area + self.thr_area)
            out["iou_thresholded"] = _ratio(self.thr_inter, self.true_area + self.thr_area - self.thr_inter)
            out["soft_dice"] = (2.0 * self.soft_inter + eps) / (self.true_area + self.soft_pred + eps)
            out["soft_iou"] = (self.soft_inter + eps) / (self.true_area + self.soft_pred - self.soft_inter + eps)
        dq, sq, pq = _pq_from_counts(self.tp, self.fp, self.fn, self.iou_sum)
        out.update(
            aji=_ratio(self.aji_inter, self.aji_union),
            aji_plus=_ratio(self.aji_plus_inter, self.aji_plus_union),
            dq=dq,
            sq=sq,
            pq=pq,
            tp=self.tp,
            fp=self.fp,
            fn=self.fn,
            n_true=self.n_true,
            n_pred=self.n_pred,
        )
        return out


def pair_counts(
    true_labels: np.ndarray,
    pred_labels: np.ndarray,
    prob: np.ndarray | None = None,
    threshold: float = 0.5,
    match_iou: float = 0.5,
) -> PairCounts:
    """Count everything the metrics need for one (truth, prediction[, probability]) triple."""
    t = _as_labels(true_labels, "true labels")
    p = _as_labels(pred_labels, "predicted labels")
    _same_shape(t, p, "true vs predicted labels")
    ov = instance_overlaps(t, p)
    t_fg, p_fg = t > 0, p > 0
    aji_i, aji_u = _aji_counts(ov)
    ajp_i, ajp_u = _aji_plus_counts(ov)
    tp, fp, fn, iou_sum = _pq_counts(ov, match_iou)
    extra = {}
    if prob is not None:
        pr = _as_prob(prob)
        _same_shape(t, pr, "true labels vs probability map")
        above = pr > threshold
        extra = dict(
            thr_area=int(np.count_nonzero(above)),
            thr_inter=int(np.count_nonzero(above & t_fg)),
            soft_inter=float(pr[t_fg].sum()),
            soft_pred=float(pr.sum()),
        )
    return PairCounts(
        n_true=ov.n_true,
        n_pred=ov.n_pred,
        true_area=int(np.count_nonzero(t_fg)),
        pred_area=int(np.count_nonzero(p_fg)),
        pixel_inter=int(np.count_nonzero(t_fg & p_fg)),
        aji_inter=aji_i,
        aji_union=aji_u,
        aji_plus_inter=ajp_i,
        aji_plus_union=ajp_u,
        tp=tp,
        fp=fp,
        fn=fn,
        iou_sum=iou_sum,
        **extra,
    )


def evaluate_pair(
    true_labels: np.ndarray,
    pred_labels: np.ndarray,
    prob: np.ndarray | None = None,
    threshold: float = 0.5,
    match_iou: float = 0.5,
) -> dict[str, float | int]:
    """All metrics of one image pair.

    Keys:
      * ``dice``, ``iou``: pixel Dice / Jaccard of the predicted instance mask (pred_labels > 0).
      * only when ``prob`` is given: ``dice_thresholded`` / ``iou_thresholded`` of the mask
        prob > threshold, and ``soft_dice`` / ``soft_iou`` on the raw probabilities.
      * ``aji``, ``aji_plus``; ``dq``, ``sq``, ``pq`` (IoU > match_iou) with ``tp``, ``fp``,
        ``fn``; ``n_true``, ``n_pred`` (instance counts).
    Values are Python floats / ints, never NaN.
    """
    return pair_counts(true_labels, pred_labels, prob, threshold, match_iou).metrics()
