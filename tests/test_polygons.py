"""Nucleus polygons and measurements from instance labels (wsi_grunet.outputs.polygons)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
from scipy import ndimage
from shapely.geometry import Polygon
from skimage.draw import disk, ellipse
from skimage.measure import regionprops

from wsi_grunet.outputs.polygons import mask_polygon, nuclei_records
from wsi_grunet.postprocess import PostprocessParams, label_nuclei


def covered_pixels(geom, shape: tuple[int, int]) -> np.ndarray:
    """Boolean raster of which pixel centres (pixel-corner frame) lie inside ``geom``."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return shapely.contains_xy(geom, xx + 0.5, yy + 0.5)


def random_blob(rng: np.random.Generator, size: int = 24) -> np.ndarray:
    """A random 4-connected blob with ragged edges, often with holes and diagonal-only contacts."""
    noise = ndimage.gaussian_filter(rng.random((size, size)), 1.0)
    mask = (noise > np.quantile(noise, 0.4)) & (rng.random((size, size)) > 0.08)  # speckle -> holes
    lab, n = ndimage.label(mask)  # 4-connectivity
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


@pytest.mark.parametrize("seed", range(12))
def test_exact_outline_covers_exactly_the_pixels(seed):
    mask = random_blob(np.random.default_rng(seed))
    geom = mask_polygon(mask)
    assert geom.is_valid
    assert geom.area == pytest.approx(mask.sum())
    np.testing.assert_array_equal(covered_pixels(geom, mask.shape), mask)


def test_outline_follows_pixel_edges_not_centres():
    mask = np.zeros((5, 6), bool)
    mask[1:3, 1:4] = True
    geom = mask_polygon(mask)
    assert geom.bounds == (1.0, 1.0, 4.0, 3.0)
    assert geom.area == 6.0
    single = np.zeros((3, 3), bool)
    single[1, 1] = True
    assert mask_polygon(single).equals(Polygon([(1, 1), (2, 1), (2, 2), (1, 2)]))


def test_position_and_scale_to_level0():
    labels = np.zeros((20, 30), np.int32)
    labels[4:10, 5:17] = 7  # rows 4..9, columns 5..16
    prob = np.full(labels.shape, 0.25, np.float32)
    prob[labels == 7] = 0.8
    (rec,) = nuclei_records(labels, prob, origin_yx=(100, 200), model_mpp=0.5, level0_per_model=2.0, outline="pixels")
    assert rec.local_id == 7
    # Model px: x in [205, 217), y in [104, 110); level-0 = model * 2.
    assert rec.polygon.bounds == (410.0, 208.0, 434.0, 220.0)
    (sub,) = nuclei_records(labels, prob, origin_yx=(100, 200), model_mpp=0.5, level0_per_model=2.0)
    # Probability 0.8 inside, 0.25 outside, threshold 0.5: the contour crosses 6/11 of the way from the
    # last inside pixel centre to the first outside one, i.e. 1/22 model px beyond the pixel edge.
    out = 2.0 * (6 / 11 - 0.5)
    np.testing.assert_allclose(sub.polygon.bounds, (410 - out, 208 - out, 434 + out, 220 + out), atol=1e-6)
    assert (sub.bbox_x0, sub.centroid_x) == (rec.bbox_x0, rec.centroid_x)
    assert (rec.bbox_x0, rec.bbox_y0, rec.bbox_x1, rec.bbox_y1) == (410.0, 208.0, 434.0, 220.0)
    assert rec.centroid_x == pytest.approx((205 + 217) / 2 * 2.0)
    assert rec.centroid_y == pytest.approx((104 + 110) / 2 * 2.0)
    assert rec.area_um2 == pytest.approx(72 * 0.25)
    assert rec.mean_probability == pytest.approx(0.8)
    assert rec.polygon.exterior.is_ccw and sub.polygon.exterior.is_ccw


