"""SlideReader on real files: synthetic SVS slides written here, and the shared fixtures when present.

References are computed independently: OpenSlide's own ``read_region`` for pass-through reads,
Pillow's resize for resampled reads, and the known disc centres of synthetic slides for geometry.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage as ndi

from wsi_grunet.errors import MissingMppError, SlideOpenError, SlideReadError
from wsi_grunet.geometry import Box
from wsi_grunet.slide import reader as reader_module
from wsi_grunet.slide.discovery import find_slides
from wsi_grunet.slide.reader import (
    SlideReader,
    describe,
    inspect_slide,
    open_reader_cached,
)
from wsi_grunet.slide.resample import choose_level, geometric_downsamples

from synthetic import write_rgb_image, write_synthetic_slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """2000 x 1500 px at 0.25 um/px, levels with downsample 1, 2, 4 (exactly)."""
    path = tmp_path_factory.mktemp("slides") / "even.svs"
    return write_synthetic_slide(path, 2000, 1500, mpp=0.25, levels=3, seed=1)


@pytest.fixture(scope="module")
def odd_slide(tmp_path_factory):
    """Odd sizes: OpenSlide reports non-integral downsamples (2.0012, 4.007) for levels 1 and 2."""
    path = tmp_path_factory.mktemp("slides") / "odd.svs"
    return write_synthetic_slide(path, 2003, 1499, mpp=0.25, levels=3, seed=2)


def _openslide_rgb(path, level, x, y, w, h) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as handle:
        return np.asarray(handle.read_region((x, y), level, (w, h)).convert("RGB"))


def _disc_centres(rgb: np.ndarray) -> np.ndarray:
    """Darkness-weighted centroids of dark blobs, in continuous pixel coordinates ((i, j) covers [i, i+1))."""
    darkness = 255.0 - rgb.mean(axis=2)
    labels, count = ndi.label(darkness > 85)
    sizes = np.bincount(labels.ravel())
    keep = [i for i in range(1, count + 1) if sizes[i] > 3]
    return np.array(ndi.center_of_mass(darkness, labels, keep)) + 0.5


# ---------------------------------------------------------------------------------------------
# Inspection and discovery
# ---------------------------------------------------------------------------------------------


def test_inspect_synthetic_slide(slide):
    info = inspect_slide(slide["path"])
    assert info.vendor == "aperio"
    assert (info.width, info.height) == (2000, 1500)
    assert info.mpp_x == pytest.approx(0.25) and info.mpp_y == pytest.approx(0.25)
    assert info.objective_power == 40
    assert info.level_count == 3
    assert info.level_dimensions == ((2000, 1500), (1000, 750), (500, 375))
    assert info.level_downsamples == (1.0, 2.0, 4.0)
    restored = json.loads(json.dumps(info.to_dict()))
    assert restored["level_dimensions"] == [[2000, 1500], [1000, 750], [500, 375]]
    assert restored["mpp_x"] == pytest.approx(0.25)


def test_describe_names_levels_and_the_level_read(slide):
    text = describe(inspect_slide(slide["path"]), model_mpp=0.5)
    assert str(slide["path"]) in text
    assert "0.25 x 0.25 um/px" in text and "40x" in text
    assert "level 2: 500 x 375 px" in text
    assert "reads level 1" in text and "copied without resampling" in text
    assert "750 x 1000" in text


def test_missing_file_and_non_slide_raise_slide_open_error(tmp_path):
    with pytest.raises(SlideOpenError, match="no such file"):
        inspect_slide(tmp_path / "absent.svs")
    fake = tmp_path / "notes.svs"
    fake.write_text("not a slide")
    with pytest.raises(SlideOpenError, match=r"notes\.svs: not a slide file"):
        SlideReader(fake, 0.5)
    with pytest.raises(SlideOpenError, match="folder"):
        inspect_slide(tmp_path)


def test_choose_level_never_upsamples_when_a_finer_level_exists():
    downsamples = (1.0, 4.0001, 16.0004)
    assert choose_level(downsamples, 2.0) == 0
    assert choose_level(downsamples, 4.0) == 1  # 4.0001 is within 1% of 4
    assert choose_level(downsamples, 3.9) == 0
    assert choose_level(downsamples, 15.0) == 1
    assert choose_level(downsamples, 100.0) == 2
    assert choose_level(downsamples, 0.5) == 0  # even level 0 is coarser: upsample it


def test_geometric_downsamples(odd_slide):
    info = inspect_slide(odd_slide["path"])
    assert info.level_downsamples[1] != 2.0  # what OpenSlide reports for 2003 -> 1001 px
    assert geometric_downsamples(info) == (1.0, 2.0, 4.0)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target,level", [(0.25, 0), (0.5, 1), (1.0, 2)])
def test_pass_through_when_a_level_matches_the_target(slide, target, level):
    with SlideReader(slide["path"], target) as reader:
        assert reader.level == level
        assert reader.level0_per_model == 2**level
        assert reader.model_shape == (1500 // 2**level, 2000 // 2**level)
        got = reader.read(Box(40, 70, 240, 370))
    assert got.dtype == np.uint8 and got.shape == (200, 300, 3)
    np.testing.assert_array_equal(got, _openslide_rgb(slide["path"], level, 70 * 2**level, 40 * 2**level, 300, 200))


@pytest.mark.parametrize("target", [0.2, 0.25, 0.37, 0.5, 0.7, 1.0, 1.6])
@pytest.mark.parametrize("which", ["slide", "odd_slide"])
def test_nuclei_land_where_the_geometry_says(request, which, target):
    truth = request.getfixturevalue(which)
    with SlideReader(truth["path"], target) as reader:
        image = reader.read(Box(0, 0, *reader.model_shape))
        scale = reader.level0_per_model
    assert scale == pytest.approx(target / 0.25)
    found = _disc_centres(image)
    expected = truth["centres"] / scale
    assert len(found) == len(expected)
    distance = np.sqrt(((found[:, None, :] - expected[None, :, :]) ** 2).sum(axis=2)).min(axis=1)
    # sub-pixel: a systematic offset of half a pixel or a drift across the slide would fail this
    assert distance.mean() < 0.15 and distance.max() < 0.4


@pytest.mark.parametrize("target", [0.25, 0.37, 0.5, 0.7, 1.0, 2.3, 5.0])
def test_overlapping_reads_agree_exactly(slide, target):
    with SlideReader(slide["path"], target) as reader:
        big = reader.read(Box(-20, -30, 260, 330))
        for box in [Box(0, 0, 100, 100), Box(37, 51, 203, 299), Box(-20, 100, 16, 160)]:
            np.testing.assert_array_equal(reader.read(box), big[box.relative_to(Box(-20, -30, 0, 0)).slices()])


@pytest.mark.parametrize("target", [0.25, 0.5, 0.7, 3.0])
def test_outside_the_slide_is_white(slide, target):
    with SlideReader(slide["path"], target) as reader:
        h, w = reader.model_shape
        assert (reader.read(Box(-64, -64, -1, 300)) == 255).all()
        assert (reader.read(Box(h + 5, w + 5, h + 50, w + 90)) == 255).all()
        # first model row/column wholly past the slide's end (the one before may straddle it)
        y_out, x_out = math.ceil(1500 / reader.level0_per_model), math.ceil(2000 / reader.level0_per_model)
        edge = reader.read(Box(y_out - 32, x_out - 32, y_out + 32, x_out + 32))
        # glass is not pure white, so the slide's corner is visibly there and the rest is 255
        assert (edge[32:, :] == 255).all() and (edge[:, 32:] == 255).all()
        assert (edge[:30, :30] < 250).any()


def test_resampling_matches_pillow_bilinear(tmp_path):
    # A one-level slide forces resampling from level 0; Pillow's BILINEAR resize with the same
    # box is an independent implementation of the same antialiased linear filter.
    truth = write_synthetic_slide(tmp_path / "flat.svs", 900, 700, mpp=0.25, levels=1, seed=5)
    source = _openslide_rgb(truth["path"], 0, 0, 0, 900, 700)
    for target in [0.37, 0.5, 0.8, 0.2]:
        with SlideReader(truth["path"], target) as reader:
            scale = reader.level0_per_model
            h, w = int(700 / scale), int(900 / scale)
            got = reader.read(Box(0, 0, h, w)).astype(int)
        ref = np.asarray(
            Image.fromarray(source).resize((w, h), Image.Resampling.BILINEAR, box=(0, 0, w * scale, h * scale))
        ).astype(int)
        inner = np.abs(got - ref)[3:-3, 3:-3]  # Pillow renormalises its filter at the image border
        assert inner.max() <= 2, f"target {target}: max difference {inner.max()}"


def test_thumbnail_sizes_pixel_size_and_blocks(slide, monkeypatch):
    with SlideReader(slide["path"], 0.5) as reader:
        image, um = reader.thumbnail(8.0)
        assert um == 8.0
        assert image.shape == (47, 63, 3)  # 46.875 x 62.5 rounded half up
        image, um = reader.thumbnail(3.0)
        assert um == 3.0 and image.shape == (125, 167, 3)
        # read in small blocks, the thumbnail equals a single read at the same pixel size
        monkeypatch.setattr(reader_module, "_THUMBNAIL_BLOCK", 40)
        blocked, _ = reader.thumbnail(1.3)
    with SlideReader(slide["path"], 1.3) as single:
        np.testing.assert_array_equal(blocked, single.read(Box(0, 0, *single.model_shape)))


def test_missing_mpp_needs_an_override(tmp_path):
    path = tmp_path / "plain.tiff"
    write_rgb_image(path, np.full((200, 300, 3), 200, dtype=np.uint8), mpp=None, levels=2, tile=64)
    info = inspect_slide(path)
    assert info.mpp_x is None and info.vendor == "generic-tiff"
    with pytest.raises(MissingMppError, match=r"plain\.tiff: the slide records no microns-per-pixel.*pass --mpp"):
        SlideReader(path, 0.5)
    with SlideReader(path, 0.5, mpp_override=0.25) as reader:
        assert reader.slide_mpp == 0.25 and reader.model_shape == (100, 150) and reader.level == 1
        assert (reader.read(Box(0, 0, 100, 150)) == 200).all()


def test_reader_pickles_and_is_cached(slide):
    reader = open_reader_cached(slide["path"], 0.5, None)
    assert open_reader_cached(str(slide["path"]), 0.5) is reader
    assert open_reader_cached(slide["path"], 0.7, None) is not reader
    clone = pickle.loads(pickle.dumps(reader))
    box = Box(10, 20, 110, 220)
    np.testing.assert_array_equal(clone.read(box), reader.read(box))
    clone.close()


# ---------------------------------------------------------------------------------------------
# Shared fixtures: real slides and broken files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slides_dir(shared_dir) -> Path:
    return shared_dir / "slides"


@pytest.mark.shared
def test_cmu_small_region_metadata(slides_dir):
    info = inspect_slide(slides_dir / "CMU-1-Small-Region.svs")
    assert info.vendor == "aperio" and (info.width, info.height) == (2220, 2967)
    assert info.mpp_x == pytest.approx(0.499) and info.objective_power == 20
    assert info.level_count == 1 and set(info.associated_images) == {"label", "macro", "thumbnail"}


@pytest.mark.shared
def test_cmu_read_at_half_micron_matches_independent_resampling(slides_dir):
    path = slides_dir / "CMU-1-Small-Region.svs"
    with SlideReader(path, 0.5) as reader:
        scale = reader.level0_per_model
        assert scale == pytest.approx(0.5 / 0.499)
        assert reader.model_shape == (round(2967 / scale), round(2220 / scale))
        box = Box(1200, 700, 1712, 1212)
        got = reader.read(box).astype(int)
    # independent: OpenSlide level-0 region, resampled by Pillow with the same affine box
    y0, x0 = int(box.y0 * scale) - 8, int(box.x0 * scale) - 8
    source = Image.fromarray(_openslide_rgb(path, 0, x0, y0, 540, 540))
    ref = np.asarray(
        source.resize(
            (box.width, box.height),
            Image.Resampling.BILINEAR,
            box=(box.x0 * scale - x0, box.y0 * scale - y0, box.x1 * scale - x0, box.y1 * scale - y0),
        )
    ).astype(int)
    assert np.abs(got - ref).max() <= 2


@pytest.mark.shared
def test_cmu_pass_through_out_of_bounds_and_thumbnail(slides_dir):
    path = slides_dir / "CMU-1-Small-Region.svs"
    with SlideReader(path, 0.499) as reader:
        assert reader.level0_per_model == 1.0 and reader.model_shape == (2967, 2220)
        got = reader.read(Box(1000, 500, 1300, 900))
        np.testing.assert_array_equal(got, _openslide_rgb(path, 0, 500, 1000, 400, 300))
        corner = reader.read(Box(2900, 2200, 3000, 2300))
        assert (corner[67:] == 255).all() and (corner[:, 20:] == 255).all()
        image, um = reader.thumbnail(8.0)
        assert um == 8.0 and image.shape == (round(2967 * 0.499 / 8), round(2220 * 0.499 / 8), 3)


@pytest.mark.shared
def test_generic_tiff_with_absurd_resolution_has_no_mpp(slides_dir):
    path = slides_dir / "fixtures" / "boxes.tiff"
    info = inspect_slide(path)
    assert info.mpp_x is None and info.mpp_rejected == pytest.approx(352.8, abs=0.1)
    with pytest.raises(MissingMppError, match="boxes.tiff"):
        SlideReader(path, 0.5)
    reference = np.asarray(Image.open(slides_dir / "fixtures" / "boxes-no-icc.png").convert("RGB"))
    with SlideReader(path, 1.0, mpp_override=1.0) as reader:
        np.testing.assert_array_equal(reader.read(Box(0, 0, 250, 300)), reference)
    with SlideReader(path, 4.0, mpp_override=1.0) as reader:
        assert reader.level == 2 and reader.model_shape == (63, 75)  # 62.5 rounded half up
        small = reader.read(Box(0, 0, 62, 75)).astype(int)
    # the boxes are flat colours: level 2 resembles the reference averaged over 4 x 4 blocks
    blocks = reference[:248, :300].reshape(62, 4, 75, 4, 3).mean(axis=(1, 3))
    assert np.abs(small - blocks).mean() < 12


@pytest.mark.shared
@pytest.mark.parametrize("name", ["small.svs", "boxes_0.dcm", "boxes_1.dcm"])
def test_small_aperio_and_dicom_series(slides_dir, name):
    path = slides_dir / "fixtures" / name
    with SlideReader(path, 0.499) as reader:
        assert reader.info.mpp_x == pytest.approx(0.499)
        got = reader.read(Box(0, 0, 16, 16))
        np.testing.assert_array_equal(got, _openslide_rgb(path, 0, 0, 0, 16, 16))
        assert got.std() > 0


@pytest.mark.shared
def test_dicom_series_is_listed_once(slides_dir):
    found = find_slides([slides_dir / "fixtures"])
    assert [(e.path.name, e.name) for e in found if e.path.suffix == ".dcm"] == [("boxes_0.dcm", "fixtures")]


@pytest.mark.shared
def test_corrupt_tiles_raise_slide_read_error(slides_dir):
    path = slides_dir / "fixtures" / "unreadable.svs"
    with (
        SlideReader(path, 0.499) as reader,  # the header is fine
        pytest.raises(SlideReadError, match=r"unreadable\.svs.*level 0"),
    ):
        reader.read(Box(0, 0, 16, 16))


@pytest.mark.shared
@pytest.mark.parametrize(
    "name,message",
    [("unopenable.tiff", "unsupported format/compression: .*compression"), ("broken.svs", "not a slide file")],
)
def test_unopenable_files_raise_slide_open_error(slides_dir, name, message):
    with pytest.raises(SlideOpenError, match=f"{name}: {message}"):
        inspect_slide(slides_dir / "fixtures" / name)
    with pytest.raises(SlideOpenError, match=name):
        SlideReader(slides_dir / "fixtures" / name, 0.5)
