"""OME-Zarr 0.5 writer (wsi_grunet.outputs.zarr_store), read back with ome-zarr-py and plain zarr."""

from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Labels, Multiscales, Reader

from wsi_grunet.errors import OutputError
from wsi_grunet.geometry import Box
from wsi_grunet.outputs.zarr_store import OmeZarrWriter, mean_2x2

SHAPE = (150, 230)  # deliberately not a multiple of the shard
PIXEL_UM = 0.5


def expected_mean_level(src: np.ndarray) -> np.ndarray:
    """Reference 2x2 mean: each output pixel is the mean of the source pixels present, rounded half up."""
    out = np.zeros((math.ceil(src.shape[0] / 2), math.ceil(src.shape[1] / 2)), np.uint8)
    for y in range(out.shape[0]):
        for x in range(out.shape[1]):
            block = src[2 * y : 2 * y + 2, 2 * x : 2 * x + 2].astype(np.float64)
            out[y, x] = math.floor(block.mean() + 0.5)
    return out


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    prob = rng.random(SHAPE).astype(np.float32)
    prob[:64, :64] = 0.0  # one shard of background
    labels = rng.integers(0, 5000, SHAPE).astype(np.int32)
    labels[:, 200:] = 0
    return prob, labels


def fill(writer: OmeZarrWriter, prob, labels) -> None:
    for box in writer.shard_boxes():
        writer.write_probability(box, prob[box.slices()])
        writer.write_labels(box, labels[box.slices()])


@pytest.fixture(scope="module")
def store(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("zarr") / "slide.ome.zarr"
    writer = OmeZarrWriter(path, SHAPE, PIXEL_UM, shard=64, chunk=32, levels=4, name="slide-A")
    fill(writer, *data)
    writer.build_pyramid()
    return path, writer


def test_independent_reader_sees_image_and_labels(store):
    path, writer = store
    location = parse_url(str(path))
    assert location.version == "0.5"
    nodes = list(Reader(location)())
    image = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs) and n.zarr.path == location.path)
    assert any(isinstance(s, Labels) for n in nodes for s in n.specs)
    label_node = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    assert label_node.metadata["name"] == "nuclei"
    assert writer.levels == 4
    assert len(image.data) == len(label_node.data) == writer.levels
    for node, dtype in ((image, np.uint8), (label_node, np.int32)):
        assert [a["name"] for a in node.metadata["axes"]] == ["y", "x"]
        assert all(a["unit"] == "micrometer" and a["type"] == "space" for a in node.metadata["axes"])
        for level, (array, transforms) in enumerate(zip(node.data, node.metadata["coordinateTransformations"])):
            assert array.dtype == dtype
            assert array.shape == writer.shapes[level]
            assert transforms[0] == {"type": "scale", "scale": [PIXEL_UM * 2**level] * 2}
    image_shift = [t[1]["translation"] for t in image.metadata["coordinateTransformations"]]
    assert image_shift == [[(2**i - 1) / 2 * PIXEL_UM] * 2 for i in range(writer.levels)]


def test_values_read_back_through_both_readers(store, data):
    path, _ = store
    prob, labels = data
    expected_prob = np.rint(prob * 255).astype(np.uint8)
    nodes = list(Reader(parse_url(str(path)))())
    image = nodes[0]
    label_node = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    np.testing.assert_array_equal(np.asarray(image.data[0]), expected_prob)
    np.testing.assert_array_equal(np.asarray(label_node.data[0]), labels)
    root = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(root["0"][:], expected_prob)
    np.testing.assert_array_equal(root["labels/nuclei/0"][:], labels)
    assert root.attrs["ome"]["version"] == "0.5"
    assert root["labels"].attrs["ome"]["labels"] == ["nuclei"]
    assert root["labels/nuclei"].attrs["ome"]["image-label"]["source"] == {"image": "../../"}