def test_area_in_um2_and_simplified_polygon_close_to_pixels():
    labels = np.zeros((80, 80), np.int32)
    centres = [(15, 15, 4.5), (15, 50, 7.0), (50, 20, 10.0), (55, 60, 12.5)]
    for k, (cy, cx, r) in enumerate(centres, start=1):
        rr, cc = disk((cy, cx), r, shape=labels.shape)
        labels[rr, cc] = k
    prob = np.clip(ndimage.gaussian_filter((labels > 0).astype(float), 1.0), 0, 1).astype(np.float32)
    mpp, f = 0.25, 0.25 / 0.2425
    records = nuclei_records(labels, prob, (0, 0), model_mpp=mpp, level0_per_model=f)
    assert [r.local_id for r in records] == [1, 2, 3, 4]
    for rec in records:
        mask = labels == rec.local_id
        assert rec.area_um2 == pytest.approx(mask.sum() * mpp * mpp, rel=0.08)
        assert rec.polygon.is_valid and isinstance(rec.polygon, Polygon)
        polygon_um2 = rec.polygon.area / f**2 * mpp**2
        assert polygon_um2 == pytest.approx(rec.area_um2, rel=1e-9)  # measured on the polygon
        assert rec.mean_probability == pytest.approx(float(prob[mask].mean()), rel=1e-6)
        assert 0.85 < rec.circularity <= 1.0
        assert rec.solidity == pytest.approx(regionprops(mask.astype(np.uint8))[0].solidity, abs=0.06)


def test_shape_measurements_match_an_independent_implementation():
    labels = np.zeros((60, 80), np.int32)
    rr, cc = ellipse(30, 40, 8, 25, rotation=0.4, shape=labels.shape)
    labels[rr, cc] = 1
    (rec,) = nuclei_records(labels, np.ones(labels.shape, np.float32), (0, 0), model_mpp=0.5, level0_per_model=1.0)
    props = regionprops(labels)[0]
    # Moments of the outline (a continuous region) versus regionprops' moments of pixel centres.
    assert rec.eccentricity == pytest.approx(props.eccentricity, abs=0.01)
    assert rec.major_axis_um == pytest.approx(props.axis_major_length * 0.5, rel=0.02)
    assert rec.minor_axis_um == pytest.approx(props.axis_minor_length * 0.5, rel=0.03)
    assert rec.major_axis_um > 2 * rec.minor_axis_um
    # Perimeter of an ellipse (Ramanujan) with semi-axes 25 and 8 px, at 0.5 um/px.
    a, b = 25.0, 8.0
    h = ((a - b) / (a + b)) ** 2
    expected_um = math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h))) * 0.5
    assert rec.perimeter_um == pytest.approx(expected_um, rel=0.08)
    assert rec.circularity < 0.8


def test_thin_shape_has_low_circularity():
    labels = np.zeros((10, 60), np.int32)
    labels[4:6, 5:55] = 3
    (rec,) = nuclei_records(labels, np.zeros(labels.shape, np.float32), (0, 0), 0.5, 1.0)
    assert rec.circularity < 0.3
    assert rec.mean_probability == 0.0


def test_holes_are_interior_rings():
    labels = np.zeros((30, 30), np.int32)
    rr, cc = disk((15, 15), 10)
    labels[rr, cc] = 1
    rr, cc = disk((15, 15), 4)
    labels[rr, cc] = 0
    (rec,) = nuclei_records(labels, np.ones(labels.shape, np.float32), (0, 0), 1.0, 1.0)
    assert len(rec.polygon.interiors) == 1
    # Through the edge midpoints, corners cut: an eighth of a pixel per convex corner, added per concave one.
    assert rec.polygon.area == pytest.approx((labels == 1).sum(), rel=0.03)
    np.testing.assert_array_equal(covered_pixels(rec.polygon, labels.shape), labels == 1)
    assert not rec.polygon.interiors[0].is_ccw  # holes wind opposite to the exterior


