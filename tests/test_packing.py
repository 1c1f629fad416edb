"""Packed labelling: components packed side by side into a small canvas give exactly the instances
of labelling the whole array (the locality contract of ``postprocess.py`` makes this hold)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from test_postprocess import MPP, PARAMS, disc, random_blobs, soft

from wsi_grunet.packing import pack_components
from wsi_grunet.postprocess import PostprocessParams, _semantic_instances, label_nuclei

EIGHT = np.ones((3, 3), dtype=bool)


def sparse_nuclei(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Scattered nuclei (isolated and touching pairs), a ring nucleus with another inside its lumen,
    a nucleus with a pale centre, nuclei cut by every array edge and two nuclei 2 px apart."""
    mask = random_blobs(rng, shape, n_single=25, n_pairs=12)
    h, w = shape
    mask |= disc(shape, 60, 60, 22) & ~disc(shape, 60, 60, 12)  # ring...
    mask |= disc(shape, 60, 60, 5)  # ...with a nucleus in its lumen
    mask |= disc(shape, 60, 160, 9) & ~disc(shape, 60, 160, 1.5)  # pale nucleolus (a small hole)
    for cy, cx in ((0, w // 2), (h - 1, w // 3), (h // 2, 0), (h // 3, w - 1), (0, 0)):
        mask |= disc(shape, cy, cx, 8)
    mask |= disc(shape, 150, 60, 7) | disc(shape, 150, 76, 7)  # 2 px of background between them
    return mask


@pytest.mark.parametrize(
    "params",
    [PARAMS, PostprocessParams(marker_min_distance_um=6.0, compactness=0.01), PostprocessParams(relief_levels=3)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_labelling_equals_labelling_the_whole_array(seed: int, params: PostprocessParams):
    rng = np.random.default_rng(seed)
    shape = (420, 520)
    prob = soft(sparse_nuclei(rng, shape), rng, noise=0.12)
    components, _ = ndi.label(prob > params.threshold, structure=EIGHT)
    packed = pack_components(components)
    assert packed is not None and packed.canvas.size < 0.5 * prob.size  # the packed path is the one taken
    whole = _semantic_instances(components, prob, MPP * MPP, params, MPP)
    labels = label_nuclei(prob, MPP, params)
    assert labels.dtype == whole.dtype
    np.testing.assert_array_equal(labels, whole)
    assert labels[60, 60] > 0 and labels[60, 60] != labels[60, 40]  # the nucleus in the lumen stays its own
    # Many components hold several instances, so the splitting itself is compared.
    n_split = sum(len(np.unique(labels[components == i])) > 1 for i in range(1, components.max() + 1))
    assert n_split >= 5


def test_packing_round_trip_keeps_every_pixel_and_moves_groups_whole():
    rng = np.random.default_rng(3)
    components, n = ndi.label(sparse_nuclei(rng, (400, 500)), structure=EIGHT)
    packed = pack_components(components)
    assert packed is not None
    np.testing.assert_array_equal(packed.unpack(packed.canvas), components)
    # A per-pixel map taken onto the canvas holds each component pixel's own value.
    values = rng.integers(1, 1000, components.shape)
    taken = packed.take(values)
    np.testing.assert_array_equal(
        packed.unpack(np.where(packed.canvas > 0, taken, 0)), np.where(components > 0, values, 0)
    )
    # Components stay apart on the canvas: labelling it again finds the same number of them.
    assert ndi.label(packed.canvas > 0, structure=EIGHT)[1] == n
    assert np.array_equal(np.unique(packed.canvas), np.unique(components))


def test_dense_foreground_is_not_packed():
    components, _ = ndi.label(np.ones((64, 64), dtype=bool), structure=EIGHT)
    assert pack_components(components) is None
    grid = np.zeros((90, 90), dtype=bool)
    grid[1::3, 1::3] = True  # single pixels two apart: their margined boxes cover everything
    assert pack_components(ndi.label(grid, structure=EIGHT)[0]) is None
    assert pack_components(np.zeros((10, 10), dtype=np.int32)) is None


def test_instances_do_not_depend_on_where_a_component_lies():
    """Shifted by odd amounts far across a large array, a group of touching nuclei splits alike
    (marker spacing is measured in each component's own frame)."""
    rng = np.random.default_rng(5)
    patch = soft(random_blobs(rng, (60, 60), n_single=0, n_pairs=1) | disc((60, 60), 30, 30, 9), rng, 0.1)
    reference = label_nuclei(patch, MPP, PARAMS)
    assert reference.max() >= 2
    for dy, dx in ((0, 0), (1237, 3), (5, 2999), (2411, 1777)):
        big = np.zeros((2500, 3100), dtype=np.float32)
        big[dy : dy + 60, dx : dx + 60] = patch
        labels = label_nuclei(big, MPP, PARAMS)[dy : dy + 60, dx : dx + 60]
        np.testing.assert_array_equal(labels, reference)