def test_pyramid_levels_are_means_and_nearest_labels(store, data):
    path, writer = store
    prob, labels = data
    root = zarr.open_group(str(path), mode="r")
    level = np.rint(prob * 255).astype(np.uint8)
    for i in range(1, writer.levels):
        level = expected_mean_level(level)
        np.testing.assert_array_equal(root[str(i)][:], level)
        np.testing.assert_array_equal(root[f"labels/nuclei/{i}"][:], labels[:: 2**i, :: 2**i])
    datasets = root["labels/nuclei"].attrs["ome"]["multiscales"][0]["datasets"]
    label_shift = [d["coordinateTransformations"][1]["translation"] for d in datasets]
    assert label_shift == [[0.0, 0.0]] * writer.levels  # top-left sampling keeps level-0 pixel centres


def test_arrays_are_sharded_and_compressed(store):
    path, _ = store
    for array_path in ("0", "labels/nuclei/0", "1"):
        meta = json.loads((path / array_path / "zarr.json").read_text())
        assert meta["zarr_format"] == 3
        sharding = meta["codecs"][0]
        assert sharding["name"] == "sharding_indexed"
        assert sharding["configuration"]["chunk_shape"] == [32, 32]
        inner = [c["name"] for c in sharding["configuration"]["codecs"]]
        assert "blosc" in inner or "zstd" in inner
    assert json.loads((path / "0" / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"] == [64, 64]
    # A shard of background is not stored at all; its neighbour is.
    assert not (path / "0" / "c" / "0" / "0").exists()
    assert (path / "0" / "c" / "0" / "1").exists()


def test_writes_must_cover_whole_shards(tmp_path):
    writer = OmeZarrWriter(tmp_path / "a.ome.zarr", (100, 130), PIXEL_UM, shard=64, chunk=32, levels=2, name="a")
    ok_edge = Box(64, 64, 100, 130)  # cut by the bottom/right border: still one owner
    writer.write_labels(ok_edge, np.ones(ok_edge.shape, np.int32))
    writer.write_probability(Box(0, 0, 64, 128), np.zeros((64, 128), np.float32))  # two whole shards
    for bad in (Box(0, 0, 32, 64), Box(32, 0, 96, 64), Box(0, 0, 64, 100), Box(64, 64, 100, 140)):
        with pytest.raises(ValueError):
            writer.write_labels(bad, np.zeros(bad.shape, np.int32))
    with pytest.raises(ValueError, match="do not match"):
        writer.write_probability(Box(0, 0, 64, 64), np.zeros((64, 63), np.float32))
    with pytest.raises(ValueError, match="0..2147483647"):
        writer.write_labels(Box(0, 0, 64, 64), np.full((64, 64), 2**40, np.int64))


def test_chunk_falls_back_to_gcd_and_levels_stop_at_one_chunk(tmp_path):
    writer = OmeZarrWriter(tmp_path / "g.ome.zarr", (300, 200), PIXEL_UM, shard=96, chunk=64, levels=8, name="g")
    assert writer.chunk == 32
    # The last level fits one 32-px chunk; the one before it did not.
    assert writer.shapes == [(300, 200), (150, 100), (75, 50), (38, 25), (19, 13)]
    root = zarr.open_group(str(tmp_path / "g.ome.zarr"), mode="r")
    assert len(root.attrs["ome"]["multiscales"][0]["datasets"]) == 5
    assert len(root["labels/nuclei"].attrs["ome"]["multiscales"][0]["datasets"]) == 5
    assert json.loads((tmp_path / "g.ome.zarr" / "0" / "zarr.json").read_text())["codecs"][0]["configuration"][
        "chunk_shape"
    ] == [32, 32]


def test_existing_store_is_not_replaced_silently(tmp_path):
    path = tmp_path / "e.ome.zarr"
    OmeZarrWriter(path, (64, 64), PIXEL_UM, shard=64, chunk=32, levels=2, name="e")
    with pytest.raises(OutputError, match="already exists"):
        OmeZarrWriter(path, (64, 64), PIXEL_UM, shard=64, chunk=32, levels=2, name="e")
    OmeZarrWriter(path, (64, 64), PIXEL_UM, shard=64, chunk=32, levels=2, name="e", overwrite=True)
    with pytest.raises(OutputError, match="not an OME-Zarr store"):
        OmeZarrWriter.open(tmp_path / "nothing.ome.zarr")


def test_processes_writing_different_shards_lose_nothing(tmp_path, data):
    prob, labels = data
    path = tmp_path / "p.ome.zarr"
    writer = OmeZarrWriter(path, SHAPE, PIXEL_UM, shard=64, chunk=32, levels=4, name="p")
    boxes = writer.shard_boxes()
    assert len(boxes) == 12  # 3 x 4 shards of 64 px
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        # The writer pickles as a re-open of its path, so each process has its own handles.
        futures = [pool.submit(writer.write_labels, b, labels[b.slices()]) for b in boxes]
        futures += [pool.submit(writer.write_probability, b, prob[b.slices()]) for b in boxes]
        for future in futures:
            future.result()
        writer.build_pyramid(executor=pool)
    serial = tmp_path / "s.ome.zarr"
    reference = OmeZarrWriter(serial, SHAPE, PIXEL_UM, shard=64, chunk=32, levels=4, name="s")
    fill(reference, prob, labels)
    reference.build_pyramid()
    a, b = zarr.open_group(str(path), mode="r"), zarr.open_group(str(serial), mode="r")
    np.testing.assert_array_equal(a["labels/nuclei/0"][:], labels)
    for level in range(writer.levels):
        np.testing.assert_array_equal(a[str(level)][:], b[str(level)][:])
        np.testing.assert_array_equal(a[f"labels/nuclei/{level}"][:], b[f"labels/nuclei/{level}"][:])


def test_reopened_writer_matches_the_original(store):
    path, writer = store
    again = OmeZarrWriter.open(path)
    assert again.shapes == writer.shapes
    assert (again.chunk, again.shard, again.pixel_um, again.name) == (32, 64, PIXEL_UM, "slide-A")


def test_a_store_made_again_at_the_same_path_is_read_again(tmp_path):
    """Writers are opened once per process; a store made anew where one was (a slide run again) is not
    mistaken for the old one."""
    path = tmp_path / "again.ome.zarr"
    OmeZarrWriter(path, (256, 192), PIXEL_UM, shard=64, chunk=32, levels=2, name="first")
    first = OmeZarrWriter.open(path)
    first.write_probability(Box(0, 0, 64, 64), np.full((64, 64), 0.5, np.float32))
    assert OmeZarrWriter.open(path) is first  # the same process reuses what it read
    shutil.rmtree(path)
    OmeZarrWriter(path, (128, 128), PIXEL_UM, shard=128, chunk=64, levels=3, name="second")
    second = OmeZarrWriter.open(path)
    assert (second.name, second.chunk, second.shard, second.shapes[0]) == ("second", 64, 128, (128, 128))
    second.write_probability(Box(0, 0, 128, 128), np.full((128, 128), 1.0, np.float32))
    level0 = zarr.open_array(str(path / "0"), mode="r")
    assert level0.shape == (128, 128) and level0.chunks == (64, 64) and (level0[:] == 255).all()


# -- the RGB slide in the same store -------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb_store(tmp_path_factory, data):
    prob, labels = data
    rgb = np.random.default_rng(5).integers(0, 256, (*SHAPE, 3)).astype(np.uint8)
    path = tmp_path_factory.mktemp("zarr-rgb") / "slide.ome.zarr"
    writer = OmeZarrWriter(path, SHAPE, PIXEL_UM, shard=64, chunk=32, levels=4, name="slide-RGB", rgb=True)
    for b in writer.shard_boxes():
        writer.write_probability(b, prob[b.slices()], rgb[b.slices()])  # one write per shard: both together
        writer.write_labels(b, labels[b.slices()])
    writer.build_pyramid()
    return path, writer, rgb


def test_rgb_channels_read_back_with_ome_zarr(rgb_store, data):
    path, writer, rgb = rgb_store
    prob, labels = data
    nodes = list(Reader(parse_url(str(path)))())
    image = nodes[0]
    assert [a["name"] for a in image.metadata["axes"]] == ["c", "y", "x"]
    assert image.metadata["axes"][0]["type"] == "channel"
    assert image.metadata["channel_names"] == ["nucleus probability", "red", "green", "blue"]
    for level, (array, transforms) in enumerate(zip(image.data, image.metadata["coordinateTransformations"])):
        assert array.shape == (4, *writer.shapes[level]) and array.dtype == np.uint8
        assert transforms[0]["scale"] == [1.0, PIXEL_UM * 2**level, PIXEL_UM * 2**level]
    level0 = np.asarray(image.data[0])
    np.testing.assert_array_equal(level0[0], np.rint(prob * 255).astype(np.uint8))
    np.testing.assert_array_equal(np.moveaxis(level0[1:], 0, -1), rgb)
    # Every channel's pyramid is the 2x2 mean of the level above; labels stay (y, x) with the same extent.
    expected = [level0[c] for c in range(4)]
    label_node = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    for level in range(1, writer.levels):
        expected = [expected_mean_level(e) for e in expected]
        np.testing.assert_array_equal(np.asarray(image.data[level]), np.stack(expected))
        assert label_node.data[level].shape == writer.shapes[level]
    np.testing.assert_array_equal(np.asarray(label_node.data[0]), labels)


def test_rgb_store_layout_and_reopen(rgb_store):
    path, writer, _ = rgb_store
    meta = json.loads((path / "0" / "zarr.json").read_text())
    assert meta["shape"] == [4, *SHAPE] and meta["dimension_names"] == ["c", "y", "x"]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 64, 64]  # a shard holds all channels
    assert meta["codecs"][0]["configuration"]["chunk_shape"] == [1, 32, 32]  # a chunk holds one
    omero = zarr.open_group(str(path), mode="r").attrs["ome"]["omero"]
    assert [c["color"] for c in omero["channels"]] == ["00FF00", "FF0000", "00FF00", "0000FF"]
    again = OmeZarrWriter.open(path)
    assert again.rgb and again.shapes == writer.shapes and (again.chunk, again.shard) == (32, 64)
    assert again.pixel_um == PIXEL_UM


def test_rgb_must_be_written_with_the_probability(tmp_path):
    b = Box(0, 0, 64, 64)
    with_rgb = OmeZarrWriter(
        tmp_path / "r.ome.zarr", (64, 64), PIXEL_UM, shard=64, chunk=32, levels=1, name="r", rgb=True
    )
    with pytest.raises(ValueError, match="with its rgb"):
        with_rgb.write_probability(b, np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="rgb must be uint8"):
        with_rgb.write_probability(b, np.zeros((64, 64), np.float32), np.zeros((64, 64, 3), np.float32))
    plain = OmeZarrWriter(tmp_path / "p.ome.zarr", (64, 64), PIXEL_UM, shard=64, chunk=32, levels=1, name="p")
    with pytest.raises(ValueError, match="no RGB channels"):
        plain.write_probability(b, np.zeros((64, 64), np.float32), np.zeros((64, 64, 3), np.uint8))


@pytest.mark.parametrize("shape", [(6, 8), (7, 8), (6, 9), (5, 3), (1, 1)])
def test_mean_2x2_is_each_blocks_rounded_mean(shape):
    """Every output pixel is the mean of its 2x2 block rounded half up; where a last row or column is
    odd, the pixels present stand in for the missing ones (their mean)."""
    rng = np.random.default_rng(sum(shape))
    block = rng.integers(0, 256, shape, dtype=np.uint8)
    block[0, : min(2, shape[1])] = (0, 1)[: shape[1]]  # small sums: 1 or 2 over 4 round to 0 or 1 (half up)
    out = mean_2x2(block)
    assert out.shape == ((shape[0] + 1) // 2, (shape[1] + 1) // 2)
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            present = block[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].astype(float)
            assert out[r, c] == math.floor(present.mean() + 0.5), (r, c)
