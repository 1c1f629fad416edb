"""Tile ownership: owned instances of all tiles reassemble the single-pass result exactly."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import ndimage as ndi

from wsi_grunet import ownership
from wsi_grunet.errors import StitchContractError
from wsi_grunet.geometry import Box
from wsi_grunet.ownership import owned_instances
from wsi_grunet.postprocess import PostprocessParams, compact_ids, label_nuclei

MPP = 0.5
OUTSIDE = 999  # junk label painted where a read box leaves the slide: must never be owned


def tiles(slide_shape: tuple[int, int], core: int, halo: int) -> list[tuple[Box, Box]]:
    """(read, core) boxes: cores on a regular grid of step ``core`` from (0, 0) covering the slide
    (the last ones stick out of it), read = core grown by ``halo``."""
    out = []
    for y in range(0, slide_shape[0], core):
        for x in range(0, slide_shape[1], core):
            core_box = Box(y, x, y + core, x + core)
            out.append((core_box.grow(halo), core_box))
    return out


def read_window(image: np.ndarray, read: Box, fill) -> np.ndarray:
    """``image`` over ``read``; positions outside the image get ``fill``."""
    out = np.full(read.shape, fill, dtype=image.dtype)
    inside = read.intersect(Box(0, 0, *image.shape))
    if not inside.is_empty():
        out[inside.relative_to(read).slices()] = image[inside.slices()]
    return out


def stitch(labels_per_tile, slide_shape, halo, tile_list) -> tuple[np.ndarray, int, int]:
    """Apply ownership per tile and paste owned instances into a slide canvas. Every pixel may be
    written once only. Returns (canvas, total owned, total owned in cut groups)."""
    canvas = np.zeros(slide_shape, dtype=np.int64)
    written = np.zeros(slide_shape, dtype=np.int32)
    offset = cut_groups = 0
    for (read, core), labels in zip(tile_list, labels_per_tile):
        owned = owned_instances(labels, read, core, slide_shape, halo, mpp=MPP)
        assert owned.labels.dtype == np.int32 and owned.labels.shape == read.shape
        assert owned.count == owned.labels.max() == len(owned.centroids)
        rows, cols = np.nonzero(owned.labels)
        rows, cols = rows + read.y0, cols + read.x0
        assert rows.min(initial=0) >= 0 and cols.min(initial=0) >= 0
        assert rows.max(initial=0) < slide_shape[0] and cols.max(initial=0) < slide_shape[1]
        canvas[rows, cols] = owned.labels[owned.labels > 0] + offset
        np.add.at(written, (rows, cols), 1)
        # Centroids are in slide model pixels and inside this tile's core.
        for cy, cx in owned.centroids:
            assert core.contains_point(cy, cx)
        offset += owned.count
        cut_groups += owned.n_in_cut_groups
    assert written.max() <= 1, "an instance was owned by two tiles"
    return canvas, offset, cut_groups


def same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def random_slide_labels(rng: np.random.Generator, shape: tuple[int, int], max_extent: int) -> np.ndarray:
    """Label image of random elliptical nuclei with bounding boxes under ``max_extent`` px, some
    touching each other and some cut by the slide edge."""
    labels = np.zeros(shape, dtype=np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    n = 0
    for _ in range(shape[0] * shape[1] // 250):
        cy, cx = rng.uniform(-3, shape[0] + 3), rng.uniform(-3, shape[1] + 3)
        a = rng.uniform(2, max_extent / 2 - 0.5)
        b = a * rng.uniform(0.5, 1.0)
        t = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        blob = ((u / a) ** 2 + (v / b) ** 2 < 1) & (labels == 0)
        if blob.sum() >= 3:
            n += 1
            labels[blob] = n
    return labels


@pytest.mark.parametrize(("core", "halo"), [(48, 16), (96, 32)])
def test_owned_instances_reassemble_the_slide(core: int, halo: int):
    rng = np.random.default_rng(core)
    slide_shape = (203, 251)  # not a multiple of the core: the last cores stick out
    truth = random_slide_labels(rng, slide_shape, max_extent=halo)
    n_truth = len(np.unique(truth)) - 1
    assert n_truth > 80
    tile_list = tiles(slide_shape, core, halo)
    per_tile = [read_window(truth, read, OUTSIDE) for read, _ in tile_list]
    canvas, total, _ = stitch(per_tile, slide_shape, halo, tile_list)
    assert total == n_truth  # each nucleus owned exactly once
    assert same_up_to_relabelling(canvas, truth)
    # The instances really cross tile borders: many read boxes see nuclei they do not own.
    seen = sum(len(np.unique(t[(t > 0) & (t != OUTSIDE)])) for t in per_tile)
    assert seen > 1.3 * n_truth


@pytest.mark.parametrize(("core", "halo"), [(64, 32), (96, 48)])
def test_tiled_post_processing_equals_single_pass(core: int, halo: int):
    """The end-to-end guarantee: post-process every read box, keep owned instances, and get the
    single-pass instances pixel for pixel, when every component is smaller than the halo."""
    rng = np.random.default_rng(halo)
    slide_shape = (230, 270)
    yy, xx = np.mgrid[: slide_shape[0], : slide_shape[1]]
    mask = np.zeros(slide_shape, dtype=bool)
    for cy in range(12, slide_shape[0], 30):
        for cx in range(12, slide_shape[1], 30):
            r = rng.uniform(5, 7)
            cy2, cx2 = cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3)
            mask |= (yy - cy2) ** 2 + (xx - cx2) ** 2 < r * r
            if rng.random() < 0.4:  # a touching neighbour: a two-nucleus component
                t = rng.uniform(0, 2 * np.pi)
                mask |= (yy - cy2 - 1.6 * r * np.sin(t)) ** 2 + (xx - cx2 - 1.6 * r * np.cos(t)) ** 2 < r * r
    noise = ndi.gaussian_filter(rng.normal(0, 0.1, slide_shape), 1.0)
    prob = np.clip(ndi.gaussian_filter(mask.astype(float), 1.0) + noise, 0, 1).astype(np.float32)
    params = PostprocessParams()
    components, _ = ndi.label(prob > params.threshold, structure=np.ones((3, 3)))
    extents = [max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndi.find_objects(components)]
    assert max(extents) <= halo  # the condition of the guarantee

    single = label_nuclei(prob, MPP, params)
    tile_list = tiles(slide_shape, core, halo)
    # Outside the slide the probability is 0, as a padded read gives.
    per_tile = [label_nuclei(read_window(prob, read, np.float32(0)), MPP, params) for read, _ in tile_list]
    canvas, total, cut_groups = stitch(per_tile, slide_shape, halo, tile_list)
    assert cut_groups == 0
    assert total == single.max()
    assert same_up_to_relabelling(canvas, single)
    # Some components hold two instances, so the split is part of what is compared.
    assert single.max() > len(extents) + 5


def test_outside_slide_pixels_are_never_owned():
    slide_shape = (40, 40)
    read, core = Box(-16, -16, 32, 32), Box(0, 0, 16, 16)
    labels = np.zeros(read.shape, dtype=np.int32)
    labels[:16, :] = 7  # entirely above the slide
    labels[20:26, 26:32] = 3  # inside the slide and the core
    labels[14:20, 20:26] = 5  # straddles the top slide edge: only its rows >= 0 of the slide count
    owned = owned_instances(labels, read, core, slide_shape, halo=16)
    assert list(owned.source_ids) == [5, 3]  # raster order of the first pixel inside the slide
    assert not owned.labels[:16].any()
    assert owned.centroids.tolist() == [[1.5, 6.5], [6.5, 12.5]]
    assert np.array_equal(owned.labels[16:20, 20:26], np.ones((4, 6)))
    assert owned.n_in_cut_groups == 0


def test_nucleus_larger_than_halo_raises_with_actionable_message():
    slide_shape = (300, 300)
    core, halo = 64, 16
    truth = np.zeros(slide_shape, dtype=np.int32)
    truth[90:110, 40:150] = 1  # 110 px long, straddles the core line at x = 64 and x = 128
    raised = 0
    for read, core_box in tiles(slide_shape, core, halo):
        labels = read_window(truth, read, 0)
        if not labels.any():
            continue
        try:
            owned_instances(labels, read, core_box, slide_shape, halo, mpp=MPP)
        except StitchContractError as exc:
            raised += 1
            text = str(exc)
            assert "tiling.halo" in text and "16 px (8 um)" in text
            # Size of the part this tile sees, in pixels and microns, and where it is.
            assert re.search(r"at least 20 x \d+ px \(10 x \d+ um\) near model pixel \(y=100, x=\d+\)", text)
    assert raised >= 1


def test_slide_edge_nuclei_are_fine():
    slide_shape = (100, 100)
    halo = 16
    truth = np.zeros(slide_shape, dtype=np.int32)
    truth[0:6, 40:48] = 1  # touches the top edge
    truth[94:100, 94:100] = 2  # in the bottom-right corner
    truth[50:58, 0:5] = 3  # touches the left edge
    tile_list = tiles(slide_shape, 48, halo)
    canvas, total, _ = stitch([read_window(truth, r, OUTSIDE) for r, _ in tile_list], slide_shape, halo, tile_list)
    assert total == 3 and same_up_to_relabelling(canvas, truth)


def test_touching_group_crossing_the_border_is_counted():
    slide_shape = (200, 200)
    read, core = Box(50, 50, 114, 114), Box(66, 66, 98, 98)
    labels = np.zeros(read.shape, dtype=np.int32)
    labels[20:30, 20:30] = 4  # owned (centroid 74.5, 74.5), touches 8
    labels[30:40, 22:28] = 8  # owned (centroid 84.5, 74.5), touches 9
    labels[40:64, 24:27] = 9  # centroid row 101.5: not owned; reaches the bottom read border
    labels[20:25, 40:45] = 2  # owned, isolated
    owned = owned_instances(labels, read, core, slide_shape, halo=16)
    assert owned.source_ids.tolist() == [4, 2, 8]
    assert owned.n_in_cut_groups == 2  # 4 and 8 hang on 9, which the tile sees only in part
    labels[labels == 9] = 0
    assert owned_instances(labels, read, core, slide_shape, halo=16).n_in_cut_groups == 0


def test_owned_instance_touching_an_inner_border_raises_but_not_at_the_slide_edge():
    labels = np.zeros((48, 48), dtype=np.int32)
    labels[20:28, 0:40] = 1  # touches the left edge of the read box
    read, core = Box(10, 10, 58, 58), Box(26, 26, 42, 42)  # centroid (33.5, 29.5): owned
    with pytest.raises(StitchContractError, match="8 x 40 px"):
        owned_instances(labels, read, core, (100, 100), halo=16)
    # The same tile at the left slide edge: column 0 is the slide's own edge, nothing is missing.
    read, core = Box(10, 0, 58, 48), Box(26, 16, 42, 32)
    assert owned_instances(labels, read, core, (100, 100), halo=16).count == 1


def test_bad_arguments():
    read, core = Box(0, 0, 32, 32), Box(8, 8, 24, 24)
    with pytest.raises(ValueError, match="shape"):
        owned_instances(np.zeros((31, 32), np.int32), read, core, (64, 64), halo=8)
    with pytest.raises(ValueError, match="integers"):
        owned_instances(np.zeros((32, 32), np.float32), read, core, (64, 64), halo=8)
    with pytest.raises(ValueError, match="inside the read box"):
        owned_instances(np.zeros((32, 32), np.int32), read, Box(8, 8, 40, 24), (64, 64), halo=8)
    empty = owned_instances(np.zeros((32, 32), np.int32), read, core, (64, 64), halo=8)
    assert empty.count == 0 and not empty.labels.any()


def test_compact_ids_equal_sorting_ids_with_background_first():
    rng = np.random.default_rng(11)
    for trial in range(200):
        shape = tuple(int(v) for v in rng.integers(1, 30, 2))
        labels = rng.integers(0 if trial % 4 else 1, int(rng.integers(2, 50)), shape)  # some without background
        if trial % 7 == 0:
            labels = labels * 1_000_003  # ids too large to count: the sorting path
        ids, first, compact = np.unique(labels.ravel(), return_index=True, return_inverse=True)
        compact = compact.reshape(shape)
        if ids[0] != 0:
            ids, first, compact = np.concatenate([[0], ids]), np.concatenate([[-1], first]), compact + 1
        for got, expected in zip(compact_ids(labels), (ids, first, compact)):
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", range(6))
def test_groups_reaching_follows_every_chain_of_touching_instances(seed):
    """Against a brute-force walk over every pair of 8-neighbours: ids joined to a seed id through
    instances that touch (the sparse walk over the instances' pixels must find the same pairs)."""
    rng = np.random.default_rng(seed)
    n = 9
    compact = rng.integers(0, n, (23, 31)) * (rng.random((23, 31)) < (0.45, 0.2, 0.1)[seed % 3])
    seeds = np.zeros(n, bool)
    seeds[rng.integers(1, n)] = True
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    height, width = compact.shape
    for y in range(height):
        for x in range(width):
            for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < height and 0 <= xx < width:
                    a, b = int(compact[y, x]), int(compact[yy, xx])
                    if a and b and a != b:
                        parent[root(a)] = root(b)
    seed_roots = {root(i) for i in np.flatnonzero(seeds)}
    expected = np.array([i > 0 and root(i) in seed_roots for i in range(n)])
    expected[np.flatnonzero(seeds)] = True
    got = ownership._groups_reaching(compact, np.flatnonzero(compact), seeds, n)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("step", [(0, 1), (1, 0), (1, 1), (1, -1)])
def test_groups_reaching_sees_each_neighbour_direction(step):
    """Two one-pixel instances that touch only across one of the four directions are one group."""
    compact = np.zeros((5, 6), np.int64)
    compact[2, 2] = 1
    compact[2 + step[0], 2 + step[1]] = 2
    compact[0, 5] = 3  # alone
    seeds = np.array([False, True, False, False])
    got = ownership._groups_reaching(compact, np.flatnonzero(compact), seeds, 4)
    assert got.tolist() == [False, True, True, False]