def test_diagonal_contacts_join_in_subpixel_outlines_and_pixel_outlines_keep_the_largest_part():
    labels = np.zeros((12, 12), np.int32)
    labels[2:6, 2:6] = 5  # 16 px
    labels[6, 6] = 5  # touches the block at one corner only
    ones = np.where(labels > 0, 0.9, 0.1).astype(np.float32)
    (rec,) = nuclei_records(labels, ones, (0, 0), 1.0, 1.0, outline="pixels")
    assert isinstance(rec.polygon, Polygon) and rec.polygon.is_valid
    assert rec.polygon.area == pytest.approx(16.0)
    (sub,) = nuclei_records(labels, ones, (0, 0), 1.0, 1.0)
    assert isinstance(sub.polygon, Polygon) and sub.polygon.is_valid
    np.testing.assert_array_equal(covered_pixels(sub.polygon, labels.shape), labels == 5)


def test_gaps_in_ids_and_empty_input():
    labels = np.zeros((20, 20), np.int32)
    labels[2:5, 2:5] = 3
    labels[10:15, 10:12] = 9
    prob = np.zeros(labels.shape, np.float32)
    assert [r.local_id for r in nuclei_records(labels, prob, (0, 0), 0.5, 1.0)] == [3, 9]
    assert nuclei_records(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.float32), (0, 0), 0.5, 1.0) == []


def test_touching_nuclei_share_edges_without_overlap():
    labels = np.zeros((20, 20), np.int32)
    labels[3:15, 3:10] = 1
    labels[3:15, 10:16] = 2
    labels[8:12, 8:10] = 2  # ragged shared border
    recs = nuclei_records(labels, np.ones(labels.shape, np.float32), (0, 0), 0.5, 1.0, outline="pixels")
    a, b = (r.polygon for r in recs)
    assert a.intersection(b).area == pytest.approx(0.0)
    assert a.union(b).area == pytest.approx((labels > 0).sum())
    recs = nuclei_records(labels, np.ones(labels.shape, np.float32), (0, 0), 0.5, 1.0)
    a, b = (r.polygon for r in recs)
    assert a.intersection(b).area == pytest.approx(0.0, abs=1e-9)
    # The shared border is the pixel border: the midpoint between mirrored values.
    assert a.intersection(b).length == pytest.approx(((labels[:, :-1] == 1) & (labels[:, 1:] == 2)).sum(), rel=0.3)
    np.testing.assert_array_equal(covered_pixels(a, labels.shape), labels == 1)
    np.testing.assert_array_equal(covered_pixels(b, labels.shape), labels == 2)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        nuclei_records(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.float32), (0, 0), 0.5, 1.0)
    with pytest.raises(ValueError, match="integer"):
        nuclei_records(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), (0, 0), 0.5, 1.0)
    with pytest.raises(ValueError, match="positive"):
        nuclei_records(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.float32), (0, 0), 0.0, 1.0)
    with pytest.raises(ValueError, match="outline"):
        nuclei_records(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.float32), (0, 0), 0.5, 1.0, outline="x")
    with pytest.raises(ValueError, match="threshold"):
        nuclei_records(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.float32), (0, 0), 0.5, 1.0, threshold=1.5)


# --- Sub-pixel outlines on realistic probability maps ------------------------------------------------


def nuclei_scene(seed: int, shape: tuple[int, int] = (120, 140)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth, noisy probability map of discs, many touching, and its instances from label_nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for _ in range(34):
        cy, cx, r = rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8), rng.uniform(4, 8)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    prob = ndimage.gaussian_filter(mask.astype(float), 1.2) + ndimage.gaussian_filter(rng.normal(0, 0.15, shape), 1.0)
    prob = np.clip(prob, 0, 1).astype(np.float32)
    labels = label_nuclei(prob, 0.5, PostprocessParams(threshold=0.5, min_area_um2=2.0))
    return prob, labels


def pixel_outline(labels: np.ndarray, local_id: int):
    """All parts of an instance's pixel-edge outline, in the labels' pixel-corner frame."""
    return mask_polygon(labels == local_id)


