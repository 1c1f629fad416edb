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
    (rec,) = nuclei_records(labels, prob, origin_yx=(100, 200), model_mpp=0.5, level0_per_model=2.0, simplify_px=0)
    assert rec.local_id == 7
    # Model px: x in [205, 217), y in [104, 110); level-0 = model * 2.
    assert rec.polygon.bounds == (410.0, 208.0, 434.0, 220.0)
    assert (rec.bbox_x0, rec.bbox_y0, rec.bbox_x1, rec.bbox_y1) == (410.0, 208.0, 434.0, 220.0)
    assert rec.centroid_x == pytest.approx((205 + 217) / 2 * 2.0)
    assert rec.centroid_y == pytest.approx((104 + 110) / 2 * 2.0)
    assert rec.area_um2 == pytest.approx(72 * 0.25)
    assert rec.mean_probability == pytest.approx(0.8)
    assert rec.polygon.exterior.is_ccw


def test_area_in_um2_and_simplified_polygon_close_to_pixels():
    labels = np.zeros((80, 80), np.int32)
    centres = [(15, 15, 4.5), (15, 50, 7.0), (50, 20, 10.0), (55, 60, 12.5)]
    for k, (cy, cx, r) in enumerate(centres, start=1):
        rr, cc = disk((cy, cx), r, shape=labels.shape)
        labels[rr, cc] = k
    prob = np.random.default_rng(1).random(labels.shape).astype(np.float32)
    mpp, f = 0.25, 0.25 / 0.2425
    records = nuclei_records(labels, prob, (0, 0), model_mpp=mpp, level0_per_model=f)
    assert [r.local_id for r in records] == [1, 2, 3, 4]
    for rec in records:
        mask = labels == rec.local_id
        assert rec.area_um2 == pytest.approx(mask.sum() * mpp * mpp)
        assert rec.polygon.is_valid and isinstance(rec.polygon, Polygon)
        polygon_um2 = rec.polygon.area / f**2 * mpp**2
        assert polygon_um2 == pytest.approx(rec.area_um2, rel=0.05)
        assert rec.mean_probability == pytest.approx(float(prob[mask].mean()), rel=1e-6)
        assert 0.85 < rec.circularity <= 1.0
        assert rec.solidity == pytest.approx(regionprops(mask.astype(np.uint8))[0].solidity, abs=0.06)


def test_shape_measurements_match_an_independent_implementation():
    labels = np.zeros((60, 80), np.int32)
    rr, cc = ellipse(30, 40, 8, 25, rotation=0.4, shape=labels.shape)
    labels[rr, cc] = 1
    (rec,) = nuclei_records(labels, np.ones(labels.shape, np.float32), (0, 0), model_mpp=0.5, level0_per_model=1.0)
    props = regionprops(labels)[0]
    assert rec.eccentricity == pytest.approx(props.eccentricity, abs=1e-6)
    assert rec.major_axis_um == pytest.approx(props.axis_major_length * 0.5, rel=1e-6)
    assert rec.minor_axis_um == pytest.approx(props.axis_minor_length * 0.5, rel=1e-6)
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
    (rec,) = nuclei_records(labels, np.ones(labels.shape, np.float32), (0, 0), 1.0, 1.0, simplify_px=0)
    assert len(rec.polygon.interiors) == 1
    assert rec.polygon.area == pytest.approx((labels == 1).sum())
    np.testing.assert_array_equal(covered_pixels(rec.polygon, labels.shape), labels == 1)
    assert not rec.polygon.interiors[0].is_ccw  # holes wind opposite to the exterior


def test_diagonal_only_parts_keep_the_largest_valid_part():
    labels = np.zeros((12, 12), np.int32)
    labels[2:6, 2:6] = 5  # 16 px
    labels[6, 6] = 5  # touches the block at one corner only
    (rec,) = nuclei_records(labels, np.ones(labels.shape, np.float32), (0, 0), 1.0, 1.0, simplify_px=0)
    assert isinstance(rec.polygon, Polygon) and rec.polygon.is_valid
    assert rec.polygon.area == pytest.approx(16.0)
    assert rec.area_um2 == pytest.approx(17.0)  # measurements count every pixel


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
    recs = nuclei_records(labels, np.ones(labels.shape, np.float32), (0, 0), 0.5, 1.0, simplify_px=0)
    a, b = (r.polygon for r in recs)
    assert a.intersection(b).area == pytest.approx(0.0)
    assert a.union(b).area == pytest.approx((labels > 0).sum())


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        nuclei_records(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.float32), (0, 0), 0.5, 1.0)
    with pytest.raises(ValueError, match="integer"):
        nuclei_records(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), (0, 0), 0.5, 1.0)
    with pytest.raises(ValueError, match="positive"):
        nuclei_records(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.float32), (0, 0), 0.0, 1.0)
