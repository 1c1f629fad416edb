"""Probability map -> nucleus instances: splitting, locality, determinism, parameters."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from wsi_grunet.errors import ConfigError
from wsi_grunet.postprocess import PostprocessParams, instance_measurements, label_nuclei

MPP = 0.5  # model microns per pixel used throughout: nuclei of radius 3-6 um are 6-12 px
PARAMS = PostprocessParams()


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def ellipse(shape: tuple[int, int], cy: float, cx: float, a: float, b: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 < 1


def soft(mask: np.ndarray, rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
    """A probability-like map: blurred mask, optionally with smooth noise, clipped to [0, 1]."""
    prob = ndi.gaussian_filter(mask.astype(np.float64), 1.0)
    if rng is not None and noise:
        prob += ndi.gaussian_filter(rng.normal(0.0, noise, mask.shape), 1.0)
    return np.clip(prob, 0.0, 1.0).astype(np.float32)


def instance_partition(labels: np.ndarray, where: np.ndarray) -> set[frozenset[int]]:
    """The instances restricted to ``where`` as a set of sets of flat pixel indices (label-free)."""
    flat = np.flatnonzero(where & (labels > 0))
    groups: dict[int, list[int]] = {}
    for index, label in zip(flat.tolist(), labels.ravel()[flat].tolist()):
        groups.setdefault(label, []).append(index)
    return {frozenset(g) for g in groups.values()}


def random_blobs(rng: np.random.Generator, shape: tuple[int, int], n_single: int, n_pairs: int) -> np.ndarray:
    """Foreground mask of random nuclei: isolated ellipses plus touching pairs of discs."""
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n_single):
        cy, cx = rng.uniform(10, shape[0] - 10), rng.uniform(10, shape[1] - 10)
        b = rng.uniform(5, 9)
        mask |= ellipse(shape, cy, cx, b * rng.uniform(1.0, 2.0), b, rng.uniform(0, np.pi))
    for _ in range(n_pairs):
        cy, cx = rng.uniform(15, shape[0] - 15), rng.uniform(15, shape[1] - 15)
        r = rng.uniform(6, 10)
        angle = rng.uniform(0, np.pi)
        sep = rng.uniform(1.5, 1.8) * r
        mask |= disc(shape, cy, cx, r) | disc(shape, cy + sep * np.sin(angle), cx + sep * np.cos(angle), r)
    return mask


def test_separated_discs_give_one_instance_each():
    shape = (120, 160)
    centres = [(25, 25, 6), (25, 80, 9), (30, 135, 12), (85, 30, 8), (90, 90, 7), (85, 140, 10)]
    masks = [disc(shape, cy, cx, r) for cy, cx, r in centres]
    labels = label_nuclei(soft(np.any(masks, axis=0)), MPP, PARAMS)
    assert labels.dtype == np.int32
    assert labels.max() == len(centres)
    for mask in masks:
        inside = np.unique(labels[mask & (labels > 0)])
        assert len(inside) == 1, f"disc split into {inside}"
        assert (labels[mask] > 0).mean() > 0.9


@pytest.mark.parametrize("radius", [6, 9, 12])
@pytest.mark.parametrize("separation", [1.5, 1.8])
def test_touching_discs_are_split(radius: int, separation: float):
    shape = (80, 100)
    a = disc(shape, 40, 30, radius)
    b = disc(shape, 40.3, 30 + separation * radius, radius)
    assert ndi.label(a | b)[1] == 1  # one connected blob
    labels = label_nuclei(soft(a | b), MPP, PARAMS)
    assert labels.max() == 2
    # Each instance sits on its own disc.
    for mask in (a, b):
        values, counts = np.unique(labels[mask], return_counts=True)
        assert counts[values > 0].max() > 0.85 * mask.sum()
    assert np.unique(labels[a & ~b])[-1] != np.unique(labels[b & ~a])[-1]


@pytest.mark.parametrize("minor", [5, 8, 11])
@pytest.mark.parametrize("ratio", [1.5, 2.0, 3.0])
def test_elliptical_nuclei_are_not_over_split(minor: float, ratio: float):
    rng = np.random.default_rng(int(minor * 10 + ratio * 100))
    for angle in np.linspace(0, np.pi, 7, endpoint=False):
        mask = ellipse((100, 100), 50.2, 49.7, minor * ratio, minor, angle)
        labels = label_nuclei(soft(mask, rng, noise=0.1), MPP, PARAMS)
        assert labels.max() == 1, f"ellipse {minor}x{minor * ratio} px at {angle:.2f} rad gave {labels.max()}"


def packed_blobs(rng: np.random.Generator, shape: tuple[int, int], spacing: int = 20) -> np.ndarray:
    """Foreground mask of densely packed nuclei on a jittered grid: gaps between neighbours range
    from overlap (touching nuclei) through 1-3 px (separate but close) to several pixels."""
    mask = np.zeros(shape, dtype=bool)
    for cy in range(spacing // 2, shape[0], spacing):
        for cx in range(spacing // 2, shape[1], spacing):
            b = rng.uniform(6, 10)
            a = b * rng.uniform(1.0, 1.5)
            jy, jx = rng.uniform(-3, 3, 2)
            mask |= ellipse(shape, cy + jy, cx + jx, a, b, rng.uniform(0, np.pi))
    return mask


LOCALITY_CASES = [
    ("semantic", PARAMS),
    ("distance", PARAMS),
    # Wide marker suppression and compact watershed: neither may reach across components.
    ("semantic", PostprocessParams(marker_min_distance_um=12.0, compactness=0.01)),
    # The distance to higher probability levels must not reach across components either.
    ("semantic", PostprocessParams(relief_levels=4)),
]


@pytest.mark.parametrize(("mode", "params"), LOCALITY_CASES)
def test_locality_crops_reproduce_whole_image_instances(mode: str, params: PostprocessParams):
    rng = np.random.default_rng(7)
    shape = (180, 220)
    prob = soft(packed_blobs(rng, shape), rng, noise=0.12)
    distance = None
    if mode == "distance":
        # Any per-pixel map works for the contract; this one peaks inside each nucleus of a pair
        # (instance outlines cut the foreground) and is noisy, to exercise marker regions.
        semantic = label_nuclei(prob, MPP, params)
        edt = ndi.distance_transform_edt((semantic > 0) & ~find_boundaries(semantic))
        distance = np.clip(edt / 8.0 + ndi.gaussian_filter(rng.normal(0, 0.1, shape), 1.5), 0, 1).astype(np.float32)
    whole = label_nuclei(prob, MPP, params, distance)
    components, n_components = ndi.label(prob > params.threshold, structure=np.ones((3, 3)))
    boxes = ndi.find_objects(components)

    # Random crops, plus the tightest crop around each component (bounding box + 1 px), where the
    # crop edge passes as close to the component and its neighbours as the contract allows.
    windows = []
    for _ in range(16):
        y0, x0 = int(rng.integers(0, 70)), int(rng.integers(0, 90))
        windows.append((y0, x0, y0 + int(rng.integers(70, 110)), x0 + int(rng.integers(80, 130))))
    for box in boxes:
        windows.append((box[0].start - 1, box[1].start - 1, box[0].stop + 1, box[1].stop + 1))
    checked = cut = 0
    for y0, x0, y1, x1 in windows:
        y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, shape[0]), min(x1, shape[1])
        window = (slice(y0, y1), slice(x0, x1))
        crop = label_nuclei(prob[window], MPP, params, None if distance is None else distance[window])
        for index, box in enumerate(boxes, start=1):
            # Component plus a one-pixel margin inside the crop (or up to the image edge)?
            inside = (
                box[0].start - 1 >= y0 - (y0 == 0)
                and box[0].stop + 1 <= y1 + (y1 == shape[0])
                and box[1].start - 1 >= x0 - (x0 == 0)
                and box[1].stop + 1 <= x1 + (x1 == shape[1])
            )
            if inside:
                where = components[window] == index
                assert instance_partition(crop, where) == instance_partition(whole[window], where)
                checked += 1
            elif box[0].stop > y0 and box[0].start < y1 and box[1].stop > x0 and box[1].start < x1:
                cut += 1
    assert checked >= 60 and cut >= 100  # the crops both contain and cut many components
    # Many components hold several instances, so the splitting itself is under test.
    split = sum(len(np.unique(whole[(components == i) & (whole > 0)])) > 1 for i in range(1, n_components + 1))
    assert split >= 5


def test_labels_are_deterministic_and_in_raster_order():
    rng = np.random.default_rng(3)
    prob = soft(random_blobs(rng, (150, 150), n_single=15, n_pairs=8), rng, noise=0.1)
    first = label_nuclei(prob, MPP, PARAMS)
    second = label_nuclei(np.asfortranarray(prob.copy()), MPP, PARAMS)
    assert first.tobytes() == second.tobytes()
    ids = first.ravel()
    _, first_pixel = np.unique(ids, return_index=True)
    assert np.all(np.diff(first_pixel[1:]) > 0)  # label k starts before label k + 1
    assert set(np.unique(first)) == set(range(first.max() + 1))


def test_background_only_gives_zeros():
    for prob in (np.zeros((64, 48), np.float32), np.full((64, 48), PARAMS.threshold, np.float32)):
        labels = label_nuclei(prob, MPP, PARAMS)
        assert labels.dtype == np.int32 and labels.shape == prob.shape and not labels.any()
    assert instance_measurements(np.zeros((5, 5), np.int32), np.zeros((5, 5)), MPP) == []


def test_all_foreground_is_one_instance():
    labels = label_nuclei(np.ones((30, 30), np.float32), MPP, PARAMS)
    assert np.all(labels == 1)


def test_distance_mode_splits_touching_discs():
    shape = (80, 100)
    r = 9
    a, b = disc(shape, 40, 30, r), disc(shape, 40, 30 + 1.3 * r, r)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    # Normalised distance to each disc's own border: 1 at the centre, 0 at the rim.
    da = np.clip(1 - np.hypot(yy - 40, xx - 30) / r, 0, 1)
    db = np.clip(1 - np.hypot(yy - 40, xx - 30 - 1.3 * r) / r, 0, 1)
    prob = (a | b).astype(np.float32)
    labels = label_nuclei(prob, MPP, PARAMS, distance=np.maximum(da, db).astype(np.float32))
    assert labels.max() == 2
    assert labels[40, 30] != labels[40, int(30 + 1.3 * r)]
    # A marker threshold above every distance value: each component still becomes one instance.
    high = PARAMS.with_overrides(marker_threshold=0.99)
    assert label_nuclei(prob, MPP, high, distance=np.maximum(da, db).astype(np.float32) * 0.5).max() == 1


def test_min_area_drops_small_instances():
    shape = (60, 120)
    small, large = disc(shape, 30, 30, 2.5), disc(shape, 30, 80, 5)  # 21 and 69 px
    prob = (small | large).astype(np.float32)
    labels = label_nuclei(prob, MPP, PARAMS)  # 8 um2 = 32 px at 0.5 um/px
    assert labels.max() == 1 and labels[30, 80] == 1 and labels[30, 30] == 0
    # The same pixels at a finer pixel size are physically smaller: both dropped at 0.25 um/px.
    assert label_nuclei(prob, 0.25, PARAMS).max() == 0
    kept_all = label_nuclei(prob, MPP, PARAMS.with_overrides(min_area_um2=0.0))
    assert kept_all.max() == 2
    measured = instance_measurements(kept_all, prob, MPP)
    # Raster order: the large disc's top row comes first.
    assert [m["area_px"] for m in measured] == [int(large.sum()), int(small.sum())]
    assert measured[0]["area_um2"] == pytest.approx(large.sum() * MPP**2)
    assert measured[0]["centroid_x"] == pytest.approx(80, abs=0.5)
    assert measured[1]["centroid_y"] == pytest.approx(30, abs=0.5)
    assert measured[1]["mean_probability"] == pytest.approx(1.0)


def test_small_holes_are_filled_but_a_ring_of_nuclei_keeps_its_lumen():
    shape = (120, 120)
    nucleus = disc(shape, 30, 30, 10) & ~disc(shape, 30, 30, 1.5)  # a pale nucleolus
    lumen_ring = disc(shape, 80, 80, 30) & ~disc(shape, 80, 80, 18)
    labels = label_nuclei((nucleus | lumen_ring).astype(np.float32), MPP, PARAMS)
    assert labels[30, 30] > 0 and labels[30, 30] == labels[30, 36]
    assert labels[80, 80] == 0


def test_parameters_round_trip_and_validation():
    params = PostprocessParams.from_dict({"threshold": 0.4, "min_area_um2": 12})
    assert params.threshold == 0.4 and params.min_area_um2 == 12.0
    assert PostprocessParams.from_dict(params.to_dict()) == params
    assert params.with_overrides(threshold=None, compactness=0.1) == PostprocessParams(
        threshold=0.4, min_area_um2=12.0, compactness=0.1
    )
    with pytest.raises(ConfigError, match="unknown key.*treshold"):
        PostprocessParams.from_dict({"treshold": 0.5})
    with pytest.raises(ConfigError, match="threshold"):
        PostprocessParams(threshold=1.5)
    with pytest.raises(ConfigError, match="min_area_um2"):
        params.with_overrides(min_area_um2=-1.0)
    with pytest.raises(ConfigError, match="expected a number"):
        PostprocessParams.from_dict({"compactness": "high"})
    with pytest.raises(ValueError, match="2-D"):
        label_nuclei(np.zeros((2, 3, 4), np.float32), MPP, PARAMS)


def test_relief_levels_split_touching_nuclei_along_a_probability_valley():
    """Two nuclei fused into one blob with no neck in its outline (the distance transform has a
    single maximum) but a valley of probability between them that stays above the threshold:
    the distance to the higher levels splits them; the foreground's distance alone does not."""
    shape = (60, 80)
    xx = np.mgrid[: shape[0], : shape[1]][1]
    blob = ellipse(shape, 30, 40, 22, 11, 0.0)
    prob = np.where(blob, 0.97, 0.0)
    # The valley: above the threshold (0.5) and above the second level (0.67), below the third (0.83).
    prob = np.where(blob & (np.abs(xx - 40) < 2.5), 0.75, prob).astype(np.float32)
    one = label_nuclei(prob, MPP, PostprocessParams(relief_levels=1))
    three = label_nuclei(prob, MPP, PostprocessParams(relief_levels=3))
    assert one.max() == 1
    assert three.max() == 2
    left, right = three[30, 25], three[30, 55]
    assert left != right and {left, right} == {1, 2}
    assert (three > 0).sum() == (one > 0).sum()  # the same foreground, only cut


@pytest.mark.parametrize("value", [0, 2.5, 9, float("nan")])
def test_relief_levels_must_be_a_whole_number_in_range(value):
    with pytest.raises(ConfigError, match="relief_levels"):
        PostprocessParams(relief_levels=value)
