"""A core's labels painted from the nuclei its own tile and its neighbours own, read back from zarr."""

from __future__ import annotations

import numpy as np
import zarr

from wsi_grunet.geometry import Box
from wsi_grunet.label_image import write_label_shard
from wsi_grunet.outputs.zarr_store import LABELS_PATH, OmeZarrWriter
from wsi_grunet.tile_work import owned_label_pixels, save_owned_labels, tile_files
from wsi_grunet.tiling import Tile


def test_owned_labels_round_trip_as_their_pixels(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.where(rng.random((37, 53)) < 0.1, rng.integers(1, 9, (37, 53)), 0).astype(np.int32)
    save_owned_labels(tmp_path / "t.labels.npz", labels)
    rows, cols, values = owned_label_pixels(tmp_path / "t.labels.npz", labels.shape[1])
    back = np.zeros_like(labels)
    back[rows, cols] = values
    np.testing.assert_array_equal(back, labels)
    assert values.dtype == labels.dtype and len(values) == np.count_nonzero(labels)


def test_core_is_painted_from_its_sources_lower_tile_index_winning(tmp_path):
    # Two tiles side by side, cores 32 px wide, reads with an 8-px halo; the zarr holds the first core.
    shape = (32, 64)
    left = Tile(0, 0, 0, Box(0, 0, 32, 32), Box(0, 0, 32, 40))
    right = Tile(1, 0, 1, Box(0, 32, 32, 64), Box(0, 24, 32, 64))
    own_left = np.zeros(left.read.shape, np.int32)
    own_left[4:10, 28:36] = 1  # reaches 4 px past its core (into the right core)
    own_right = np.zeros(right.read.shape, np.int32)
    own_right[20:26, 2:12] = 1  # reaches 6 px into the left core (read columns 24..30)
    own_right[4:10, 10:14] = 2  # claims pixels the left tile also owns (columns 34..37 of the slide)
    work = tmp_path / "work"
    work.mkdir()
    save_owned_labels(tile_files(work, 0).labels, own_left)
    save_owned_labels(tile_files(work, 1).labels, own_right)
    path = tmp_path / "s.ome.zarr"
    OmeZarrWriter(path, shape, 0.5, shard=32, chunk=16, levels=1, name="s")
    sources = [(right, 100), (left, 0)]  # any order: tile 0 wins shared pixels
    write_label_shard(left.core, sources, str(path), str(work))
    write_label_shard(right.core, sources, str(path), str(work))
    painted = zarr.open_array(store=str(path), path=f"{LABELS_PATH}/0", mode="r")[:]
    expected = np.zeros(shape, np.int32)
    expected[20:26, 26:36] = 101
    expected[4:10, 34:38] = 102
    expected[4:10, 28:36] = 1
    np.testing.assert_array_equal(painted, expected)