@pytest.mark.parametrize("seed", range(4))
def test_subpixel_outlines_are_valid_close_to_the_pixels_and_disjoint(seed):
    prob, labels = nuclei_scene(seed)
    assert labels.max() > 15
    records = nuclei_records(labels, prob, (0, 0), 0.5, 1.0, threshold=0.5)
    assert [r.local_id for r in records] == list(range(1, labels.max() + 1))
    polygons = np.array([r.polygon for r in records])
    assert all(isinstance(p, Polygon) and p.is_valid and not p.is_empty for p in polygons)
    for rec in records:
        pixels = pixel_outline(labels, rec.local_id)
        assert shapely.hausdorff_distance(rec.polygon, pixels, densify=0.1) < 1.0
        assert rec.polygon.area == pytest.approx(pixels.area, rel=0.25, abs=3.0)
        assert rec.area_um2 == pytest.approx(rec.polygon.area * 0.25)
    tree = shapely.STRtree(polygons)
    i, j = tree.query(polygons, predicate="intersects")
    pairs = i < j
    assert pairs.sum() >= 3  # touching nuclei are part of the scene
    overlap = shapely.area(shapely.intersection(polygons[i[pairs]], polygons[j[pairs]]))
    assert overlap.max() < 1e-9
    # Areas summed over a scene stay close to the pixel count (no systematic shrinking or growth).
    total = sum(p.area for p in polygons)
    assert total == pytest.approx((labels > 0).sum(), rel=0.06)


def test_subpixel_outline_is_deterministic_and_local():
    """A crop holding a nucleus plus one pixel gives the same polygon, shifted; other pixels don't matter."""
    prob, labels = nuclei_scene(7)
    records = {r.local_id: r for r in nuclei_records(labels, prob, (0, 0), 0.5, 2.0)}
    again = {r.local_id: r for r in nuclei_records(labels, prob, (0, 0), 0.5, 2.0)}
    assert all(records[k].polygon.equals_exact(again[k].polygon, 0.0) for k in records)
    boxes = ndimage.find_objects(labels)
    for local_id in (1, labels.max() // 2, labels.max()):
        box = boxes[local_id - 1]
        y0, x0 = max(box[0].start - 1, 0), max(box[1].start - 1, 0)
        y1, x1 = box[0].stop + 1, box[1].stop + 1
        # Only this nucleus is kept in the crop's labels: the others enter through the probability alone.
        crop_labels = np.where(labels[y0:y1, x0:x1] == local_id, local_id, 0)
        crop_prob = prob[y0:y1, x0:x1].copy()
        (rec,) = nuclei_records(crop_labels, crop_prob, (y0, x0), 0.5, 2.0)
        whole = records[local_id]
        assert rec.polygon.equals_exact(whole.polygon, 1e-9)
        for name in ("area_um2", "perimeter_um", "circularity", "solidity", "eccentricity", "major_axis_um"):
            assert getattr(rec, name) == pytest.approx(getattr(whole, name), abs=1e-9)


def test_crosswise_contact_goes_to_one_instance_only():
    """Two instances that cross diagonally in a 2 x 2 block: exactly one keeps the join, no overlap."""
    labels = np.zeros((10, 10), np.int32)
    labels[2:5, 2:5] = 1
    labels[5:8, 5:8] = 1
    labels[2:5, 5:8] = 2
    labels[5:8, 2:5] = 2  # the block of rows 4-5, columns 4-5 holds 1 on one diagonal and 2 on the other
    prob = np.full(labels.shape, 0.1, np.float32)
    prob[labels > 0] = 0.9
    prob[4, 4] = prob[5, 5] = 0.95  # instance 1 is brighter on its diagonal: it keeps the join
    a, b = (r.polygon for r in nuclei_records(labels, prob, (0, 0), 0.5, 1.0))
    assert a.is_valid and b.is_valid
    assert a.intersection(b).area == pytest.approx(0.0, abs=1e-9)
    assert a.contains(shapely.Point(5.0, 5.0))  # the block's centre (pixel-corner frame)
    assert not b.contains(shapely.Point(5.0, 5.0))
