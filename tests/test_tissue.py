"""Tissue mask: synthetic scenes with known answers, and real H&E crops (blank, pen marks, tissue)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from wsi_grunet.config import TissueOptions
from wsi_grunet.geometry import Box
from wsi_grunet.slide.tissue import tile_has_tissue, tissue_mask

GLASS = (242, 241, 244)
PINK = (228, 160, 200)
PALE_PINK = (236, 200, 222)
PURPLE = (110, 60, 150)

NO_DILATION = TissueOptions(min_region_um2=2000.0, dilation_um=0.0)


def _scene(shape=(200, 300), colour=GLASS, noise=0.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.empty(shape + (3,), dtype=np.float32)
    image[:] = colour
    if noise:
        image += rng.normal(0.0, noise, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _disk(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r


# ---------------------------------------------------------------------------------------------
# Synthetic scenes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("colour", [GLASS, (255, 255, 255), (225, 225, 225), (40, 40, 40)])
@pytest.mark.parametrize("noise", [0.0, 3.0])
def test_grey_images_have_no_tissue(colour, noise):
    image = _scene(colour=colour, noise=noise)
    assert not tissue_mask(image, 8.0, TissueOptions()).any()
    assert not tissue_mask(image, 1.0, NO_DILATION).any()


@pytest.mark.parametrize("colour", [PINK, PALE_PINK, PURPLE])
def test_an_image_that_is_all_tissue_is_all_tissue(colour):
    image = _scene(colour=colour, noise=3.0)
    assert tissue_mask(image, 8.0, TissueOptions()).all()


def test_pink_and_purple_without_glass_are_both_tissue():
    # Otsu alone would split pale eosin from haematoxylin here; the ceiling keeps both.
    image = _scene(colour=PALE_PINK, noise=2.0)
    image[:, 150:] = PURPLE
    assert tissue_mask(image, 8.0, NO_DILATION).mean() > 0.99


def test_tissue_disk_on_glass_is_found_and_dilated_by_the_requested_microns():
    shape, pixel_um = (240, 240), 4.0
    disk = _disk(shape, 120, 120, 60)
    image = _scene(shape, noise=2.0)
    image[disk] = PINK
    plain = tissue_mask(image, pixel_um, NO_DILATION)
    assert (plain & disk).sum() / (plain | disk).sum() > 0.97
    grown = tissue_mask(image, pixel_um, TissueOptions(min_region_um2=2000.0, dilation_um=40.0))
    expected = _disk(shape, 120, 120, 60 + 40.0 / pixel_um)
    assert (grown & expected).sum() / (grown | expected).sum() > 0.97
    assert grown.sum() > plain.sum()


def test_specks_smaller_than_min_region_are_dropped_and_holes_filled():
    shape, pixel_um = (300, 300), 2.0
    image = _scene(shape, noise=2.0)
    big = _disk(shape, 150, 100, 50)  # 7850 px = 31400 um2
    hole = _disk(shape, 150, 100, 12)
    speck = _disk(shape, 40, 250, 6)  # 113 px = 450 um2
    image[big & ~hole] = PINK
    image[speck] = PURPLE
    mask = tissue_mask(image, pixel_um, TissueOptions(min_region_um2=5000.0, dilation_um=0.0))
    assert mask[hole].all(), "holes inside tissue are filled"
    assert not mask[speck].any(), "specks below min_region_um2 are dropped"
    assert mask[big].mean() > 0.98
    kept = tissue_mask(image, pixel_um, TissueOptions(min_region_um2=100.0, dilation_um=0.0))
    assert kept[speck].mean() > 0.9


def test_sizes_are_in_microns_not_pixels():
    # The same scene at 2 and 8 um/px gives the same tissue area in um2 (within sampling error).
    fine = _scene((400, 400), noise=2.0)
    fine[_disk((400, 400), 200, 200, 120)] = PINK
    coarse = np.asarray(Image.fromarray(fine).reduce(4))
    options = TissueOptions(min_region_um2=20000.0, dilation_um=64.0)
    area_fine = tissue_mask(fine, 2.0, options).sum() * 2.0**2
    area_coarse = tissue_mask(coarse, 8.0, options).sum() * 8.0**2
    assert area_fine == pytest.approx(area_coarse, rel=0.05)
    assert area_fine == pytest.approx(np.pi * (240 + 64) ** 2, rel=0.05)


@pytest.mark.parametrize(
    "ink",
    [(40, 170, 140), (60, 120, 200), (30, 60, 140), (20, 20, 25)],
    ids=["green", "blue", "dark-blue", "black"],
)
def test_ink_strokes_on_glass_are_not_tissue(ink):
    shape = (200, 300)
    image = _scene(shape, noise=2.0)
    image[80:120, 20:280] = ink
    assert not tissue_mask(image, 4.0, TissueOptions(min_region_um2=2000.0)).any()


def test_ink_over_tissue_is_removed_but_the_tissue_around_stays():
    shape = (200, 300)
    image = _scene(shape, colour=PINK, noise=2.0)
    image[:, :100] = GLASS
    image[:, 180:200] = (40, 170, 140)  # a green stroke across the tissue
    mask = tissue_mask(image, 4.0, NO_DILATION)
    assert mask[:, 110:170].mean() > 0.99 and mask[:, 210:].mean() > 0.99
    assert not mask[:, :90].any()


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((10, 10), dtype=np.uint8), 8.0, TissueOptions())
    with pytest.raises(ValueError):
        tissue_mask(_scene((10, 10)), 0.0, TissueOptions())
    assert tissue_mask(np.zeros((0, 5, 3), dtype=np.uint8), 8.0, TissueOptions()).shape == (0, 5)


# ---------------------------------------------------------------------------------------------
# tile_has_tissue
# ---------------------------------------------------------------------------------------------


def test_tile_has_tissue_maps_model_boxes_onto_mask_pixels():
    # mask at 8 um/px, model at 0.5 um/px: one mask pixel = 16 x 16 model pixels
    mask = np.zeros((10, 10), dtype=bool)
    mask[3, 5] = True  # model pixels y in [48, 64), x in [80, 96)
    assert tile_has_tissue(mask, 8.0, Box(48, 80, 64, 96), 0.5)
    assert tile_has_tissue(mask, 8.0, Box(0, 0, 49, 81), 0.5)  # overlaps by one model pixel
    assert not tile_has_tissue(mask, 8.0, Box(0, 0, 48, 80), 0.5)  # ends exactly at the pixel
    assert not tile_has_tissue(mask, 8.0, Box(64, 0, 160, 160), 0.5)
    assert tile_has_tissue(mask, 8.0, Box(-100, -100, 200, 200), 0.5)  # reaches past the slide
    assert not tile_has_tissue(mask, 8.0, Box(-100, -100, -10, -10), 0.5)  # wholly outside
    assert not tile_has_tissue(mask, 8.0, Box(1000, 1000, 2000, 2000), 0.5)


def test_tile_has_tissue_with_non_integral_ratio():
    mask = np.zeros((20, 20), dtype=bool)
    mask[7, 7] = True  # covers model [7*6.5/0.5, 8*6.5/0.5) = [91, 104)
    assert tile_has_tissue(mask, 6.5, Box(90, 90, 92, 92), 0.5)
    assert tile_has_tissue(mask, 6.5, Box(103, 103, 110, 110), 0.5)
    assert not tile_has_tissue(mask, 6.5, Box(104, 104, 120, 120), 0.5)
    assert not tile_has_tissue(mask, 6.5, Box(0, 0, 91, 91), 0.5)


# ---------------------------------------------------------------------------------------------
# Real H&E crops from ../shared
# ---------------------------------------------------------------------------------------------


def _pixel_um(name: str) -> float:
    """Approximate pixel size of an inventory image (TCGA 40x: level 0 0.25, level 1 1, level 2 4 um)."""
    for tag, um in (("level0", 0.25), ("level1", 1.0), ("level2", 4.0)):
        if tag in name:
            return um
    return 16.0 if name.startswith("thumbnails/") else 0.5


@pytest.fixture(scope="module")
def he_tiles(shared_dir):
    folder = shared_dir / "data" / "he_tiles"
    with open(folder / "inventory.csv", newline="") as handle:
        names = [row["file"] for row in csv.DictReader(handle)]
    return {name: np.asarray(Image.open(folder / name).convert("RGB")) for name in names}


NEGATIVES = [
    "tiles/no-tissue.png",
    "tiles/no-tissue2.png",
    "tiles/no-tissue-line.png",
    "tiles/no-tissue-green-pen.png",
    "tiles/almost-white-1.png",
    "tiles/almost-white-2.png",
]


@pytest.mark.shared
@pytest.mark.parametrize("name", NEGATIVES)
@pytest.mark.parametrize("pixel_um", [0.5, 2.0])
def test_real_blank_and_pen_only_images_have_no_tissue(he_tiles, name, pixel_um):
    assert not tissue_mask(he_tiles[name], pixel_um, TissueOptions()).any()


@pytest.mark.shared
def test_real_tissue_images_are_mostly_tissue(he_tiles):
    names = [n for n in he_tiles if n.startswith("tiles/") and ("tissue-level" in n or "nuclei-score" in n)]
    # crops that are not mostly tissue: pen marks, fat, a tissue edge on glass
    names = [n for n in names if "pen" not in n and "low-nuclei" not in n and n != "tiles/high-nuclei-score-level2.png"]
    assert len(names) >= 10
    for name in names:
        fraction = tissue_mask(he_tiles[name], _pixel_um(name), NO_DILATION).mean()
        assert fraction > 0.6, f"{name}: only {fraction:.2f} tissue"


@pytest.mark.shared
def test_real_tissue_edge_on_glass(he_tiles):
    # tissue in the top-left corner, glass elsewhere
    mask = tissue_mask(he_tiles["tiles/high-nuclei-score-level2.png"], 4.0, NO_DILATION)
    assert mask[:40, :40].mean() > 0.9
    assert not mask[300:, :].any()


@pytest.mark.shared
@pytest.mark.parametrize(
    "name",
    ["tiles/medium-nuclei-score-green-pen-level1.png", "thumbnails/tcga-green-pen.png", "thumbnails/wsi-blue-pen.png"],
)
def test_real_green_and_blue_ink_is_excluded(he_tiles, name):
    image = he_tiles[name].astype(np.int16)
    # unmistakable ink: green or blue well above red, and clearly coloured
    ink = (image[..., 1] - image[..., 0] > 40) & (image.max(axis=2) - image.min(axis=2) > 40)
    assert ink.mean() > 0.001, "the image should contain ink"
    mask = tissue_mask(he_tiles[name], _pixel_um(name), TissueOptions(min_region_um2=0.0, dilation_um=0.0))
    assert mask[ink].mean() < 0.1
    assert mask.any(), "the stained tissue next to the ink is kept"


@pytest.mark.shared
def test_real_slide_thumbnail_mask_selects_tissue_tiles(shared_dir):
    from wsi_grunet.slide.reader import SlideReader
    from wsi_grunet.tiling import plan_tiles

    with SlideReader(shared_dir / "slides" / "CMU-1-Small-Region.svs", 0.5) as reader:
        thumbnail, um = reader.thumbnail(8.0)
        shape = reader.model_shape
    mask = tissue_mask(thumbnail, um, TissueOptions())
    assert 0.3 < mask.mean() < 0.9
    assert not mask[:20, :20].any(), "the top-left corner of CMU-1-Small-Region is glass"
    tiles = plan_tiles(shape, 256, 32)
    selected = [t for t in tiles if tile_has_tissue(mask, um, t.read, 0.5)]
    assert 0 < len(selected) < len(tiles)
    assert not tile_has_tissue(mask, um, tiles[0].read, 0.5)
